"""plan() checks a recipe's chain before heavy work; run() executes it, evaluates, benchmarks and gates."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .artifacts import Artifact, ArtifactKind, EngineModel, OnnxModel, TorchModel
from .errors import BackendMissing, UserError
from .progress import Progress, Silent
from .recipe import Recipe
from .stages import REGISTRY, Stage, StageContext

log = logging.getLogger(__name__)

HINTS = {("torch", "onnx"): "add an export_onnx stage before it",
         ("onnx", "torch"): "move it before export_onnx"}


@dataclass
class PlannedStage:
    index: int
    stage: Stage
    config: Any
    input_kind: ArtifactKind
    output_kind: ArtifactKind


def plan(recipe: Recipe) -> list[PlannedStage]:
    """Check artifact kinds between stages, per-stage constraints and backends; no model is loaded."""
    kind: ArtifactKind = "torch"
    planned = []
    for index, config in enumerate(recipe.stages):
        stage = REGISTRY[config.type]
        where = f"{recipe.where('stages', index)}: stages[{index}] ({config.type})"
        if kind not in stage.accepts:
            produced = "the checkpoint is" if index == 0 else f"stages[{index - 1}] outputs"
            need = " or ".join(stage.accepts)
            hint = HINTS.get((kind, stage.accepts[0]), "reorder the stages")
            raise UserError(f"{where} needs {_a(need)} model, but {produced} {_a(kind)} model; {hint}")
        problem = (stage.check(config, kind, recipe.task) or stage.check_order(config, recipe.stages[:index])
                   or stage.check_shapes(config, run_shapes(recipe)))
        if problem:
            raise UserError(f"{where}: {problem}")
        fixed = getattr(config, "static_axes", None) or {}
        bench = recipe.benchmark
        for axis, wanted in (("batch_size", bench.batch_size), ("sequence_length", bench.seq_len)):
            if axis in fixed and fixed[axis] != wanted:
                raise UserError(f"{where}: static_axes.{axis}={fixed[axis]} but the benchmark uses {wanted}; "
                                "make them equal or leave the axis dynamic")
        output = stage.output_kind(config, kind)
        planned.append(PlannedStage(index, stage, config, kind, output))
        kind = output
    _check_goal_metrics(recipe)
    # Backends last: a recipe's own mistakes (exit 2) are reported on any machine, not hidden behind
    # a missing package (exit 3).
    for step in planned:
        where = f"{recipe.where('stages', step.index)}: stages[{step.index}] ({step.config.type})"
        for module in step.stage.backends(step.config, step.input_kind):
            if importlib.util.find_spec(module.split(".")[0]) is None:
                raise BackendMissing(f"{where} needs the Python package {module.split('.')[0]!r}, "
                                     "which is not installed here")
        missing = step.stage.unavailable(step.config, step.input_kind)
        if missing:
            raise BackendMissing(f"{where}: {missing}")
    return planned


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeio' else 'a'} {word}"


def run_shapes(recipe: Recipe) -> dict[str, tuple[int, int]]:
    """The [batch, sequence] shapes a run feeds its result: the benchmark's, and evaluation's largest."""
    return {"benchmark": (recipe.benchmark.batch_size, recipe.benchmark.seq_len),
            "evaluation": (recipe.evaluation.batch_size, recipe.evaluation.max_length)}


def _check_goal_metrics(recipe: Recipe) -> None:
    from .evaluate import TASK_METRICS

    measured = TASK_METRICS[recipe.task]
    for index, goal in enumerate(recipe.goals.accuracy):
        if goal.metric not in measured:
            where = recipe.where("goals", "accuracy", index, "metric")
            raise UserError(f"{where}: goals.accuracy[{index}].metric: {recipe.task} measures "
                            f"{', '.join(measured)}, not {goal.metric!r}")


@dataclass
class RunOptions:
    out: Path
    allow_pickle: bool = False
    trust_remote_code: bool = False
    keep_intermediate: bool = False
    against: Optional[Path] = None  # a previous report.json that goals.regression compares with
    cache: bool = True  # store every finished stage in the stage cache
    resume: bool = False  # reuse stored stages whose key (input, config, versions) is unchanged
    device: str = "cpu"  # where runners execute: cpu or cuda
    torch_dtype: Optional[str] = None  # on cuda, torch results run in this dtype (the baseline stays float32)
    ort_provider: str = "cuda"  # on cuda, ONNX results run on ONNX Runtime's cuda or tensorrt provider

    def runner_args(self, threads: int) -> dict:
        """make_runner's arguments for the baseline; a result adds torch_dtype."""
        return {"threads": threads, "allow_pickle": self.allow_pickle, "trust_remote_code": self.trust_remote_code,
                "device": self.device, "ort_provider": self.ort_provider}


