"""Turns the recipe's goals and the measured baseline / result into per-goal verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pydantic import ValidationError

from .errors import UserError
from .evaluate import MAIN_METRIC, higher_is_better
from .recipe_yaml import format_path
from .report_schema import SCHEMA_VERSION, BaselineSide, Environment, GateRow, Report, ResultSide, Speedup


def _round_off(threshold: float) -> float:
    """Floating-point noise allowance, so that a value exactly at the threshold passes."""
    return 1e-9 * max(1.0, abs(threshold))


def _at_most(goal: str, measured: float, threshold: float, unit: str = "") -> GateRow:
    passed = measured <= threshold + _round_off(threshold)
    return GateRow(goal=goal, threshold=threshold, measured=measured, passed=passed, margin=threshold - measured,
                   unit=unit)


def _at_least(goal: str, measured: float, threshold: float, unit: str = "") -> GateRow:
    passed = measured >= threshold - _round_off(threshold)
    return GateRow(goal=goal, threshold=threshold, measured=measured, passed=passed, margin=measured - threshold,
                   unit=unit)


def check_goals(goals, baseline: BaselineSide, result: ResultSide) -> list[GateRow]:
    verdicts: list[GateRow] = []
    for goal in goals.accuracy:
        if goal.metric not in result.metrics or goal.metric not in baseline.metrics:
            raise UserError(f"goals.accuracy: metric {goal.metric!r} is not measured on both sides "
                            f"(baseline: {', '.join(baseline.metrics)}; result: {', '.join(result.metrics)})")
        base, cand = baseline.metrics[goal.metric], result.metrics[goal.metric]
        worse = (base - cand) if higher_is_better(goal.metric) else (cand - base)
        name = f"accuracy.{goal.metric}"
        spread = _two_standard_errors(goal.metric, baseline, result)
        if goal.max_drop is not None:
            verdicts.append(_significance(_at_most(f"{name}.max_drop", worse, goal.max_drop), spread))
        if goal.max_drop_pct is not None:
            pct = 100.0 * worse / abs(base) if base else float("inf") if worse > 0 else 0.0
            scaled = None if spread is None or not base else 100.0 * spread / abs(base)
            verdicts.append(_significance(_at_most(f"{name}.max_drop_pct", pct, goal.max_drop_pct, "%"), scaled))
        if goal.min is not None:
            verdicts.append(_at_least(f"{name}.min", cand, goal.min))
        if goal.max is not None:
            verdicts.append(_at_most(f"{name}.max", cand, goal.max))
    latency = goals.latency
    if latency.min_speedup is not None:
        speedup = baseline.latency_ms.p50 / result.latency_ms.p50
        verdict = _at_least("latency.min_speedup", speedup, latency.min_speedup, "x")
        verdicts.append(_with_interval(verdict, result.speedup, lambda s: s))
    if latency.max_p95_ms is not None:
        verdicts.append(_at_most("latency.max_p95_ms", result.latency_ms.p95, latency.max_p95_ms, "ms"))
    if latency.min_decode_speedup is not None:
        speedup = baseline.generation.decode_ms_per_token / result.generation.decode_ms_per_token
        verdicts.append(_at_least("latency.min_decode_speedup", speedup, latency.min_decode_speedup, "x"))
    if latency.min_tokens_per_s is not None:
        verdicts.append(_at_least("latency.min_tokens_per_s", result.generation.tokens_per_s,
                                  latency.min_tokens_per_s, " tokens/s"))
    if goals.size.max_ratio is not None:
        ratio = result.size_mb / baseline.size_mb
        verdicts.append(_at_most("size.max_ratio", ratio, goals.size.max_ratio, "x"))
    if goals.memory.max_ratio is not None:
        if baseline.memory is None or result.memory is None:
            raise UserError("goals.memory.max_ratio: peak memory was not measured (benchmark.memory is off)")
        ratio = result.memory.peak_rss_mb / baseline.memory.peak_rss_mb
        verdicts.append(_at_most("memory.max_ratio", ratio, goals.memory.max_ratio, "x"))
    return verdicts


def _two_standard_errors(metric: str, baseline: BaselineSide, result: ResultSide) -> Optional[float]:
    """Twice the standard error of the difference between the sides, where both report one (lm-eval task
    metrics). The sides score the same documents, so their errors are correlated and this overstates the
    difference's own error: a change beyond it is significant, one inside it may still be."""
    if metric not in baseline.metric_stderr or metric not in result.metric_stderr:
        return None
    return 2.0 * (baseline.metric_stderr[metric] ** 2 + result.metric_stderr[metric] ** 2) ** 0.5


