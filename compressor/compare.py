"""compress compare: several recipes against one baseline, evaluated on the same samples and timed
together in one process, with a Pareto table, a plot and compare.json.

The baseline is evaluated and timed once. Every recipe's artifact is evaluated on the same samples
and all of them are timed in one interleaved benchmark with the baseline, so their latencies are
comparable with each other, not only with the baseline. Each recipe still gets its own gate and
run folder (OUT/RECIPE_NAME/ with report.json, report.md, junit.xml and the artifact).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .evaluate import MAIN_METRIC, higher_is_better
from .pipeline import RunOptions, baseline_key, execute, prepare
from .progress import Progress, Silent
from .recipe import Recipe, load_recipe
from .report_schema import Report
from .run_folder import RunFolder

BASELINE = "baseline"


@dataclass
class CompareResult:
    out: Path
    summary: dict
    any_passed: bool


def read_recipe_list(path: Path) -> list[Path]:
    """A .txt file naming recipes, one per line, relative to the file's folder; # starts a comment."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UserError(f"{path}: cannot read recipe list: {exc.strerror}") from None
    names = [line.split("#", 1)[0].strip() for line in lines]
    paths = [path.parent / name for name in names if name]
    if not paths:
        raise UserError(f"{path}: names no recipe")
    return paths


def load_recipes(arguments: list[Path]) -> list[Recipe]:
    paths = [p for argument in arguments
             for p in (read_recipe_list(argument) if argument.suffix == ".txt" else [argument])]
    return [load_recipe(p) for p in paths]


def check_comparable(recipes: list[Recipe]) -> None:
    """Recipes compared in one table must share task, evaluation, benchmark and baseline."""
    if len(recipes) < 2:
        raise UserError("compare needs at least two recipes")
    first = recipes[0]
    names = [r.name for r in recipes]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated or BASELINE in names:
        raise UserError(f"compare: recipe names must be unique and not {BASELINE!r} (they name the run folders); "
                        f"repeated: {', '.join(repeated) or BASELINE}")
    for recipe in recipes[1:]:
        for field in ("task", "evaluation", "benchmark"):
            ours, theirs = getattr(first, field), getattr(recipe, field)
            if ours != theirs:
                raise UserError(f"{recipe.source}: {field} differs from {first.source}'s; recipes compared together "
                                f"must be evaluated and timed the same way")
        if baseline_key(recipe) != baseline_key(first):
            raise UserError(f"{recipe.source}: its baseline differs from {first.source}'s (a recipe that starts with "
                            "merge_lora is judged against its adapters unmerged); compare them separately")


def pareto_frontier(points: dict[str, tuple[float, float]], higher_is_better: bool) -> set[str]:
    """Names of the points (quality, latency) that no other point beats on one axis without losing on
    the other."""
    def at_least_as_good(a, b):
        better_quality = a[0] >= b[0] if higher_is_better else a[0] <= b[0]
        return better_quality and a[1] <= b[1]

    return {name for name, point in points.items()
            if not any(other != point and at_least_as_good(other, point) for other in points.values())}


def compare(recipes: list[Recipe], model: str | Path, options: RunOptions, progress: Progress = Silent()
            ) -> CompareResult:
    check_comparable(recipes)
    prepared = prepare(recipes, model, options)
    with RunFolder(options.out) as folder:
        outcomes = execute(prepared, folder.partial, folder.out, progress, nested=True)
        reports = [outcome.report for outcome in outcomes]
        summary = summarize(recipes[0].task, reports)
        write_comparison(folder.partial, summary)
        (folder.partial / "manifest.json").write_text(json.dumps(
            {"compare": [r.source for r in recipes], "checkpoint": str(prepared.checkpoint)}, indent=2) + "\n")
        folder.commit()
    return CompareResult(folder.out, summary, any(outcome.passed for outcome in outcomes))


def summarize(task: str, reports: list[Report]) -> dict:
    metric = MAIN_METRIC[task]
    baseline = reports[0].baseline
    rows = [{"recipe": BASELINE, "model": baseline.model, "metric": baseline.metrics[metric],
             "latency_p50_ms": baseline.latency_ms.p50, "latency_p95_ms": baseline.latency_ms.p95,
             "speedup": 1.0, "size_mb": baseline.size_mb, "size_ratio": 1.0, "verdict": "-",
             "peak_memory_mb": baseline.memory.peak_rss_mb if baseline.memory else None,
             "tokens_per_s": baseline.generation.tokens_per_s if baseline.generation else None,
             "backend": baseline.backend}]
    for report in reports:
        result = report.result
        rows.append({"recipe": report.recipe, "recipe_file": report.recipe_file,
                     "metric": result.metrics[metric], "metrics": result.metrics,
                     "latency_p50_ms": result.latency_ms.p50, "latency_p95_ms": result.latency_ms.p95,
                     "speedup": baseline.latency_ms.p50 / result.latency_ms.p50,
                     "speedup_interval": list(result.speedup.interval) if result.speedup else None,
                     "marginal": any(g.marginal for g in report.gate),
                     "size_mb": result.size_mb, "size_ratio": result.size_mb / baseline.size_mb,
                     "peak_memory_mb": result.memory.peak_rss_mb if result.memory else None,
                     "tokens_per_s": result.generation.tokens_per_s if result.generation else None,
                     "verdict": report.verdict,
                     "failed_goals": [g.goal for g in report.gate if not g.passed],
                     "backend": result.backend, "report": f"{report.recipe}/report.json"})
    frontier = pareto_frontier({row["recipe"]: (row["metric"], row["latency_p50_ms"]) for row in rows},
                               higher_is_better(metric))
    for row in rows:
        row["pareto"] = row["recipe"] in frontier
    rows.sort(key=lambda row: row["latency_p50_ms"])
    first = reports[0]
    return {"task": task, "metric": metric, "higher_is_better": higher_is_better(metric),
            "model": first.model, "evaluation": first.evaluation.model_dump(),
            "benchmark": first.benchmark.model_dump(),
            "machine": first.environment.model_dump(exclude={"packages"}),
            "other_cpu_share": first.benchmark.other_cpu_share, "recipes": [r for r in rows if r["recipe"] != BASELINE],
            "baseline": next(r for r in rows if r["recipe"] == BASELINE), "rows": rows}