def check_device(options: RunOptions, steps: list[PlannedStage]) -> None:
    """Stop with exit 3 before any stage runs when --device cuda cannot be honoured here, and with exit
    2 when the result is an engine that would have to run on the CPU."""
    final = steps[-1].output_kind if steps else "torch"
    if options.device != "cuda":
        if final == "engine":
            raise UserError("the recipe builds a TensorRT engine, which runs on a GPU only; run with --device cuda")
        return
    from .doctor import cuda_problem, ort_provider_problem

    problem = cuda_problem()
    if problem:
        raise BackendMissing(f"--device cuda: {problem}")
    if final == "onnx":
        problem = ort_provider_problem(options.ort_provider)
        if problem:
            raise BackendMissing(f"--device cuda: {problem}")


@dataclass
class RunResult:
    out: Path
    report: dict
    passed: bool
    gate: list = field(default_factory=list)


def _place(artifact: Artifact, folder: Path) -> Artifact:
    """Move the final artifact into the run folder: model.onnx (with config and tokenizer) or model/."""
    if isinstance(artifact, (OnnxModel, EngineModel)):
        for item in artifact.folder.iterdir():
            shutil.move(str(item), folder / item.name)
        if isinstance(artifact, EngineModel):
            return EngineModel(folder / artifact.path.name, artifact.task)
        return OnnxModel(folder / artifact.path.name, artifact.task, with_past=artifact.with_past)
    target = folder / "model"
    if artifact.path.is_relative_to(folder):  # a stage's output inside this run: move, don't copy
        shutil.move(str(artifact.path), target)
    else:
        shutil.copytree(artifact.path, target)
    return TorchModel(target, artifact.task, transforms=artifact.transforms, module=artifact.module)


def _check_replaceable(out: Path) -> None:
    """Only an earlier run folder may be replaced; anything else at --out is the user's and stays."""
    if out.exists() and not (out / "manifest.json").exists():
        raise UserError(f"{out}: exists and is not a compress run folder; choose another --out")


def _commit(partial: Path, out: Path) -> None:
    """Rename the finished run folder into place, replacing an earlier run folder at the same path."""
    _check_replaceable(out)  # again: something may have appeared there while the run was busy
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)


def _check_calibration_sources(recipe: Recipe) -> None:
    """Read every stage's calibration source once, so a wrong path or field stops the run before
    any stage spends minutes on the model."""
    from .data import read

    for index, config in enumerate(recipe.stages):
        calibration = getattr(config, "calibration", None)
        if calibration is not None:
            try:
                read(calibration.data)
            except UserError as exc:
                raise UserError(f"{recipe.where('stages', index, 'calibration')}: stages[{index}].calibration: "
                                f"{exc}") from None


def _baseline(recipe: Recipe, source: TorchModel, runner_args: dict):
    """The runner, size and description of what the result is judged against: the checkpoint, or, for a
    recipe that starts by merging LoRA adapters, the checkpoint with those adapters attached unmerged,
    which is how the model would be served without this recipe."""
    from .runners import TorchRunner, make_runner

    first = recipe.stages[0]
    if first.type == "merge_lora":
        from .stages.merge_lora import load_unmerged, read_adapters

        adapters = read_adapters(first, source)
        wrapped = load_unmerged(first, source, runner_args["trust_remote_code"], adapters)
        runner = TorchRunner(wrapped.get_base_model(), recipe.task, name="baseline", threads=runner_args["threads"],
                             device=runner_args["device"])
        size = source.size_mb() + sum(adapter.size_mb() for adapter in adapters)
        return runner, size, f"checkpoint + {len(adapters)} LoRA adapter(s), unmerged (PEFT)"
    return make_runner(source, "baseline", **runner_args), source.size_mb(), "checkpoint"