def _significance(row: GateRow, spread: Optional[float]) -> GateRow:
    """Mark a worsening within two standard errors as not significant: the verdict stands, as goals are
    promises, but a reader learns that the documents scored cannot tell the sides apart."""
    if spread is None:
        return row
    row.interval = (row.measured - spread, row.measured + spread)
    row.significant = abs(row.measured) > spread
    if not row.significant:
        row.note = (f"the change ({row.measured:.4g}{row.unit}) is within two standard errors ({spread:.4g}{row.unit}) "
                    "of the documents scored: not significant; raise lm_eval.limit to tell the sides apart")
    return row


# Below this share of top-1 predictions agreeing with the baseline, a language model that "improves"
# perplexity is not a better model but a broken evaluation (a missing BOS token, text the baseline
# cannot read): it is reported as a suspect evaluation, which fails the run.
SUSPECT_AGREEMENT = 0.5


def check_evaluation(task: str, baseline: BaselineSide, result: ResultSide) -> list[GateRow]:
    """Whether the evaluation can be trusted: for language models, perplexity that improves while the
    top-1 predictions stop agreeing with the baseline's is a contradiction, not a pass."""
    if task != "text-generation":
        return []
    agreement = result.metrics["top1_agreement"]
    base, cand = baseline.metrics["perplexity"], result.metrics["perplexity"]
    row = GateRow(goal="evaluation.consistent", threshold=SUSPECT_AGREEMENT, measured=agreement,
                  passed=True, margin=agreement - SUSPECT_AGREEMENT)
    if cand <= base and agreement < SUSPECT_AGREEMENT:
        row.passed = False
        row.note = (f"suspect evaluation: perplexity improved ({base:.4g} -> {cand:.4g}) while only "
                    f"{agreement:.1%} of the result's top-1 predictions agree with the baseline's; check the "
                    "evaluation text, max_length and the tokenizer's BOS token before trusting either figure")
    elif cand > base:
        row.margin = float("inf")  # perplexity got worse: agreement alone is the fidelity goal's business
    return [row]


def check_coverage(stage_records: list[dict], min_coverage: float) -> list[GateRow]:
    """A row per weight-changing stage: of the transformer blocks' linear weights its config targets, the share
    it changed (anatomy.coverage). A stage that changed less than `min_coverage` of them fails the run: a
    skipped layer type (experts, say) must not read as a pass."""
    rows = []
    for index, record in enumerate(stage_records):
        if "block_weights_changed_share" not in record:
            continue
        targeted = 1.0 - record.get("block_weights_excluded_share", 0.0)
        if targeted <= 0:
            continue
        share = record["block_weights_changed_share"] / targeted
        row = _at_least(f"coverage.stages[{index}].{record['type']}", round(share, 4), min_coverage)
        if not row.passed:
            row.note = (f"stages[{index}] ({record['type']}) changed {share:.0%} of the block weights it targets; "
                        "see its record and notes")
        rows.append(row)
    return rows


def _with_interval(verdict: GateRow, estimate: Optional[Speedup], to_measured) -> GateRow:
    """Attach the speed-up's confidence interval, mapped into the goal's units, and whether the
    threshold still lies inside it (a marginal verdict)."""
    if estimate is None:
        return verdict
    low, high = sorted(to_measured(v) for v in estimate.interval)
    verdict.interval = (low, high)
    verdict.marginal = low < verdict.threshold < high
    return verdict


