"""One data loader for every stage and for evaluation: built-in sets (dataset cards) or user files,
read into texts (and labels), sampled with a seed, and encoded for runners."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from . import fixtures
from .errors import UserError

log = logging.getLogger(__name__)

CARDS_DIR = Path(__file__).parent / "calibration"
Format = Literal["auto", "text", "jsonl", "csv", "parquet", "hf-dataset"]
# What datasets' save_to_disk writes at the top of its folder: a Dataset's state, or a DatasetDict's split list.
SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")
SUFFIX_FORMATS = {".txt": "text", ".cor": "text", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet"}


class DataConfig(BaseModel):
    """Where samples come from: a built-in set (a dataset card) or a file or folder."""

    model_config = ConfigDict(extra="forbid")

    dataset: Optional[str] = Field(
        None, description="name of a dataset card in compressor/calibration/ (`compress data` lists them)")
    path: Optional[str] = Field(
        None, description="a .txt, .jsonl, .csv or .parquet file, or a folder written by datasets' save_to_disk")
    format: Format = Field("auto", description="file format; auto reads it from the suffix (a folder: hf-dataset)")
    text_field: str = Field("text", description="field (column) holding the text, for JSONL / CSV / Parquet / datasets")
    label_field: Optional[str] = Field(
        "label", description="field holding an integer label, if any; needed for text-classification evaluation")
    split: Optional[str] = Field(None, description="split of a saved DatasetDict (default: train, if it has one)")
    segment: Literal["line", "paragraph", "window"] = Field(
        "line", description="plain text only: one sample per line, per blank-line separated paragraph, or "
                            "fixed token windows of max_length cut from the whole text")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of `dataset` or `path`")
        if self.dataset is not None and self.dataset not in card_names():
            raise ValueError(f"no dataset card {self.dataset!r}; built-in: {', '.join(card_names())}")
        return self


class CalibrationConfig(BaseModel):
    """Samples a stage computes statistics on (activation ranges, importance, Hessians)."""

    model_config = ConfigDict(extra="forbid")

    data: DataConfig
    samples: int = Field(128, gt=0, le=10_000_000,
                         description="how many samples (sentences, paragraphs or token windows) to draw")
    # numpy refuses negative seeds (the draw would stop with a traceback); 2**32 - 1 is generous and any tool takes it
    seed: int = Field(0, ge=0, le=2**32 - 1,
                      description="seed of the random draw, so a recipe calibrates on the same samples every run")
    max_length: int = Field(128, gt=0, le=8192, description="truncate (or window) to this many tokens")
    padding: Literal["longest", "max_length", "bucket"] = Field(
        "longest", description="longest: pad each batch to its longest sample; max_length: every batch to "
                               "max_length (equal shapes, needed by entropy / percentile); bucket: sort by "
                               "length first so batches hold similar lengths")
    batch_size: int = Field(1, gt=0, le=4096, description="samples per calibration batch")
    all_experts: bool = Field(
        True, description="mixture-of-experts models: send every calibration token through every expert while "
                          "statistics are recorded (each block's output still follows the router), so that no "
                          "expert is calibrated on a handful of tokens; the record gives the tokens the router "
                          "chose per expert")


@dataclass
class Samples:
    texts: list[str]
    labels: Optional[list[int]]
    source: str
    segment: str = "line"


# ---------------------------------------------------------------------------------------------
# Dataset cards


@lru_cache(maxsize=None)
def card_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in CARDS_DIR.glob("*.yaml")))


def load_card(name: str) -> dict:
    path = CARDS_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"no dataset card {name!r}; built-in: {', '.join(card_names())}")
    return yaml.safe_load(path.read_text())


def _card_file(card: dict) -> Path:
    path = fixtures.ensure(card["source"]["fixture"]) / card["source"]["file"]
    expected = card.get("sha256")
    if expected:
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise UserError(f"{path}: sha256 {actual[:12]}... does not match dataset card {card['name']!r} "
                            f"({expected[:12]}...); rebuild it with `compress fixtures --only "
                            f"{card['source']['fixture']}` after deleting it")
    return path


def resolve(config: DataConfig) -> DataConfig:
    """A config naming a card becomes one naming the card's file, with the card's parsing settings
    wherever the recipe left them unset."""
    if config.dataset is None:
        return config
    card = load_card(config.dataset)
    values = {k: card[k] for k in ("format", "text_field", "label_field", "segment") if k in card}
    values.update({k: getattr(config, k) for k in config.model_fields_set if k != "dataset"})
    return DataConfig(path=str(_card_file(card)), **values)


def _card_problem(name: str) -> Optional[str]:
    """Why a dataset card could not give its file: its fixture is one compress cannot build, or a built
    fixture lacks the file (a fixture not built yet is built by the first run that reads it)."""
    try:
        card = load_card(name)
    except yaml.YAMLError as exc:
        return f"dataset card {name!r} is not valid YAML ({exc})"
    source = card.get("source") if isinstance(card, dict) else None
    if not isinstance(source, dict) or source.get("fixture") not in fixtures.NAMES or not source.get("file"):
        return f"dataset card {name!r} names no fixture file compress can build (fixtures: {', '.join(fixtures.NAMES)})"
    built = fixtures.paths()[source["fixture"]]
    if built.exists() and not (built / source["file"]).is_file():
        return (f"{built / source['file']}: missing from fixture {source['fixture']!r}; delete {built} and run "
                f"`compress fixtures --only {source['fixture']}`")
    return None


def source_problem(config: DataConfig) -> Optional[str]:
    """Why `read` would fail to open this source, found without reading it (`compress validate`): a card that
    does not resolve, or a path that is missing, unreadable, a folder where a file is wanted or of a format
    the suffix does not tell. Relative paths are taken from the working directory, as `read` takes them."""
    if config.dataset is not None:
        return _card_problem(config.dataset)
    path = Path(config.path).expanduser()
    if not path.exists():
        relative = "" if path.is_absolute() else f" (relative paths are read from the working directory, {Path.cwd()})"
        return f"{path}: data file not found{relative}"
    try:
        fmt = _format_of(path, config.format)
    except UserError as exc:
        return str(exc)
    if fmt == "hf-dataset":
        if not path.is_dir():
            return f"{path}: format hf-dataset is a folder written by datasets' save_to_disk, not a file"
        if not os.access(path, os.R_OK | os.X_OK):
            return f"{path}: folder not readable (permission denied)"
        if not any((path / name).is_file() for name in SAVED_DATASET_FILES):
            return (f"{path}: a folder without {' or '.join(SAVED_DATASET_FILES)}, so not one written by datasets' "
                    "save_to_disk; give a file, or set `format`")
        return None
    if not path.is_file():
        return f"{path}: expected a {fmt} file, found a folder"
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    return None


# ---------------------------------------------------------------------------------------------
# Readers: each returns rows (dicts) or plain texts


def _format_of(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    if path.is_dir():
        return "hf-dataset"
    if path.suffix in SUFFIX_FORMATS:
        return SUFFIX_FORMATS[path.suffix]
    raise UserError(f"{path}: cannot tell the data format from {path.suffix!r}; set `format` "
                    f"({', '.join(sorted(set(SUFFIX_FORMATS.values())))} or hf-dataset)")


def _read_text(path: Path, segment: str) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if segment == "paragraph":
        parts = [" ".join(block.split()) for block in text.split("\n\n")]
    else:  # lines; token windows are cut from the lines once a tokenizer is known
        parts = [line.strip() for line in text.splitlines()]
    return [p for p in parts if p]


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _read_parquet(path: Path, fields: list[str]) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise UserError(f"{path}: not a readable Parquet file ({exc})") from None
    columns = [f for f in fields if f in schema.names]
    if fields[0] not in columns:
        raise UserError(f"{path}: no column {fields[0]!r} (columns: {', '.join(schema.names)}); set text_field")
    return pq.read_table(path, columns=columns).to_pylist()


def _read_hf_dataset(path: Path, split: Optional[str], fields: list[str]) -> list[dict]:
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise UserError("reading a saved Hugging Face dataset needs the `datasets` package") from None
    try:
        loaded = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise UserError(f"{path}: not a folder written by datasets' save_to_disk ({exc})") from None
    if isinstance(loaded, DatasetDict):
        name = split or ("train" if "train" in loaded else None)
        if name not in loaded:
            raise UserError(f"{path}: dataset has splits {', '.join(loaded)}; set `split` to one of them")
        loaded = loaded[name]
    elif split:
        raise UserError(f"{path}: this dataset has no splits; remove `split: {split}`")
    columns = [f for f in fields if f in loaded.column_names]
    if fields[0] not in columns:
        raise UserError(f"{path}: no column {fields[0]!r} (columns: {', '.join(loaded.column_names)}); "
                        "set text_field")
    return loaded.select_columns(columns).to_list()


def read(config: DataConfig) -> Samples:
    """Read every sample of a source; never silently empty."""
    config = resolve(config)
    path = Path(config.path).expanduser()
    if not path.exists():
        raise UserError(f"{path}: data file not found")
    fmt = _format_of(path, config.format)
    if fmt != "hf-dataset" and not path.is_file():
        raise UserError(f"{path}: expected a {fmt} file, found a folder")
    if fmt != "text" and config.segment != "line":
        raise UserError(f"{path}: segment: {config.segment} applies to plain text files only")
    fields = [config.text_field] + ([config.label_field] if config.label_field else [])
    if fmt == "text":
        texts, labels = _read_text(path, config.segment), None
    else:
        rows = {"jsonl": lambda: _read_jsonl(path), "csv": lambda: _read_csv(path),
                "parquet": lambda: _read_parquet(path, fields),
                "hf-dataset": lambda: _read_hf_dataset(path, config.split, fields)}[fmt]()
        texts, labels = _fields(rows, path, config)
    if not texts:
        raise UserError(f"{path}: no samples in it")
    return Samples(texts, labels, str(path), config.segment)


def _fields(rows: list[dict], path: Path, config: DataConfig) -> tuple[list[str], Optional[list[int]]]:
    texts, labels = [], []
    for number, row in enumerate(rows, 1):
        if config.text_field not in row:
            raise UserError(f"{path}: sample {number} has no field {config.text_field!r} "
                            f"(fields: {', '.join(map(str, row))}); set text_field")
        texts.append(str(row[config.text_field]))
        label = row.get(config.label_field) if config.label_field else None
        if label is not None:
            try:
                labels.append(int(label))
            except (TypeError, ValueError):
                raise UserError(f"{path}: sample {number}: label {label!r} in {config.label_field!r} is not "
                                "an integer") from None
    return texts, labels if texts and len(labels) == len(texts) else None


def load_samples(config: DataConfig, task: str) -> Samples:
    """The evaluation set named by a recipe's evaluation.data."""
    samples = read(config)
    if samples.segment == "window" and task != "text-generation":
        raise UserError(f"{samples.source}: segment: window applies to text-generation evaluation and "
                        "to calibration only")
    if task == "text-classification" and samples.labels is None:
        raise UserError(f"{samples.source}: text-classification needs an integer label per sample "
                        f"(field {config.label_field!r})")
    return samples


