"""The baseline's scores kept in the stage cache, so that runs judged against the same checkpoint on the
same evaluation do not evaluate it again: `compress run --resume` and `compress compare` read them,
every run that may write the cache stores them. Latency and peak memory are never stored: they are
measured in each run, the sides interleaved, because the machine's state is part of them.

Two entries per baseline, because recipes share the first more often than the second:
- the evaluation (perplexity and top-1 tokens, accuracy and predictions, embeddings), keyed by the
  checkpoint's files, the task, the evaluation's data and settings (generation fidelity and lm-eval left
  out), the evaluated samples themselves, the threads and device;
- generation fidelity and lm-eval, keyed by the same plus those two settings.

Like a stage's key, each also holds the versions of the packages that shape outputs and a digest of
compress's source, so a changed scorer is never read from an older entry. Only the checkpoint itself
is stored this way: a baseline that is something else (merge_lora's unmerged adapter) is evaluated in
every run. Entries are JSON and .npy files (no pickle), checked against their sha256 when read."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from . import cache
from .data import Samples
from .evaluate import ClassRow, ClassTable, Evaluation
from .generation_fidelity import Generations
from .recipe import Recipe
from .task_scores import BaselineScores, SideScores

EVALUATION, SCORES = "baseline evaluation", "baseline generation fidelity and lm-eval"


@dataclass
class BaselineKeys:
    evaluation: str
    scores: Optional[str]  # None: the recipe asks for neither generation fidelity nor lm-eval


def _samples_digest(samples: Samples) -> str:
    return hashlib.sha256(json.dumps([samples.texts, samples.labels, samples.segment]).encode()).hexdigest()


def keys(recipe: Recipe, checkpoint: Path, samples: Samples, threads: int, device: str) -> BaselineKeys:
    evaluation = recipe.evaluation.model_dump(mode="json", exclude={"generation_fidelity", "lm_eval"})
    common = {"input": cache.checkpoint_key(checkpoint), "task": recipe.task, "samples": _samples_digest(samples),
              "threads": threads, "device": device, "evaluation": evaluation}
    scored = recipe.evaluation.model_dump(mode="json", include={"generation_fidelity", "lm_eval"})
    wants_scores = recipe.evaluation.generation_fidelity is not None or recipe.evaluation.lm_eval is not None
    return BaselineKeys(
        evaluation=cache.payload_key({**common, "part": EVALUATION}),
        scores=cache.payload_key({**common, "part": SCORES, "scored": scored,
                                  "files": cache.referenced_files(scored)}) if wants_scores else None)


def _about(part: str, recipe: Recipe, checkpoint: Path, seconds: float) -> tuple[dict, dict]:
    return {"seconds": round(seconds, 3)}, {"stage": part, "stage_index": "-", "recipe": recipe.name,
                                             "checkpoint": str(checkpoint), "baseline": True}


def store_evaluation(key: str, evaluation: Evaluation, recipe: Recipe, checkpoint: Path, seconds: float) -> None:
    table = evaluation.classes
    summary = {"metrics": evaluation.metrics, "samples": evaluation.samples,
               "classes": None if table is None else asdict(table)}
    files = {"evaluation.json": json.dumps(summary).encode()}
    if evaluation.outputs is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(evaluation.outputs), allow_pickle=False)
        files["outputs.npy"] = buffer.getvalue()
    cache.store_files(key, files, *_about(EVALUATION, recipe, checkpoint, seconds))


def _read(key: str) -> Optional[dict[str, bytes]]:
    entry = cache.lookup(key)
    return cache.read_files(entry) if entry is not None else None


def load_evaluation(key: str) -> Optional[Evaluation]:
    files = _read(key)
    if files is None:
        return None
    summary = json.loads(files["evaluation.json"])
    table = summary["classes"]
    classes = None if table is None else ClassTable(rows=[ClassRow(**row) for row in table["rows"]],
                                                    confusion=table["confusion"], occurring=table["occurring"])
    outputs = np.load(io.BytesIO(files["outputs.npy"]), allow_pickle=False) if "outputs.npy" in files else None
    return Evaluation(summary["metrics"], summary["samples"], outputs, classes)


def store_scores(key: str, scores: BaselineScores, recipe: Recipe, checkpoint: Path, seconds: float) -> None:
    side = scores.side
    payload = {"metrics": side.metrics, "stderr": side.stderr, "notes": side.notes,
               "generations": None if scores.generations is None else scores.generations.tokens}
    cache.store_files(key, {"scores.json": json.dumps(payload).encode()}, *_about(SCORES, recipe, checkpoint, seconds))


def load_scores(key: str) -> Optional[BaselineScores]:
    files = _read(key)
    if files is None:
        return None
    payload = json.loads(files["scores.json"])
    generations = None if payload["generations"] is None else Generations(payload["generations"])
    return BaselineScores(SideScores(payload["metrics"], payload["stderr"], payload["notes"]), generations)
