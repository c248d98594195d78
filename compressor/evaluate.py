"""Task metrics and fidelity against the baseline, computed on the same samples for every runner."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from .data import Samples, encode, token_windows
from .lm_tasks import TaskRef, known_direction
from .progress import Progress, Silent
from .runners import Runner

log = logging.getLogger(__name__)

# Direction of every metric a task reports; the gate reads "worse" from here (higher_is_better).
HIGHER_IS_BETTER = {"accuracy": True, "f1_macro": True, "precision_macro": True, "recall_macro": True,
                    "agreement": True, "cosine_mean": True, "cosine_min": True, "perplexity": False,
                    "top1_agreement": True, "precision": True, "recall": True, "f1": True,
                    "generation_exact_match": True, "generation_prefix_tokens": True}
# Metrics of evaluation.generation_fidelity (text-generation, when configured).
FIDELITY_METRICS = ("generation_exact_match", "generation_prefix_tokens")
TASK_METRICS = {
    "text-classification": ("accuracy", "f1_macro", "precision_macro", "recall_macro", "agreement"),
    "feature-extraction": ("cosine_mean", "cosine_min"),
    "text-generation": ("perplexity", "top1_agreement"),
}
# Each task's first metric is its main one: what compare ranks on and regression goals watch.
MAIN_METRIC = {task: metrics[0] for task, metrics in TASK_METRICS.items()}
# Classification also reports each class's precision, recall and F1 as `f1[label]`, label being the
# class's name in the checkpoint's id2label (its index where the config names none).
PER_CLASS = ("precision", "recall", "f1")
PER_CLASS_METRIC = re.compile(r"(precision|recall|f1)\[(.+)\]")


def higher_is_better(metric: str) -> bool:
    if "/" in metric:  # an lm-eval task's metric, TASK/METRIC (planning refuses one of unknown direction)
        task, name = metric.split("/", 1)
        direction = known_direction(TaskRef(task), name)
        return True if direction is None else direction
    per_class = PER_CLASS_METRIC.fullmatch(metric)
    return HIGHER_IS_BETTER[per_class.group(1) if per_class else metric]


def is_task_metric(task: str, metric: str) -> bool:
    """Whether `task` can report `metric` (per-class names are checked against the labels later)."""
    return metric in TASK_METRICS[task] or (task == "text-classification" and bool(PER_CLASS_METRIC.fullmatch(metric)))


@dataclass
class Evaluation:
    metrics: dict[str, float]
    samples: int
    outputs: Any = field(repr=False, default=None)  # reduced outputs the candidate is compared with
    classes: Optional[ClassTable] = None  # classification: per-class counts and the confusion matrix


def _fixed_batches(texts: list[str], batch_size: int, fixed_batch: Optional[int]) -> Iterator[tuple[list[str], int]]:
    """Chunks of texts; a model with a fixed batch axis gets full chunks, padded with repeats."""
    size = fixed_batch or batch_size
    for start in range(0, len(texts), size):
        chunk = texts[start:start + size]
        real = len(chunk)
        if fixed_batch and real < fixed_batch:
            chunk = chunk + [chunk[-1]] * (fixed_batch - real)
        yield chunk, real


def evaluate(task: str, runner: Runner, tokenizer, samples: Samples, config, reference: Optional[Evaluation] = None,
             progress: Progress = Silent(), class_names: Optional[list[str]] = None) -> Evaluation:
    """Run `runner` over the evaluation set; with `reference`, add fidelity metrics against it.
    `class_names`: the classifier's label names by index (per-class metrics are named after them)."""
    if task == "text-generation":  # max_samples counts token windows here, not texts
        return _evaluate_generation(runner, tokenizer, samples.texts, config, reference, progress)
    texts = samples.texts[: config.max_samples] if config.max_samples else samples.texts
    fixed_batch, fixed_len = runner.fixed_shape
    # Batches of texts of similar length: each batch is padded to its longest text only, so the model
    # computes on far fewer padding positions. The outputs are put back in the texts' order.
    order = np.arange(len(texts)) if fixed_len else _by_length(tokenizer, texts, config.max_length)
    outputs = []
    batches = list(_fixed_batches([texts[i] for i in order], config.batch_size, fixed_batch))
    for chunk, real in progress.track(batches, len(batches), f"evaluating {runner.name}"):
        feed = encode(tokenizer, chunk, config.max_length, pad_to=fixed_len)
        result = runner(feed)[:real]
        if task == "feature-extraction":
            mask = feed["attention_mask"][:real, :, None].astype(np.float32)
            result = (result * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)  # mean pooling
        else:
            result = result.argmax(-1)
        outputs.append(result)
    reduced = np.empty_like(np.concatenate(outputs))
    reduced[order] = np.concatenate(outputs)
    if task == "text-classification":
        labels = np.asarray(samples.labels[: len(texts)])
        table = class_table(reduced, labels, class_names or [])
        occurring = [row for row, present in zip(table.rows, table.occurring) if present]
        metrics = {"accuracy": float((reduced == labels).mean()), "f1_macro": _f1_macro(reduced, labels),
                   "precision_macro": float(np.mean([c.precision for c in occurring])),
                   "recall_macro": float(np.mean([c.recall for c in occurring])),
                   "agreement": 1.0 if reference is None else float((reduced == reference.outputs).mean())}
        for row in table.rows:
            metrics.update({f"precision[{row.label}]": row.precision, f"recall[{row.label}]": row.recall,
                            f"f1[{row.label}]": row.f1})
        return Evaluation(metrics, len(texts), reduced, table)
    else:
        cosine = np.ones(len(reduced)) if reference is None else _cosine(reduced, reference.outputs)
        metrics = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())}
    return Evaluation(metrics, len(texts), reduced)