def write_comparison(folder: Path, summary: dict) -> None:
    (folder / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, folder / "compare.png")
    (folder / "compare.md").write_text(markdown(summary))


def markdown(summary: dict) -> str:
    metric = summary["metric"]
    direction = "higher" if summary["higher_is_better"] else "lower"
    bench = summary["benchmark"]
    lines = [f"# compare: {len(summary['recipes'])} recipes on `{summary['model']}`", "",
             f"{metric} ({direction} is better) on {summary['evaluation']['samples']} samples of "
             f"`{summary['evaluation']['data']}`; latency p50 at batch {bench['batch_size']} x {bench['seq_len']} "
             f"tokens, {bench['threads']} threads, every model timed in one interleaved benchmark. "
             "Pareto: not beaten on both accuracy and latency by another row.", "",
             "![accuracy vs latency](compare.png)", "",
             f"| recipe | {metric} | p50 ms | speed-up | tokens/s | size MB | size ratio | peak memory MB | gate "
             "| Pareto |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in summary["rows"]:
        gate = row["verdict"] if row["verdict"] != "fail" else "**fail** (" + ", ".join(row["failed_goals"]) + ")"
        gate += " (marginal)" if row.get("marginal") else ""
        tokens = "-" if row.get("tokens_per_s") is None else f"{row['tokens_per_s']:.1f}"
        lines.append(f"| {row['recipe']} | {row['metric']:.4f} | {row['latency_p50_ms']:.2f} | {row['speedup']:.2f}x "
                     f"| {tokens} | {row['size_mb']:.1f} | {row['size_ratio']:.3f} | {_memory(row)} | {gate} "
                     f"| {'yes' if row['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def _memory(row: dict) -> str:
    peak = row.get("peak_memory_mb")
    return "-" if peak is None else f"{peak:.0f}"


def plot(summary: dict, path: Path) -> None:
    import matplotlib  # heavy and optional for everything else: imported only to draw

    matplotlib.use("Agg")  # no display; a file only
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    figure, axes = plt.subplots(figsize=(9, 6), dpi=120)
    xs, ys = [r["latency_p50_ms"] for r in rows], [r["metric"] for r in rows]
    x_max = max(xs) * 1.45  # room for labels right of the slowest point
    y_low, y_high = min(ys), max(ys)
    y_pad = max(y_high - y_low, abs(y_high) * 1e-3) * 0.12
    axes.set_xlim(0, x_max)
    axes.set_ylim(y_low - y_pad, y_high + y_pad)
    def fraction(row):  # a point's position as a fraction of the axes
        return (row["latency_p50_ms"] / x_max, (row["metric"] - y_low + y_pad) / (y_high - y_low + 2 * y_pad))

    points = [fraction(row) for row in rows]
    placed: list[tuple[float, float]] = []
    for row in sorted(rows, key=lambda r: r["latency_p50_ms"]):
        colour = "#777777" if row["recipe"] == BASELINE else ("#2a9d3a" if row["verdict"] == "pass" else "#d1495b")
        axes.scatter(row["latency_p50_ms"], row["metric"], s=70, color=colour, zorder=3,
                     marker="s" if row["recipe"] == BASELINE else "o", edgecolors="black" if row["pareto"] else "none")
        offset = _label_offset(*fraction(row), placed, points)
        axes.annotate(row["recipe"], (row["latency_p50_ms"], row["metric"]), textcoords="offset points",
                      xytext=(8, offset), fontsize=8, va="center",
                      arrowprops={"arrowstyle": "-", "color": "#999999", "linewidth": 0.5} if offset else None)
    frontier = sorted((r for r in rows if r["pareto"]), key=lambda r: r["latency_p50_ms"])
    axes.plot([r["latency_p50_ms"] for r in frontier], [r["metric"] for r in frontier], color="#264653",
              linestyle="--", linewidth=1, zorder=2, label="Pareto frontier")
    axes.set_xlabel("latency p50 (ms, lower is better)")
    direction = "higher" if summary["higher_is_better"] else "lower"
    axes.set_ylabel(f"{summary['metric']} ({direction} is better)")
    axes.grid(True, alpha=0.3)
    axes.set_title(f"{summary['metric']} vs latency: green passes its gate, red fails, square = baseline",
                   fontsize=9)
    axes.legend(loc="best", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _label_offset(x: float, y: float, placed: list[tuple[float, float]], points: list[tuple[float, float]]) -> int:
    """A vertical offset in points for a label at axes fraction (x, y) that keeps it clear of labels
    already placed and of other points (labels run right of their point, about 0.3 of the width)."""
    step = 0.045  # one line of 8-point text, as a fraction of the axes height
    for offset in (0, 12, -12, 24, -24, 36, -36, 48, -48):
        label_y = y + offset * step / 12
        clear_of_labels = all(abs(label_y - other_y) > step or abs(x - other_x) > 0.3 for other_x, other_y in placed)
        clear_of_points = all(not (x < px <= x + 0.3 and abs(label_y - py) < 0.8 * step) for px, py in points)
        if clear_of_labels and clear_of_points:
            placed.append((x, label_y))
            return offset
    placed.append((x, y))
    return 0
