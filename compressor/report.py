"""The run folder's documents: report.json, report.md, junit.xml and manifest.json."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from xml.etree import ElementTree as ET

from . import __version__
from .artifacts import Artifact, EngineModel, OnnxModel, TorchModel, sha256_file

PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu", "peft",
            "bitsandbytes", "tensorrt", "numpy", "pydantic")


def package_versions() -> dict[str, str]:
    versions = {"compress": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or "unknown", "cpu_count": os.cpu_count(),
            "packages": package_versions()}


# Above this share of the CPU used by other processes during timing, latency figures are suspect.
BUSY_MACHINE_SHARE = 0.25


def build_report(recipe, checkpoint: Path, baseline: dict, result: dict, gate: list, stages: list,
                 evaluated: int, data_source: str, other_cpu_share: float | None = None,
                 remeasured_seconds: float = 0.0) -> dict:
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
    notes += [note for stage in stages for note in stage.get("notes", [])]
    if (checkpoint / "fixture.json").exists():
        note = json.loads((checkpoint / "fixture.json").read_text()).get("note")
        if note:
            notes.append(note)
    return {
        "recipe": recipe.name,
        "recipe_file": recipe.source,
        "model": str(checkpoint),
        "task": recipe.task,
        "verdict": "pass" if all(g.passed for g in gate) else "fail",
        "baseline": baseline,
        "result": result,
        "gate": [g.as_dict() for g in gate],
        "stages": stages,
        "evaluation": {"samples": evaluated, "data": data_source,
                       "max_length": recipe.evaluation.max_length},
        "benchmark": {**recipe.benchmark.model_dump(), "other_cpu_share": other_cpu_share,
                      "remeasured_seconds": round(remeasured_seconds, 2)},
        "notes": notes,
        "environment": environment(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def build_manifest(recipe, checkpoint: Path, artifact: Artifact, folder: Path) -> dict:
    files = artifact.files() if isinstance(artifact, (OnnxModel, EngineModel)) else sorted(
        p for p in artifact.path.rglob("*") if p.is_file())
    return {
        "recipe": recipe.model_dump(mode="json"),
        "recipe_file": recipe.source,
        "checkpoint": {"path": str(checkpoint), "digest": TorchModel(checkpoint, recipe.task).digest()},
        "artifact": {str(p.relative_to(folder)): sha256_file(p) for p in files},
        "packages": package_versions(),
        "machine": {k: v for k, v in environment().items() if k != "packages"},
    }


def _fmt(value) -> str:
    if isinstance(value, (dict, list)) and len(value) > 8:
        return f"({len(value)} entries, see report.json)"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _measured(goal: dict) -> str:
    """The measured value, with its confidence interval where the goal has one."""
    text = f"{_fmt(goal['measured'])}{goal['unit']}"
    if goal.get("interval"):
        low, high = goal["interval"]
        text += f" [{_fmt(low)}, {_fmt(high)}]"
    return text


def _verdict(goal: dict) -> str:
    verdict = "pass" if goal["passed"] else "**FAIL**"
    return verdict + " (marginal)" if goal.get("marginal") else verdict


def markdown(report: dict) -> str:
    base, res = report["baseline"], report["result"]
    lines = [f"# {report['recipe']}: {report['verdict'].upper()}", "",
             f"Model `{report['model']}`, task {report['task']}, evaluated on {report['evaluation']['samples']} "
             f"samples of `{report['evaluation']['data']}`.", "",
             "## Gate", "", "| goal | measured | threshold | margin | result |", "|---|---|---|---|---|"]
    for g in report["gate"]:
        lines.append(f"| {g['goal']} | {_measured(g)} | {_fmt(g['threshold'])}{g['unit']} "
                     f"| {_fmt(g['margin'])} | {_verdict(g)} |")
    lines += ["", "## Baseline vs result", "", "| | baseline | result |", "|---|---|---|"]
    if "model" in base:
        lines.append(f"| model | {base['model']} | {report['recipe']} |")
    for name in base["metrics"]:
        lines.append(f"| {name} | {_fmt(base['metrics'][name])} | {_fmt(res['metrics'][name])} |")
    for q in ("p50", "p90", "p95", "p99"):
        lines.append(f"| latency {q} (ms) | {_fmt(base['latency_ms'][q])} | {_fmt(res['latency_ms'][q])} |")
    lines.append(f"| throughput (samples/s) | {_fmt(base['latency_ms']['throughput'])} "
                 f"| {_fmt(res['latency_ms']['throughput'])} |")
    lines.append(f"| size (MB) | {_fmt(base['size_mb'])} | {_fmt(res['size_mb'])} |")
    lines.append(f"| backend | {base['backend']} | {res['backend']} |")
    bench = report["benchmark"]
    speedup = res.get("speedup")
    timed = (f"{speedup['rounds']} interleaved rounds of calls" if speedup
             else f"{bench['iterations']} interleaved calls")
    lines += ["", f"Latency: batch {bench['batch_size']}, {bench['seq_len']} tokens, {bench['threads']} threads, "
              f"{timed} after {bench['warmup']} warm-up calls"
              + (f" ({bench['remeasured_seconds']:.0f} s of it re-measuring a close call)"
                 if bench.get("remeasured_seconds") else "") + "."
              + (f" Speed-up {speedup['speedup']:.3f}x, {speedup['confidence']:.0%} bootstrap interval "
                 f"[{speedup['interval'][0]:.3f}, {speedup['interval'][1]:.3f}]." if speedup else ""), "",
              "## Stages", "", "| stage | seconds | cache | details |", "|---|---|---|---|"]
    hidden = ("type", "seconds", "cached", "notes", "cache_key", "cached_from", "stage_seconds")
    for stage in report["stages"]:
        details = ", ".join(f"{k}={_fmt(v)}" for k, v in stage.items() if k not in hidden)
        cache = "stored" if stage.get("cache_key") else "-"
        if stage.get("cached"):
            cache = (f"reused `{stage['cache_key']}` (stored {stage['cached_from']}, the stage took "
                     f"{stage['stage_seconds']} s)")
        lines.append(f"| {stage['type']} | {stage['seconds']} | {cache} | {details} |")
    if report["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    lines += ["", f"Artifact: `{res['artifact']}`", ""]
    return "\n".join(lines)


def junit(report: dict) -> str:
    failures = sum(1 for g in report["gate"] if not g["passed"])
    suite = ET.Element("testsuite", name=f"compress.{report['recipe']}", tests=str(len(report["gate"])),
                       failures=str(failures), errors="0")
    for g in report["gate"]:
        case = ET.SubElement(suite, "testcase", classname=f"compress.{report['recipe']}", name=g["goal"])
        if not g["passed"]:
            failure = ET.SubElement(case, "failure", message=f"measured {_measured(g)}, threshold "
                                    f"{_fmt(g['threshold'])}{g['unit']}, margin {_fmt(g['margin'])}"
                                    + (" (marginal: the interval holds the threshold)" if g.get("marginal") else ""))
            failure.text = json.dumps(g)
    return ET.tostring(ET.ElementTree(suite).getroot(), encoding="unicode", xml_declaration=True) + "\n"


def write_all(folder: Path, report: dict, manifest: dict) -> None:
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (folder / "report.md").write_text(markdown(report))
    (folder / "junit.xml").write_text(junit(report))
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
