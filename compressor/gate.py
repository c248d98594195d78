"""Turns the recipe's goals and the measured baseline / result into per-goal verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError
from .evaluate import HIGHER_IS_BETTER, MAIN_METRIC


@dataclass
class GoalResult:
    goal: str
    threshold: float
    measured: float
    passed: bool
    margin: float  # how far inside the threshold (positive) or outside it (negative)
    unit: str = ""
    interval: Optional[tuple[float, float]] = None  # confidence interval of `measured`, for latency goals
    marginal: bool = False  # the interval still held the threshold after re-measuring: a close call

    def as_dict(self) -> dict:
        return asdict(self)


def _round_off(threshold: float) -> float:
    """Floating-point noise allowance, so that a value exactly at the threshold passes."""
    return 1e-9 * max(1.0, abs(threshold))


def _at_most(goal: str, measured: float, threshold: float, unit: str = "") -> GoalResult:
    passed = measured <= threshold + _round_off(threshold)
    return GoalResult(goal, threshold, measured, passed, threshold - measured, unit)


def _at_least(goal: str, measured: float, threshold: float, unit: str = "") -> GoalResult:
    passed = measured >= threshold - _round_off(threshold)
    return GoalResult(goal, threshold, measured, passed, measured - threshold, unit)


def check_goals(goals, baseline: dict, result: dict) -> list[GoalResult]:
    """`baseline` / `result` hold "metrics", "latency_ms" (p50, p95 ...) and "size_mb"."""
    verdicts: list[GoalResult] = []
    for goal in goals.accuracy:
        if goal.metric not in result["metrics"]:
            raise UserError(f"goals.accuracy: metric {goal.metric!r} is not measured for this task "
                            f"(measured: {', '.join(result['metrics'])})")
        base, cand = baseline["metrics"][goal.metric], result["metrics"][goal.metric]
        worse = (base - cand) if HIGHER_IS_BETTER[goal.metric] else (cand - base)
        name = f"accuracy.{goal.metric}"
        if goal.max_drop is not None:
            verdicts.append(_at_most(f"{name}.max_drop", worse, goal.max_drop))
        if goal.max_drop_pct is not None:
            pct = 100.0 * worse / abs(base) if base else float("inf") if worse > 0 else 0.0
            verdicts.append(_at_most(f"{name}.max_drop_pct", pct, goal.max_drop_pct, "%"))
        if goal.min is not None:
            verdicts.append(_at_least(f"{name}.min", cand, goal.min))
        if goal.max is not None:
            verdicts.append(_at_most(f"{name}.max", cand, goal.max))
    latency = goals.latency
    if latency.min_speedup is not None:
        speedup = baseline["latency_ms"]["p50"] / result["latency_ms"]["p50"]
        verdict = _at_least("latency.min_speedup", speedup, latency.min_speedup, "x")
        verdicts.append(_with_interval(verdict, result.get("speedup"), lambda s: s))
    if latency.max_p95_ms is not None:
        verdicts.append(_at_most("latency.max_p95_ms", result["latency_ms"]["p95"], latency.max_p95_ms, "ms"))
    if goals.size.max_ratio is not None:
        ratio = result["size_mb"] / baseline["size_mb"]
        verdicts.append(_at_most("size.max_ratio", ratio, goals.size.max_ratio, "x"))
    return verdicts


def _with_interval(verdict: GoalResult, estimate: Optional[dict], to_measured) -> GoalResult:
    """Attach the speed-up's confidence interval, mapped into the goal's units, and whether the
    threshold still lies inside it (a marginal verdict)."""
    if not estimate:
        return verdict
    low, high = sorted(to_measured(v) for v in estimate["interval"])
    verdict.interval = (low, high)
    verdict.marginal = low < verdict.threshold < high
    return verdict


def speedup_thresholds(goals, previous: Optional[dict]) -> list[float]:
    """The speed-ups at which a latency verdict flips: latency.min_speedup, and the speed-up below
    which goals.regression.max_latency_increase fails against a stored report."""
    thresholds = []
    if goals.latency.min_speedup is not None:
        thresholds.append(goals.latency.min_speedup)
    if previous is not None and goals.regression.max_latency_increase is not None:
        before = previous["baseline"]["latency_ms"]["p50"] / previous["result"]["latency_ms"]["p50"]
        thresholds.append(before / (1.0 + goals.regression.max_latency_increase))
    return thresholds


def load_previous(path: Path, task: str) -> dict:
    """A report.json from an earlier run of the same task, checked enough to compare against."""
    import json

    try:
        previous = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: --against report not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: --against is not a readable report.json ({exc})") from None
    try:
        metrics, latency = previous["result"]["metrics"], previous["result"]["latency_ms"]["p50"]
        previous["baseline"]["latency_ms"]["p50"]
    except (KeyError, TypeError):
        raise UserError(f"{path}: not a compress report.json (no result metrics and latency)") from None
    if previous.get("task") != task:
        raise UserError(f"{path}: a {previous.get('task')} report; this recipe's task is {task}")
    if MAIN_METRIC[task] not in metrics or not latency:
        raise UserError(f"{path}: has no {MAIN_METRIC[task]} or latency to compare with")
    return previous


def check_regression(regression, task: str, previous: dict, baseline: dict, result: dict) -> list[GoalResult]:
    """Goals relative to a stored report: slow-down of the speed-up over each run's baseline, and the
    worsening of the task's main metric."""
    verdicts = []
    if regression.max_latency_increase is not None:
        before = previous["baseline"]["latency_ms"]["p50"] / previous["result"]["latency_ms"]["p50"]
        now = baseline["latency_ms"]["p50"] / result["latency_ms"]["p50"]
        verdict = _at_most("regression.latency_increase", before / now - 1.0, regression.max_latency_increase)
        verdicts.append(_with_interval(verdict, result.get("speedup"), lambda s: before / s - 1.0))
    if regression.max_accuracy_drop is not None:
        metric = MAIN_METRIC[task]
        before, now = previous["result"]["metrics"][metric], result["metrics"][metric]
        worse = (before - now) if HIGHER_IS_BETTER[metric] else (now - before)
        verdicts.append(_at_most(f"regression.{metric}.drop", worse, regression.max_accuracy_drop))
    return verdicts
