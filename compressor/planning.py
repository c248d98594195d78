"""plan(): checks a recipe's chain of stages (kinds, order, shapes, goals, backends, device) before heavy work."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .artifacts import ArtifactKind
from .data import read
from .doctor import cuda_problem, ort_provider_problem
from .errors import BackendMissing, UserError
from .evaluate import FIDELITY_METRICS, PER_CLASS, TASK_METRICS, is_task_metric
from .lm_harness import harness_problem
from .lm_tasks import HARNESS_METRICS, LOCAL_METRICS, TaskRef, known_direction, parse_task
from .recipe import Recipe
from .stages import REGISTRY, Stage

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
        if planned and planned[-1].stage.last_only:
            raise UserError(f"{where}: stages[{index - 1}] ({planned[-1].config.type}) writes a serving format that "
                            "no stage reads; it must be the last stage")
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
    _check_generation(recipe, planned)
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
    if recipe.evaluation.lm_eval is not None and harness_problem():
        raise BackendMissing(f"{recipe.where('evaluation', 'lm_eval')}: {harness_problem()}")
    return planned


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeio' else 'a'} {word}"


def run_shapes(recipe: Recipe) -> dict[str, tuple[int, int]]:
    """The [batch, sequence] shapes a run feeds its result: the benchmark's, and evaluation's largest."""
    return {"benchmark": (recipe.benchmark.batch_size, recipe.benchmark.seq_len),
            "evaluation": (recipe.evaluation.batch_size, recipe.evaluation.max_length)}


def _check_generation(recipe: Recipe, planned: list[PlannedStage]) -> None:
    """benchmark.generate decodes with the KV cache: an ONNX result must be exported with past key/values."""
    if recipe.benchmark.generate is None or not planned:
        return
    final = planned[-1].output_kind
    exports = [step for step in planned if step.config.type == "export_onnx"]
    if final in ("engine", "aoti"):
        built = "a TensorRT engine" if final == "engine" else "an AOTInductor package (logits without a KV cache)"
        raise UserError(f"{recipe.where('benchmark', 'generate')}: benchmark.generate times torch and ONNX Runtime "
                        f"models; this recipe builds {built}")
    if final == "onnx" and exports and not exports[-1].config.with_past:
        step = exports[-1]
        raise UserError(f"{recipe.where('stages', step.index)}: stages[{step.index}] (export_onnx): benchmark.generate "
                        "decodes with the KV cache; export with `with_past: true`")


def lm_eval_tasks(recipe: Recipe) -> list[TaskRef]:
    """The recipe's lm-eval tasks, task YAML paths read relative to the recipe's folder."""
    config = recipe.evaluation.lm_eval
    if config is None:
        return []
    folder = Path(recipe.source).parent if recipe.source != "<recipe>" else Path.cwd()
    refs = []
    for index, entry in enumerate(config.tasks):
        try:
            refs.append(parse_task(entry, folder))
        except UserError as exc:
            raise UserError(f"{recipe.where('evaluation', 'lm_eval', 'tasks', index)}: evaluation.lm_eval.tasks"
                            f"[{index}]: {exc}") from None
    return refs


def _check_extra_metric(recipe: Recipe, index: int, metric: str, tasks: list[TaskRef]) -> Optional[str]:
    """Why a goal on a generation-fidelity or lm-eval metric cannot be judged, or None."""
    if metric in FIDELITY_METRICS:
        return None if recipe.evaluation.generation_fidelity is not None else \
            f"{metric} is measured with evaluation.generation_fidelity; add it"
    task, _, name = metric.partition("/")
    ref = next((t for t in tasks if t.name == task), None)
    if ref is None:
        listed = ", ".join(t.name for t in tasks) or "none: add evaluation.lm_eval"
        return f"{metric!r} names lm-eval task {task!r}, which evaluation.lm_eval.tasks does not list ({listed})"
    if known_direction(ref, name) is None:
        known = sorted(LOCAL_METRICS[ref.name]) if ref.local else sorted(HARNESS_METRICS)
        return f"{metric!r}: a goal can use metric {', '.join(known)} of {task} (`TASK/METRIC`)"
    return None


def _check_goal_metrics(recipe: Recipe) -> None:
    measured = TASK_METRICS[recipe.task]
    tasks = lm_eval_tasks(recipe)
    for index, goal in enumerate(recipe.goals.accuracy):
        if recipe.task == "text-generation" and (goal.metric in FIDELITY_METRICS or "/" in goal.metric):
            problem = _check_extra_metric(recipe, index, goal.metric, tasks)
            if problem:
                raise UserError(f"{recipe.where('goals', 'accuracy', index, 'metric')}: goals.accuracy[{index}]"
                                f".metric: {problem}")
            continue
        if not is_task_metric(recipe.task, goal.metric):
            where = recipe.where("goals", "accuracy", index, "metric")
            per_class = f" and per class {', '.join(m + '[LABEL]' for m in PER_CLASS)}" \
                if recipe.task == "text-classification" else ""
            raise UserError(f"{where}: goals.accuracy[{index}].metric: {recipe.task} measures "
                            f"{', '.join(measured)}{per_class}, not {goal.metric!r}")


def check_device(device: str, ort_provider: str, steps: list[PlannedStage]) -> None:
    """Stop with exit 3 before any stage runs when --device cuda cannot be honoured here, and with exit
    2 when the result is an engine that would have to run on the CPU."""
    final = steps[-1].output_kind if steps else "torch"
    _check_result_device(device, steps)
    if device != "cuda":
        if final == "engine":
            raise UserError("the recipe builds a TensorRT engine, which runs on a GPU only; run with --device cuda")
        return
    problem = cuda_problem()
    if problem:
        raise BackendMissing(f"--device cuda: {problem}")
    if final == "onnx":
        problem = ort_provider_problem(ort_provider)
        if problem:
            raise BackendMissing(f"--device cuda: {problem}")


def _check_result_device(device: str, steps: list[PlannedStage]) -> None:
    """A result that runs on one device only must be timed on the device the baseline runs on: an
    AOTInductor package on the one it was compiled for, 2:4 sparse kernels on CUDA."""
    for step in steps:
        config = getattr(step, "config", None)
        kind = getattr(config, "type", None)
        wanted = {"export_aoti": getattr(config, "device", None), "sparsify": "cuda"}.get(kind)
        if wanted and wanted != device:
            raise UserError(f"stages[{step.index}] ({kind}) makes a result that runs on {wanted}, but "
                            f"the run is on {device} (baseline and result are timed on one device); run with "
                            f"--device {wanted}")


def check_calibration_sources(recipe: Recipe) -> None:
    """Read every stage's calibration source once, so a wrong path or field stops the run before
    any stage spends minutes on the model."""
    for index, config in enumerate(recipe.stages):
        calibration = getattr(config, "calibration", None)
        if calibration is not None:
            try:
                read(calibration.data)
            except UserError as exc:
                raise UserError(f"{recipe.where('stages', index, 'calibration')}: stages[{index}].calibration: "
                                f"{exc}") from None