def _by_length(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """Indices of `texts` by increasing token count (stable: equal lengths keep their order)."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    return np.argsort(np.asarray(lengths), kind="stable")


def first_batch(task: str, tokenizer, samples: Samples, config) -> dict[str, np.ndarray]:
    """The evaluation's first batch, as the evaluation feeds it (token windows for text-generation)."""
    if task == "text-generation":
        ids = token_windows(tokenizer, samples.texts, config.max_length, config.batch_size)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    return encode(tokenizer, samples.texts[:config.batch_size], config.max_length)


def _evaluate_generation(runner, tokenizer, texts, config, reference, progress) -> Evaluation:
    windows = token_windows(tokenizer, texts, runner.fixed_shape[1] or config.max_length, config.max_samples)
    fixed_batch = runner.fixed_shape[0]
    size = fixed_batch or config.batch_size
    nll_sum, count, top1 = 0.0, 0, []
    starts = list(range(0, len(windows), size))
    for start in progress.track(starts, len(starts), f"evaluating {runner.name}"):
        ids = windows[start:start + size]
        real = len(ids)
        if fixed_batch and real < fixed_batch:
            ids = np.concatenate([ids, np.repeat(ids[-1:], fixed_batch - real, 0)])
        logits = runner({"input_ids": ids, "attention_mask": np.ones_like(ids)})[:real, :-1]
        targets = ids[:real, 1:]
        log_norm, predicted = _logsumexp_argmax(logits)
        picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
        nll_sum += float((log_norm - picked).sum())
        count += targets.size
        top1.append(predicted)
    predicted = np.concatenate(top1)
    agreement = 1.0 if reference is None else float((predicted == reference.outputs).mean())
    metrics = {"perplexity": float(np.exp(nll_sum / count)), "top1_agreement": agreement}
    return Evaluation(metrics, len(windows), predicted)


def _logsumexp_argmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per position, log sum exp over the vocabulary and the top-1 token. torch's kernels: threaded and
    vectorized, where numpy's exp over (batch, positions, vocabulary) took longer than the model's forward
    pass for a 49k vocabulary; the logits are read in place (a strided view, not a copy of 200 MB a batch)."""
    import torch

    values = torch.from_numpy(logits)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.float()  # half-precision logits (an fp16 ONNX model): summed in float32
    return values.logsumexp(-1).numpy(), values.argmax(-1).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)


@dataclass
class ClassRow:
    label: str
    support: int  # samples whose true class this is
    precision: float
    recall: float
    f1: float


@dataclass
class ClassTable:
    rows: list[ClassRow]
    confusion: list[list[int]]  # confusion[true][predicted], in the order of `rows`
    # per row: the class occurs as a label or a prediction; macro averages are over these (as f1_macro
    # and scikit-learn's are), so a named class absent from the data does not pull them down
    occurring: list[bool] = field(default_factory=list)


def class_table(predicted: np.ndarray, labels: np.ndarray, names: list[str]) -> ClassTable:
    """Per-class precision, recall and F1 (0 where undefined, as for F1 with no true positive) and
    the confusion matrix, over every named class and any other that occurs as a label or prediction
    (so that a baseline and a result report the same classes)."""
    classes = sorted(set(range(len(names))) | {int(c) for c in np.union1d(predicted, labels)})
    rows = []
    for cls in classes:
        tp = float(((predicted == cls) & (labels == cls)).sum())
        predicted_as, actually = float((predicted == cls).sum()), float((labels == cls).sum())
        precision = tp / predicted_as if predicted_as else 0.0
        recall = tp / actually if actually else 0.0
        f1 = 2 * tp / (predicted_as + actually) if tp else 0.0
        name = names[cls] if 0 <= cls < len(names) else str(cls)
        rows.append(ClassRow(name, int(actually), precision, recall, f1))
    confusion = [[int(((labels == true) & (predicted == guess)).sum()) for guess in classes] for true in classes]
    seen = {int(c) for c in np.union1d(predicted, labels)}
    return ClassTable(rows, confusion, [cls in seen for cls in classes])


def _f1_macro(predicted: np.ndarray, labels: np.ndarray) -> float:
    scores = []
    for cls in np.union1d(predicted, labels):
        tp = float(((predicted == cls) & (labels == cls)).sum())
        fp = float(((predicted == cls) & (labels != cls)).sum())
        fn = float(((predicted != cls) & (labels == cls)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))
