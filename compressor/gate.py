"""Turns the recipe's goals and the measured baseline / result into per-goal verdicts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError
from .evaluate import HIGHER_IS_BETTER


@dataclass
class GoalResult:
    goal: str
    threshold: float
    measured: float
    passed: bool
    margin: float  # how far inside the threshold (positive) or outside it (negative)
    unit: str = ""

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
        verdicts.append(_at_least("latency.min_speedup", speedup, latency.min_speedup, "x"))
    if latency.max_p95_ms is not None:
        verdicts.append(_at_most("latency.max_p95_ms", result["latency_ms"]["p95"], latency.max_p95_ms, "ms"))
    if goals.size.max_ratio is not None:
        ratio = result["size_mb"] / baseline["size_mb"]
        verdicts.append(_at_most("size.max_ratio", ratio, goals.size.max_ratio, "x"))
    return verdicts