def run_stages(recipe: Recipe, steps: list[PlannedStage], source: TorchModel, workroot: Path, options: RunOptions,
               progress: Progress = Silent()) -> tuple[Artifact, list[dict]]:
    """Run every planned stage in order, each in its own folder under `workroot`; return the last
    artifact and one record per stage for the report. With options.cache each finished stage is stored
    in the stage cache; with options.resume too, a stage whose key is stored is restored instead of run."""
    from . import cache

    artifact: Artifact = source
    records = []
    input_key = cache.checkpoint_key(source.path) if options.cache else ""
    for step in steps:
        ctx = StageContext(workroot / f"{step.index:02d}-{step.config.type}", recipe.task, recipe.benchmark.threads,
                           options.allow_pickle, options.trust_remote_code, progress=progress,
                           shapes=run_shapes(recipe))
        ctx.workdir.mkdir(parents=True)
        key = cache.stage_key(input_key, step.config, recipe.task, ctx.threads, ctx.trust_remote_code,
                              step.stage.cache_salt(step.config)) if options.cache else ""
        entry = cache.lookup(key) if options.cache and options.resume else None
        started = time.perf_counter()
        restored = cache.restore(entry, ctx.workdir) if entry else None
        if restored is not None:
            progress.phase(f"{recipe.name}: stage {step.index + 1}/{len(steps)}: {step.config.type} (cached)")
            artifact = restored
            stored = entry.meta["record"]
            records.append({**stored, "seconds": round(time.perf_counter() - started, 3), "cached": True,
                            "cache_key": key[:16], "cached_from": entry.meta["created"],
                            "stage_seconds": stored["seconds"]})
        else:
            progress.phase(f"{recipe.name}: stage {step.index + 1}/{len(steps)}: {step.config.type}")
            started = time.perf_counter()
            artifact = step.stage.run(step.config, artifact, ctx)
            seconds = time.perf_counter() - started
            log.info("stage %s done in %.1fs", step.config.type, seconds)
            record = {"type": step.config.type, "seconds": round(seconds, 3), "cached": False,
                      "output": artifact.kind, **ctx.details, **({"notes": ctx.notes} if ctx.notes else {})}
            if options.cache:
                stored = cache.store(key, artifact, ctx.workdir, record,
                                     {"recipe": recipe.name, "stage_index": step.index, "stage": step.config.type,
                                      "checkpoint": str(source.path)})
                if stored is not None:
                    record["cache_key"] = key[:16]
            records.append(record)
        input_key = key
    return artifact, records


@dataclass
class Baseline:
    """What every result is judged against, evaluated once."""

    runner: Any
    size_mb: float
    model: str
    evaluation: Any


@dataclass
class Measured:
    """What one interleaved benchmark found: every runner's latency, each candidate's speed-up estimate,
    the share of the CPU other processes used and the seconds spent re-measuring close calls."""

    latency: dict
    speedups: dict
    other_cpu_share: Optional[float]
    remeasured_seconds: float


def measure_latency(base_runner, candidates: list[tuple[Any, Recipe]], feed: dict, previous: Optional[dict],
                    progress: Progress) -> Measured:
    """Time the baseline and each (runner, recipe) candidate interleaved, re-measuring while a speed-up's
    confidence interval still holds one of its recipe's latency thresholds."""
    from .bench import OtherLoad, measure
    from .gate import speedup_thresholds

    runners = [base_runner] + [runner for runner, _ in candidates]
    thresholds = {runner.name: speedup_thresholds(recipe.goals, previous) for runner, recipe in candidates}
    with OtherLoad() as load:
        timings, speedups, extra = measure(runners, feed, candidates[0][1].benchmark, thresholds, progress)
    return Measured({name: timings.latency(name) for name in timings.names}, speedups, load.share, extra)