# ---------------------------------------------------------------------------------------------
# Calibration batches


def draw_texts(config: CalibrationConfig, source: Optional[Samples] = None) -> list[str]:
    """The `samples` texts a calibration config draws, in draw order (not for token windows)."""
    source = source or read(config.data)
    if len(source.texts) < config.samples:
        raise UserError(f"{source.source}: calibration.samples is {config.samples} but it holds only "
                        f"{len(source.texts)} samples")
    rng = np.random.default_rng(config.seed)
    return [source.texts[i] for i in rng.choice(len(source.texts), config.samples, replace=False)]


def calibration_batches(config: CalibrationConfig, tokenizer) -> list[dict[str, np.ndarray]]:
    """Draw `samples` samples with the recipe's seed and encode them into batches of model inputs."""
    source = read(config.data)
    if source.segment == "window":
        windows = token_windows(tokenizer, source.texts, config.max_length, None)
        if len(windows) < config.samples:
            raise UserError(f"{source.source}: calibration.samples is {config.samples} but the text holds "
                            f"only {len(windows)} windows of {config.max_length} tokens")
        rng = np.random.default_rng(config.seed)
        chosen = windows[np.sort(rng.choice(len(windows), config.samples, replace=False))]
        feeds = [{"input_ids": chosen[i:i + config.batch_size],
                  "attention_mask": np.ones_like(chosen[i:i + config.batch_size])}
                 for i in range(0, len(chosen), config.batch_size)]
    else:
        texts = draw_texts(config, source)
        if config.padding == "bucket":
            texts.sort(key=lambda t: len(tokenizer(t, truncation=True, max_length=config.max_length)["input_ids"]))
        pad_to = config.max_length if config.padding == "max_length" else None
        feeds = [encode(tokenizer, texts[i:i + config.batch_size], config.max_length, pad_to=pad_to)
                 for i in range(0, len(texts), config.batch_size)]
    return feeds


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def torch_inputs(feed: dict[str, np.ndarray]) -> dict:
    """A batch from `encode` or `calibration_batches` as torch tensors, model inputs only."""
    import torch

    return {k: torch.from_numpy(v) for k, v in feed.items() if k in MODEL_INPUTS}


