"""The run folder's documents: report.json, report.md, junit.xml and manifest.json."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional
from xml.etree import ElementTree as ET

from . import machine
from .artifacts import AotiModel, Artifact, EngineModel, OnnxModel, sha256_file
from .machine import package_versions
from .report_schema import (BaselineSide, BenchmarkInfo, Classes, Environment, EvaluationInfo, GateRow, Report,
                            ResultSide, StageRecord)

def environment(threads: Optional[int] = None, device: str = "cpu") -> Environment:
    return Environment(**machine.describe(), threads=threads, device=device, packages=package_versions())


# Above this share of the CPU used by other processes during timing, latency figures are suspect.
BUSY_MACHINE_SHARE = 0.25


def build_report(recipe, checkpoint: Path, baseline: BaselineSide, result: ResultSide, gate: list[GateRow],
                 stages: list[StageRecord], evaluated: int, data_source: str, env: Environment,
                 other_cpu_share: float | None = None, remeasured_seconds: float = 0.0, benchmark=None) -> Report:
    """`benchmark`: the settings the timing used, when they differ from the recipe's."""
    benchmark = benchmark or recipe.benchmark
    notes = []
    if other_cpu_share is not None and other_cpu_share > BUSY_MACHINE_SHARE:
        notes.append(f"other processes used {other_cpu_share:.0%} of the CPU while latency was measured; "
                     "runtimes slow down unequally on a busy machine, so rerun latency goals on an idle one")
    for goal in gate:
        if goal.marginal:
            low, high = goal.interval
            verdict = "pass" if goal.passed else "fail"
            notes.append(f"{goal.goal} is marginal: its {recipe.benchmark.confidence:.0%} interval "
                         f"[{low:.4g}, {high:.4g}] still holds the threshold {goal.threshold:.4g} after "
                         f"{remeasured_seconds:.0f} s of re-measuring, so the verdict ({verdict}) rests on the "
                         "point estimate and may differ between runs")
        if goal.note:
            notes.append(f"{goal.goal}: {goal.note}")
    notes += [note for stage in stages for note in stage.notes]
    if (checkpoint / "fixture.json").exists():
        note = json.loads((checkpoint / "fixture.json").read_text()).get("note")
        if note:
            notes.append(note)
    return Report(
        recipe=recipe.name, recipe_file=recipe.source, model=str(checkpoint), task=recipe.task,
        verdict="pass" if all(g.passed for g in gate) else "fail", baseline=baseline, result=result, gate=gate,
        stages=stages,
        evaluation=EvaluationInfo(samples=evaluated, data=data_source, max_length=recipe.evaluation.max_length),
        benchmark=BenchmarkInfo(**benchmark.model_dump(), other_cpu_share=other_cpu_share,
                                remeasured_seconds=round(remeasured_seconds, 2)),
        notes=notes, environment=env, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def build_manifest(recipe, checkpoint: Path, artifact: Artifact, folder: Path, checkpoint_digest: str) -> dict:
    files = artifact.files() if isinstance(artifact, (OnnxModel, EngineModel, AotiModel)) else sorted(
        p for p in artifact.path.rglob("*") if p.is_file())
    return {
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": recipe.source,
        "checkpoint": {"path": str(checkpoint), "digest": checkpoint_digest},
        "artifact": {str(p.relative_to(folder)): sha256_file(p) for p in files},
        "packages": package_versions(),
        "machine": machine.describe(),
    }


def _fmt(value) -> str:
    if isinstance(value, (dict, list)) and len(value) > 8:
        return f"({len(value)} entries, see report.json)"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def measured_text(goal: GateRow) -> str:
    """The measured value, with its confidence interval where the goal has one."""
    text = f"{_fmt(goal.measured)}{goal.unit}"
    if goal.interval:
        low, high = goal.interval
        text += f" [{_fmt(low)}, {_fmt(high)}]"
    return text


def verdict_text(goal: GateRow) -> str:
    if not goal.judged:
        return "not judged"
    verdict = "pass" if goal.passed else "**FAIL**"
    if goal.significant is False:
        verdict += " (not significant)"
    return verdict + " (marginal)" if goal.marginal else verdict


def _with_error(side, name: str) -> str:
    text = _fmt(side.metrics.get(name, float("nan")))
    return text + f" ± {_fmt(side.metric_stderr[name])}" if name in side.metric_stderr else text


def machine_text(env: Environment) -> str:
    flags = " ".join(env.isa_flags) or "unknown"
    gpu = f", GPU {env.gpu}" if env.gpu else ""
    return f"{env.cpu_model} ({env.cpu_count} CPUs; {flags}){gpu}"


def markdown(report: Report) -> str:
    base, res = report.baseline, report.result
    lines = [f"# {report.recipe}: {report.verdict.upper()}", "",
             f"Model `{report.model}`, task {report.task}, evaluated on {report.evaluation.samples} "
             f"samples of `{report.evaluation.data}`. Machine: {machine_text(report.environment)}.", "",
             "## Gate", "", "| goal | measured | threshold | margin | result |", "|---|---|---|---|---|"]
    for g in report.gate:
        lines.append(f"| {g.goal} | {measured_text(g)} | {_fmt(g.threshold)}{g.unit} "
                     f"| {_fmt(g.margin)} | {verdict_text(g)} |")
    lines += ["", "## Baseline vs result", "", "| | baseline | result |", "|---|---|---|",
              f"| model | {base.model} | {report.recipe} |"]
    for name in base.metrics:
        if "[" not in name:  # per-class scores have their own table below
            lines.append(f"| {name} | {_with_error(base, name)} | {_with_error(res, name)} |")
    for q in ("p50", "p90", "p95", "p99"):
        lines.append(f"| latency {q} (ms) | {_fmt(getattr(base.latency_ms, q))} | {_fmt(getattr(res.latency_ms, q))} |")
    lines.append(f"| throughput (samples/s) | {_fmt(base.latency_ms.throughput)} | {_fmt(res.latency_ms.throughput)} |")
    lines.append(f"| size (MB) | {_fmt(base.size_mb)} | {_fmt(res.size_mb)} |")
    if base.generation and res.generation:
        gen = (base.generation, res.generation)
        lines.append(f"| time to first token (ms, {gen[0].prompt_tokens}-token prompt) "
                     f"| {_fmt(gen[0].time_to_first_token_ms)} | {_fmt(gen[1].time_to_first_token_ms)} |")
        lines.append(f"| decode per token (ms) | {_fmt(gen[0].decode_ms_per_token)} "
                     f"| {_fmt(gen[1].decode_ms_per_token)} |")
        lines.append(f"| tokens/s (batch 1, {gen[0].new_tokens} new) | {_fmt(gen[0].tokens_per_s)} "
                     f"| {_fmt(gen[1].tokens_per_s)} |")
    if base.memory and res.memory:
        peaks = [f"{m.peak_rss_mb:.0f} ({m.runtime_rss_mb:.0f} the runtime)" for m in (base.memory, res.memory)]
        lines.append(f"| peak memory (MB) | {peaks[0]} | {peaks[1]} |")
        if base.memory.cuda_peak_mb is not None and res.memory.cuda_peak_mb is not None:
            lines.append(f"| CUDA peak allocated (MB) | {base.memory.cuda_peak_mb:.0f} "
                         f"| {res.memory.cuda_peak_mb:.0f} |")
    lines.append(f"| backend | {base.backend} | {res.backend} |")
    bench, speedup = report.benchmark, res.speedup
    timed = f"{speedup.rounds} interleaved rounds of calls" if speedup else f"{bench.iterations} interleaved calls"
    lines += ["", f"Latency: batch {bench.batch_size}, {bench.seq_len} tokens, {bench.threads} threads, "
              f"{timed} after {bench.warmup} warm-up calls"
              + (f" ({bench.remeasured_seconds:.0f} s of it re-measuring a close call)"
                 if bench.remeasured_seconds else "") + "."
              + (f" Speed-up {speedup.speedup:.3f}x, {speedup.confidence:.0%} bootstrap interval "
                 f"[{speedup.interval[0]:.3f}, {speedup.interval[1]:.3f}]." if speedup else ""), ""]
    if base.classes and res.classes:
        lines += classes_markdown(base.classes, res.classes)
    lines += ["## Stages", "", "| stage | seconds | cache | details |", "|---|---|---|---|"]
    for stage in report.stages:
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in stage.details().items())
        cache = "stored" if stage.cache_key else "-"
        if stage.cached:
            cache = (f"reused `{stage.cache_key}` (stored {stage.cached_from}, the stage took "
                     f"{stage.stage_seconds} s)")
        lines.append(f"| {stage.type} | {stage.seconds} | {cache} | {details} |")
    if report.against:
        against = report.against
        lines += ["", f"Compared with `{against.report}` ({against.recipe}, {against.created}, {against.verdict})"
                  + ("; timed on another machine: " + "; ".join(against.machine_differences)
                     if against.same_machine is False else "") + "."]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    lines += ["", f"Artifact: `{res.artifact}`", ""]
    return "\n".join(lines)