def judge(recipe: Recipe, checkpoint: Path, baseline: Baseline, runner, final: Artifact, evaluation,
          measured: Measured, records: list[dict], data_source: str, folder: Path, final_folder: Path,
          keep_intermediate: bool, previous: Optional[dict] = None, against: Optional[Path] = None
          ) -> tuple[dict, list]:
    """Gate one result against the baseline and write its run folder documents into `folder`, which
    will be renamed to `final_folder`; return the report and the per-goal verdicts."""
    from . import report as reporting
    from .gate import check_goals, check_regression

    latency = measured.latency
    base_side = {"model": baseline.model, "metrics": baseline.evaluation.metrics,
                 "latency_ms": latency[baseline.runner.name].as_dict(), "size_mb": round(baseline.size_mb, 3),
                 "backend": baseline.runner.backend}
    result_side = {"metrics": evaluation.metrics, "latency_ms": latency[runner.name].as_dict(),
                   "speedup": measured.speedups[runner.name].as_dict(),
                   "size_mb": round(final.size_mb(), 3), "backend": runner.backend,
                   "artifact": str(final_folder / final.path.relative_to(folder))}
    gate = check_goals(recipe.goals, base_side, result_side)
    regression = recipe.goals.regression
    if previous is not None:
        gate += check_regression(regression, recipe.task, previous, base_side, result_side)
    report = reporting.build_report(recipe, checkpoint, base_side, result_side, gate, records,
                                    evaluated=baseline.evaluation.samples, data_source=data_source,
                                    other_cpu_share=measured.other_cpu_share,
                                    remeasured_seconds=measured.remeasured_seconds)
    if previous is not None:
        report["against"] = {"report": str(against), "recipe": previous.get("recipe"),
                             "created": previous.get("created"), "verdict": previous.get("verdict")}
    elif regression.max_latency_increase is not None or regression.max_accuracy_drop is not None:
        report["notes"].append("goals.regression was not checked: run with --against PREVIOUS/report.json")
    if not keep_intermediate:
        shutil.rmtree(folder / "work", ignore_errors=True)
    reporting.write_all(folder, report, reporting.build_manifest(recipe, checkpoint, final, folder))
    return report, gate


def start_partial(out: Path) -> tuple[Path, Path]:
    """The resolved output folder and the hidden folder a run is written into before it is renamed."""
    from .cache import process_alive

    out = out.resolve()
    _check_replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by a killed run of the same --out
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    return out, partial


def _previous_report(recipe: Recipe, against: Optional[Path]) -> Optional[dict]:
    """The stored report that goals.regression compares with, read before any heavy work."""
    if against is None:
        return None
    from .gate import load_previous

    regression = recipe.goals.regression
    if regression.max_latency_increase is None and regression.max_accuracy_drop is None:
        raise UserError(f"{recipe.where('goals')}: --against needs goals.regression (max_latency_increase and/or "
                        "max_accuracy_drop) to say what counts as a regression")
    return load_previous(against, recipe.task)


def run(recipe: Recipe, model: str | Path, options: RunOptions, progress: Progress = Silent()) -> RunResult:
    from .bench import benchmark_feed
    from .checkpoint import inspect_checkpoint, load_tokenizer
    from .data import load_samples
    from .evaluate import evaluate
    from .runners import make_runner

    steps = plan(recipe)
    check_device(options, steps)
    checkpoint = inspect_checkpoint(model, options.allow_pickle)
    previous = _previous_report(recipe, options.against)
    out, partial = start_partial(options.out)
    threads = recipe.benchmark.threads
    try:
        samples = load_samples(recipe.evaluation.data, recipe.task)  # fail on bad data before stages run
        _check_calibration_sources(recipe)
        # One object for the checkpoint: the first stage and the baseline share its loaded module.
        source = TorchModel(checkpoint, recipe.task)
        artifact, records = run_stages(recipe, steps, source, partial / "work", options, progress)
        final = _place(artifact, partial)

        progress.phase("evaluating baseline and result on the same samples")
        tokenizer = load_tokenizer(checkpoint)
        runner_args = options.runner_args(threads)
        base_runner, base_size, base_model = _baseline(recipe, source, runner_args)
        result_runner = make_runner(final, "result", **runner_args, torch_dtype=options.torch_dtype)
        base_eval = evaluate(recipe.task, base_runner, tokenizer, samples, recipe.evaluation, progress=progress)
        result_eval = evaluate(recipe.task, result_runner, tokenizer, samples, recipe.evaluation,
                               reference=base_eval, progress=progress)

        progress.phase("benchmarking baseline and result, in alternating blocks")
        bench = recipe.benchmark
        feed = benchmark_feed(tokenizer, samples.texts, bench.batch_size, bench.seq_len)
        measured = measure_latency(base_runner, [(result_runner, recipe)], feed, previous, progress)

        baseline = Baseline(base_runner, base_size, base_model, base_eval)
        report, gate = judge(recipe, checkpoint, baseline, result_runner, final, result_eval, measured, records,
                             samples.source, partial, out, options.keep_intermediate, previous, options.against)
        passed = all(g.passed for g in gate)
        _commit(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return RunResult(out, report, passed, gate)