def encode(tokenizer, texts: list[str], max_length: int, pad_to: Optional[int] = None) -> dict[str, np.ndarray]:
    """Tokenize a batch to int64 numpy arrays; pad to the longest text, or to `pad_to` for fixed shapes."""
    encoded = tokenizer(texts, truncation=True, max_length=pad_to or max_length,
                        padding="max_length" if pad_to else True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in encoded.items()}


def prefix_token(tokenizer) -> int:
    """The token every window starts with: BOS, or EOS where the tokenizer has no BOS (the choice of
    lm-evaluation-harness). Models trained with BOS at the start of every document (Llama, Mistral,
    Gemma) score text without it as if it began mid-sentence: perplexity several times too high."""
    for token in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token is not None:
            return int(token)
    raise UserError("the tokenizer has neither a BOS nor an EOS token to start token windows with")


def token_windows(tokenizer, texts: list[str], length: int, limit: Optional[int]) -> np.ndarray:
    """Windows of exactly `length` tokens for perplexity and calibration: the texts are tokenized
    without special tokens and concatenated; each window is the prefix token followed by the next
    `length - 1` tokens of that stream. Windows do not overlap, so every text token is predicted once,
    from the prefix and the tokens before it in its window (docs/RECIPES.md, "Perplexity")."""
    if length < 2:
        raise UserError(f"token windows need at least 2 tokens (the prefix and one to predict), not {length}")
    body = length - 1
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if limit and len(ids) >= limit * body:
            break
    count = len(ids) // body
    if limit:
        count = min(count, limit)
    if count == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one window of {length}")
    windows = np.empty((count, length), dtype=np.int64)
    windows[:, 0] = prefix_token(tokenizer)
    windows[:, 1:] = np.asarray(ids[: count * body], dtype=np.int64).reshape(count, body)
    return windows