def classes_markdown(base: Classes, res: Classes) -> list[str]:
    """Per-class precision / recall / F1 of both sides, and each side's confusion matrix."""
    lines = ["## Classes", "", "| class | support | precision | recall | F1 |", "|---|---|---|---|---|"]
    result_rows = {row.label: row for row in res.rows}
    for row in base.rows:
        other = result_rows.get(row.label)
        pair = (lambda key: f"{getattr(row, key):.4f} -> {getattr(other, key):.4f}" if other else
                f"{getattr(row, key):.4f} -> -")
        lines.append(f"| {row.label} | {row.support} | {pair('precision')} | {pair('recall')} | {pair('f1')} |")
    lines += ["", "Baseline -> result. Confusion matrices (rows: true class, columns: predicted):", ""]
    for side, table in (("baseline", base), ("result", res)):
        labels = [row.label for row in table.rows]
        lines += [f"| {side} | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(str(n) for n in counts) + " |"
                  for label, counts in zip(labels, table.confusion)]
        lines.append("")
    return lines


def junit(report: Report) -> str:
    failures = sum(1 for g in report.gate if not g.passed)
    skipped = sum(1 for g in report.gate if not g.judged)
    suite = ET.Element("testsuite", name=f"compress.{report.recipe}", tests=str(len(report.gate)),
                       failures=str(failures), errors="0", skipped=str(skipped))
    for g in report.gate:
        case = ET.SubElement(suite, "testcase", classname=f"compress.{report.recipe}", name=g.goal)
        if not g.judged:
            ET.SubElement(case, "skipped", message=g.note or "not judged")
        elif not g.passed:
            failure = ET.SubElement(case, "failure", message=f"measured {measured_text(g)}, threshold "
                                    f"{_fmt(g.threshold)}{g.unit}, margin {_fmt(g.margin)}"
                                    + (" (marginal: the interval holds the threshold)" if g.marginal else ""))
            failure.text = g.model_dump_json()
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"


def write_all(folder: Path, report: Report, manifest: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report.as_json(), indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    (folder / "junit.xml").write_text(junit(report))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
