"""Evaluation data: built-in sets or user files, read into texts (and labels), and encoded for runners."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .errors import UserError

log = logging.getLogger(__name__)


@dataclass
class Samples:
    texts: list[str]
    labels: Optional[list[int]]
    source: str


def _builtin_path(name: str) -> Path:
    from . import fixtures

    if name == "sentiment-test":
        return fixtures.ensure("sentiment-data") / "test.jsonl"
    if name == "lee-background":
        return fixtures.ensure("lee-background") / "lee_background.txt"
    raise UserError(f"unknown built-in dataset {name!r}")


def _read_jsonl(path: Path, text_field: str, label_field: Optional[str]) -> tuple[list[str], Optional[list[int]]]:
    texts, labels = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if text_field not in row:
                raise UserError(f"{path}:{number}: no field {text_field!r} (fields: {', '.join(row)}); "
                                "set evaluation.data.text_field")
            texts.append(str(row[text_field]))
            if label_field is not None and label_field in row:
                labels.append(int(row[label_field]))
    has_labels = label_field is not None and len(labels) == len(texts) and texts
    return texts, labels if has_labels else None


def load_samples(config, task: str) -> Samples:
    """Read the evaluation set named by an EvaluationConfig.data; never silently empty."""
    path = _builtin_path(config.dataset) if config.dataset else Path(config.path).expanduser()
    if not path.is_file():
        raise UserError(f"{path}: evaluation data file not found")
    if path.suffix == ".jsonl":
        texts, labels = _read_jsonl(path, config.text_field, config.label_field)
    elif path.suffix in (".txt", ".cor"):
        texts, labels = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()], None
    else:
        raise UserError(f"{path}: unsupported evaluation data format {path.suffix!r} (use .jsonl or .txt)")
    if not texts:
        raise UserError(f"{path}: evaluation data is empty")
    if task == "text-classification" and labels is None:
        raise UserError(f"{path}: text-classification needs an integer label per sample "
                        f"(field {config.label_field!r})")
    return Samples(texts, labels, str(path))


def encode(tokenizer, texts: list[str], max_length: int, pad_to: Optional[int] = None) -> dict[str, np.ndarray]:
    """Tokenize a batch to int64 numpy arrays; pad to the longest text, or to `pad_to` for fixed shapes."""
    encoded = tokenizer(texts, truncation=True, max_length=pad_to or max_length,
                        padding="max_length" if pad_to else True, return_tensors="np")
    return {k: v.astype(np.int64) for k, v in encoded.items()}


def token_windows(tokenizer, texts: list[str], length: int, limit: Optional[int]) -> np.ndarray:
    """Concatenate texts and cut them into non-overlapping windows of exactly `length` tokens."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if limit and len(ids) >= limit * length:
            break
    count = len(ids) // length
    if limit:
        count = min(count, limit)
    if count == 0:
        raise UserError(f"evaluation text has {len(ids)} tokens, fewer than one window of {length}")
    return np.asarray(ids[: count * length], dtype=np.int64).reshape(count, length)
