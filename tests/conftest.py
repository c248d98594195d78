"""Shared test fixtures: tiny random models built from configs, and the real PyPI-shipped fixtures."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest

WORDS = ("the a film movie is was good bad great awful funny dull boring fine plot cast story "
         "and but not very too so it this that of in with quiet triumph sad mess tedious").split()


def _tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!"] + list(letters) + ["##" + c for c in letters]
    vocab += [w for w in dict.fromkeys(WORDS) if w not in vocab]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)
    return tokenizer, len(vocab)


def build_tiny(folder: Path, task: str, architecture: str = "") -> Path:
    """A randomly initialised, seeded model small enough for unit tests (a few hundred KB); for
    text-generation a Llama, or with `architecture="gpt2"` a GPT-2 (Conv1D layers)."""
    import torch
    from transformers import BertConfig, GPT2Config, LlamaConfig

    from compressor.checkpoint import model_class

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer, vocab_size = _tokenizer(folder)
    if architecture == "gpt2":
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
        config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=2, eos_token_id=3, pad_token_id=0)
    elif task == "text-generation":  # BOS and EOS as a Llama tokenizer has them (ids 2 and 3)
        tokenizer.bos_token, tokenizer.eos_token = "[CLS]", "[SEP]"
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    else:
        config = BertConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, num_labels=2)
    model = model_class(task).from_config(config)
    model.eval()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if task == "text-generation":
        causal_tokenizer(folder)
    return folder


def causal_tokenizer(folder: Path) -> None:
    """A causal LM's tokenizer gives no token_type_ids (the tests' BERT tokenizer would): GPT-2 adds them to its
    embeddings in torch, while its ONNX graph takes none."""
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["model_input_names"] = ["input_ids", "attention_mask"]
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2))


@pytest.fixture(scope="session", autouse=True)
def session_stage_cache(tmp_path_factory):
    """The tests never read or fill the user's stage cache: one cache per test session, in which shipped
    recipes that share stages (the SmolLM2 ONNX export) run them once when resumed."""
    root = tmp_path_factory.mktemp("stage-cache")
    previous = os.environ.get("COMPRESS_CACHE")
    os.environ["COMPRESS_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("COMPRESS_CACHE", None)
    else:
        os.environ["COMPRESS_CACHE"] = previous
    shutil.rmtree(root, ignore_errors=True)  # several GB of SmolLM2 stage outputs; pytest keeps old tmp dirs


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "bert-cls", "text-classification")


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "bert", "feature-extraction")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "llama", "text-generation")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory.mktemp("tiny") / "gpt2", "text-generation", "gpt2")


@pytest.fixture(scope="session")
def sentences_jsonl(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sentences.jsonl"
    with open(path, "w") as handle:
        for i in range(48):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
            handle.write(json.dumps({"text": words, "label": i % 2}) + "\n")
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    import random

    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(30)))
    return path


# The evaluation and benchmark part of tiny end-to-end recipes, for str.format with `data`.
TINY_EVALUATION = """evaluation:
  data: {{path: "{data}"}}
  batch_size: 8
benchmark: {{seq_len: 32, iterations: 6, warmup: 1, memory: false}}
"""


def write_recipe(folder: Path, body: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body).lstrip())
    return path


def real_fixture(name: str) -> Path:
    """A built PyPI-shipped fixture; skipped with the command to run when it has not been built."""
    from compressor import fixtures

    path = fixtures.paths()[name]
    if not path.exists() and not os.environ.get("COMPRESS_BUILD_FIXTURES"):
        pytest.skip(f"fixture {name} not built; run `compress fixtures` (make test does this)")
    return fixtures.ensure(name)
