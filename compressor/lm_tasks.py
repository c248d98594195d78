"""lm-evaluation-harness tasks a recipe names, and the local tasks compress builds itself.

A recipe's `evaluation.lm_eval.tasks` holds names lm-eval knows (resolved as lm-eval resolves them on
this machine: a task whose data lives on a hub needs the dataset in the local cache, or a network),
paths of task YAML files, and the local tasks below. The local tasks are cut from text compress
already has (default: the Lee news corpus the language-model recipes are evaluated on, which no
calibration set shares), so the scoring path runs with no network:

- `compress_next_word`: the last word of a sentence given the rest (a cloze task in the manner of
  LAMBADA, on news sentences). Metrics: acc (the word is the model's greedy continuation, every token
  of it) and perplexity (per word).
- `compress_sentence_ending`: a sentence's first half, and four candidate second halves: its own and
  three drawn from other sentences (seeded). Metrics: acc and acc_norm (log-likelihood divided by the
  ending's length in bytes), as lm-eval scores HellaSwag.

Both are what they say: small, deterministic probes of whether a compressed model still reads text as
its baseline did, not a substitute for the published benchmarks."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from .errors import UserError

NEXT_WORD = "compress_next_word"
SENTENCE_ENDING = "compress_sentence_ending"
LOCAL_TASKS = {
    NEXT_WORD: "the last word of a news sentence given the rest (cloze); acc, perplexity",
    SENTENCE_ENDING: "a sentence's true second half among four (multiple choice); acc, acc_norm",
}
# Each local task's metrics and whether higher is better; lm-eval's own tasks report theirs at run time.
LOCAL_METRICS = {NEXT_WORD: {"acc": True, "perplexity": False},
                 SENTENCE_ENDING: {"acc": True, "acc_norm": True}}
# Directions of the metrics lm-eval's tasks report, for goals checked before anything runs.
HARNESS_METRICS = {"acc": True, "acc_norm": True, "exact_match": True, "f1": True, "mcc": True, "bleu": True,
                   "rouge1": True, "rouge2": True, "rougeL": True, "chrf": True, "ter": False, "brier_score": False,
                   "perplexity": False, "word_perplexity": False, "byte_perplexity": False,
                   "bits_per_byte": False, "likelihood": True}
MAX_DOCUMENTS = 1000  # per local task: enough for a stable accuracy, few enough to score in minutes
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_WORD = re.compile(r"[A-Za-z]{3,}")


@dataclass(frozen=True)
class TaskRef:
    """One entry of `lm_eval.tasks`: its name as lm-eval reports it, and the YAML file it comes from
    (None for a task lm-eval knows by name)."""

    name: str
    path: Optional[Path] = None

    @property
    def local(self) -> bool:
        return self.name in LOCAL_TASKS


def parse_task(entry: str, recipe_dir: Path) -> TaskRef:
    """A task name, a local task, or a task YAML path (relative to the recipe's folder). A path that does
    not exist, or a YAML without a `task:` name, is an error naming it."""
    if entry in LOCAL_TASKS:
        return TaskRef(entry)
    if entry.endswith((".yaml", ".yml")) or "/" in entry:
        path = Path(entry).expanduser()
        path = path if path.is_absolute() else recipe_dir / path
        if not path.is_file():
            raise UserError(f"lm_eval task file {path} not found")
        try:
            content = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise UserError(f"{path}: not a readable lm-eval task YAML ({exc})") from None
        name = content.get("task") if isinstance(content, dict) else None
        if not isinstance(name, str):
            raise UserError(f"{path}: an lm-eval task YAML names its task in `task:`")
        return TaskRef(name, path)
    return TaskRef(entry)


def known_direction(task: TaskRef, metric: str) -> Optional[bool]:
    """Whether higher is better for `metric` of `task`, where that is known before lm-eval runs."""
    base = metric.split(",")[0]
    if task.local:
        return LOCAL_METRICS[task.name].get(base)
    return HARNESS_METRICS.get(base)


def sentences(texts: list[str]) -> list[str]:
    """Sentences of the texts, in order, whitespace collapsed."""
    found = []
    for text in texts:
        found += [" ".join(s.split()) for s in _SENTENCE_END.split(text) if s.strip()]
    return found


def next_word_documents(texts: list[str]) -> list[dict]:
    """Sentences of 10 to 60 words ending in a plain word: context = all but the last word, target = it."""
    documents = []
    for sentence in sentences(texts):
        words = sentence.split()
        if not 10 <= len(words) <= 60:
            continue
        last = words[-1].rstrip(".!?\"'")
        if not _WORD.fullmatch(last):
            continue
        documents.append({"context": " ".join(words[:-1]), "target": " " + last})
        if len(documents) == MAX_DOCUMENTS:
            break
    return documents


def sentence_ending_documents(texts: list[str], seed: int = 0) -> list[dict]:
    """Sentences of 8 to 40 words split in the middle; choices: the true second half and three others."""
    pool = []
    for sentence in sentences(texts):
        words = sentence.split()
        if 8 <= len(words) <= 40:
            middle = len(words) // 2
            pool.append((" ".join(words[:middle]), " " + " ".join(words[middle:])))
    if len(pool) < 4:
        return []
    rng = random.Random(seed)
    documents = []
    for index, (context, ending) in enumerate(pool[:MAX_DOCUMENTS]):
        others = rng.sample([i for i in range(len(pool)) if i != index], 3)
        choices = [ending] + [pool[i][1] for i in others]
        rng.shuffle(choices)
        documents.append({"context": context, "choices": choices, "label": choices.index(ending)})
    return documents


def _task_yaml(name: str, data_file: Path, cache: Path, output_type: str) -> dict:
    spec = {"task": name, "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data_file)}, "cache_dir": str(cache)},
            "test_split": "test", "output_type": output_type, "doc_to_text": "{{context}}",
            "metadata": {"version": 1.0}}
    if output_type == "loglikelihood":
        spec.update(doc_to_target="{{target}}", metric_list=[
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}])
    else:
        spec.update(doc_to_choice="{{choices}}", doc_to_target="{{label}}", metric_list=[
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    return spec


def write_local_tasks(texts: list[str], source: str, folder: Path) -> Path:
    """The local tasks' documents (JSONL) and task YAMLs, in `folder/tasks`; returns that folder for
    lm-eval's TaskManager(include_path=...). Too little text for a task is an error naming the source."""
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    built = {NEXT_WORD: (next_word_documents(texts), "loglikelihood"),
             SENTENCE_ENDING: (sentence_ending_documents(texts), "multiple_choice")}
    for name, (documents, output_type) in built.items():
        if len(documents) < 10:
            raise UserError(f"{source}: too little text for the local task {name} ({len(documents)} documents; "
                            "it needs sentences of 10 words or more)")
        data_file = folder / f"{name}.jsonl"
        data_file.write_text("".join(json.dumps(d) + "\n" for d in documents))
        spec = _task_yaml(name, data_file, folder / "datasets-cache", output_type)
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return tasks
