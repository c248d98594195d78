"""The evaluations a language-model recipe adds to perplexity and top-1 agreement: generation fidelity and
lm-evaluation-harness tasks, run on the baseline and every result with the same prompts and documents."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .data import DataConfig, Samples, read
from .generation_fidelity import Generations, generate, prompts, uses_chat_template
from .lm_harness import score
from .lm_tasks import write_local_tasks
from .planning import lm_eval_tasks
from .progress import Progress, Silent
from .recipe import Recipe
from .runners import Runner

LOCAL_TASK_TEXT = DataConfig(dataset="lee-background")
LONGEST_SCORED = 2048  # tokens, when the recipe sets no lm_eval.max_length


@dataclass
class SideScores:
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # the baseline's: what holds for every side


def model_positions(checkpoint: Path) -> Optional[int]:
    """The checkpoint's position limit from config.json (None where it states none)."""
    try:
        config = json.loads((checkpoint / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return text.get("max_position_embeddings") or text.get("n_positions")


@dataclass
class BaselineScores:
    """The baseline's side of the extra scores, and its generations (every result's reference)."""

    side: SideScores
    generations: Optional[Generations] = None


def extra_scores(recipe: Recipe, checkpoint: Path, tokenizer, samples: Samples, baseline: Runner,
                 results: list[Runner], progress: Progress = Silent(), stored: Optional[BaselineScores] = None
                 ) -> tuple[list[SideScores], BaselineScores]:
    """Per side (the baseline first, then each result), the extra metrics, their standard errors, and notes
    saying what was scored and how long it took; and the baseline's scores as they may be stored.
    `stored`: the baseline's scores from an earlier run (baseline_store.py); only the results are scored."""
    evaluation = recipe.evaluation
    runners = [baseline] + results
    sides = [SideScores() for _ in runners]
    if stored is not None:
        sides[0] = SideScores(dict(stored.side.metrics), dict(stored.side.stderr), list(stored.side.notes))
    reference = stored.generations if stored is not None else None
    wanted = evaluation.generation_fidelity
    if wanted is not None:
        chat = uses_chat_template(tokenizer, wanted.chat_template)
        ids = prompts(tokenizer, samples.texts, wanted.prompts, wanted.prompt_tokens, chat)
        progress.phase(f"generation fidelity: {wanted.prompts} greedy generations of up to {wanted.new_tokens} "
                       "tokens per side")
        if reference is None:
            reference = generate(baseline, tokenizer, ids, wanted.new_tokens, progress)
            sides[0].metrics.update(reference.metrics())
            sides[0].notes.append(f"generation fidelity: {wanted.prompts} prompts of {wanted.prompt_tokens} text "
                                  "tokens" + (" in the tokenizer's chat template" if chat else "")
                                  + f", {wanted.new_tokens} greedy tokens each, compared token by token with the "
                                  "baseline's")
        for side, runner in zip(sides[1:], results):
            side.metrics.update(generate(runner, tokenizer, ids, wanted.new_tokens, progress).metrics(reference))
    config = evaluation.lm_eval
    if config is None:
        return sides, BaselineScores(sides[0], reference)
    tasks = lm_eval_tasks(recipe)
    longest = config.max_length or min(model_positions(checkpoint) or LONGEST_SCORED, LONGEST_SCORED)
    with tempfile.TemporaryDirectory(prefix="compress-lm-eval-") as scratch:
        task_dir = None
        if any(task.local for task in tasks):
            text = read(config.data or LOCAL_TASK_TEXT)
            task_dir = write_local_tasks(text.texts, text.source, Path(scratch))
        for side, runner in zip(sides, runners):
            if side is sides[0] and stored is not None:
                continue
            progress.phase(f"lm-eval on {runner.name}: {', '.join(t.name for t in tasks)}")
            scores = score(runner, tokenizer, tasks, task_dir, num_fewshot=config.num_fewshot, limit=config.limit,
                           batch_size=config.batch_size, apply_chat_template=config.apply_chat_template,
                           max_length=longest)
            side.metrics.update(scores.metrics)
            side.stderr.update(scores.stderr)
            counted = ", ".join(f"{task} {count}" for task, count in scores.documents.items())
            side.notes.append(f"lm-eval on {runner.name} ({runner.backend}): documents {counted}; {scores.seconds:.0f} s")
    return sides, BaselineScores(sides[0], reference)