def machine_facts_known(environment: Environment) -> bool:
    """Reports written before schema 2 carry no CPU model or ISA flags."""
    return environment.cpu_model != "unknown" or bool(environment.isa_flags)


def machine_differences(before: Report, now: Environment) -> list[str]:
    """What differs between the machine a stored report was timed on and this one, in the facts that
    move speed-ups: CPU model and ISA extensions (int8 speed-ups differ up to 3x between AVX2 and
    AVX-512 VNNI), threads, device and GPU. Facts the stored report does not record are not compared."""
    then = before.environment
    threads = then.threads if then.threads is not None else before.benchmark.threads
    pairs = [("threads", threads, now.threads), ("device", then.device, now.device), ("GPU", then.gpu, now.gpu)]
    if machine_facts_known(then):
        pairs = [("CPU", then.cpu_model, now.cpu_model),
                 ("CPU extensions", " ".join(then.isa_flags) or "unknown", " ".join(now.isa_flags) or "unknown"),
                 ] + pairs
    return [f"{label}: {old} then, {new} now" for label, old, new in pairs if old != new]


def speedup_thresholds(goals, previous: Optional[Report], same_machine: bool = True) -> list[float]:
    """The speed-ups at which a latency verdict flips: latency.min_speedup, and the speed-up below
    which goals.regression.max_latency_increase fails against a stored report of the same machine."""
    thresholds = []
    if goals.latency.min_speedup is not None:
        thresholds.append(goals.latency.min_speedup)
    if previous is not None and same_machine and goals.regression.max_latency_increase is not None:
        before = previous.baseline.latency_ms.p50 / previous.result.latency_ms.p50
        thresholds.append(before / (1.0 + goals.regression.max_latency_increase))
    return thresholds


def load_report(path: Path, what: str = "report") -> Report:
    """A report.json validated against the schema; a bad file is a user error naming the field."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable report.json ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a compress report.json (a JSON object is expected)")
    version = data.setdefault("schema_version", 1)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise UserError(f"{path}: schema_version {version!r} is newer than this compress reads ({SCHEMA_VERSION}); "
                        "upgrade compress")
    try:
        return Report.model_validate(data)
    except ValidationError as exc:
        problems = [f"{format_path(e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise UserError(f"{path}: not a valid compress report.json: " + "; ".join(problems)) from None


def load_previous(path: Path, task: str) -> Report:
    """A report.json from an earlier run of the same task, to compare against."""
    previous = load_report(path, "--against report")
    if previous.task != task:
        raise UserError(f"{path}: a {previous.task} report; this recipe's task is {task}")
    if MAIN_METRIC[task] not in previous.result.metrics:
        raise UserError(f"{path}: result.metrics has no {MAIN_METRIC[task]} to compare with")
    return previous


def check_regression(regression, task: str, previous: Report, baseline: BaselineSide, result: ResultSide,
                     differences: list[str]) -> list[GateRow]:
    """Goals relative to a stored report: slow-down of the speed-up over each run's baseline, and the
    worsening of the task's main metric. A latency regression against a report timed on another machine
    is reported but not judged: the same model's speed-up differs by machine, not by regression."""
    verdicts = []
    if regression.max_latency_increase is not None:
        before = previous.baseline.latency_ms.p50 / previous.result.latency_ms.p50
        now = baseline.latency_ms.p50 / result.latency_ms.p50
        verdict = _at_most("regression.latency_increase", before / now - 1.0, regression.max_latency_increase)
        verdict = _with_interval(verdict, result.speedup, lambda s: before / s - 1.0)
        if differences:
            verdict.passed, verdict.judged, verdict.marginal = True, False, False
            verdict.note = "not judged: the stored report was timed on another machine (" + "; ".join(differences) + ")"
        verdicts.append(verdict)
    if regression.max_accuracy_drop is not None:
        metric = MAIN_METRIC[task]
        before, now = previous.result.metrics[metric], result.metrics[metric]
        worse = (before - now) if higher_is_better(metric) else (now - before)
        verdicts.append(_at_most(f"regression.{metric}.drop", worse, regression.max_accuracy_drop))
    return verdicts
