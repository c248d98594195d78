"""One path for `compress run` and `compress compare`: run each recipe's stages, evaluate the baseline once
and every result on the same samples, time them together in one interleaved benchmark, gate each result
and write its run folder. A run is a comparison of one recipe."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from . import baseline_store, cache, distributed, memory
from . import report as reporting
from .anatomy import MIN_COVERAGE
from .artifacts import Artifact, OnnxModel, TorchModel, artifact_spec
from .bench import OtherLoad, benchmark_feed, measure
from .checkpoint import class_names, inspect_checkpoint, load_tokenizer
from .data import load_samples
from .errors import UserError
from .evaluate import PER_CLASS_METRIC, Evaluation, evaluate, first_batch
from .fit import evaluation_holding
from .generation import prompt_ids, time_generation
from .gate import (check_coverage, check_evaluation, check_goals, check_regression, load_previous,
                   machine_differences, machine_facts_known, speedup_thresholds)
from .machine import has_int8_dot_product
from .onnx_graph import tidy_external_data
from .lm_harness import task_manager
from .planning import PlannedStage, check_calibration_sources, check_device, lm_eval_tasks, plan, run_shapes
from .progress import Progress, Silent
from .recipe import Recipe
from .recipe_sources import check_sources
from .report_schema import (Against, BaselineSide, Classes, Environment, GateRow, GenerationStats, MemoryUse, Report,
                            ResultSide, Speedup, StageRecord)
from .run_folder import RunFolder, place
from .runners import Runner, make_runner
from .stages import REGISTRY, StageContext
from .task_scores import extra_scores, model_positions
from .weight_reuse import WeightBudget, reused_weights

log = logging.getLogger(__name__)


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
    # Overrides every recipe's benchmark.max_remeasure_seconds when set: 0 reports latency with its interval
    # but spends nothing on settling close calls (for checks that do not judge latency).
    max_remeasure_seconds: Optional[float] = None
    # Overrides every recipe's benchmark.memory when set (False: no child processes measuring peak memory).
    measure_memory: Optional[bool] = None
    # Overrides every recipe's benchmark.iterations when set (and holds warmup to at most 2 calls): latency is
    # still measured and reported with its interval, from fewer calls, for checks that do not judge it.
    benchmark_iterations: Optional[int] = None

    def runner_args(self, threads: int) -> dict:
        """make_runner's arguments for the baseline; a result adds torch_dtype."""
        return {"threads": threads, "allow_pickle": self.allow_pickle, "trust_remote_code": self.trust_remote_code,
                "device": self.device, "ort_provider": self.ort_provider}


@dataclass
class RunResult:
    out: Path
    report: Report
    passed: bool

    @property
    def gate(self) -> list[GateRow]:
        return self.report.gate

    @property
    def json(self) -> dict:
        """report.json as written."""
        return self.report.as_json()


def run_stages(recipe: Recipe, steps: list[PlannedStage], source: TorchModel, workroot: Path, options: RunOptions,
               progress: Progress = Silent()) -> tuple[Artifact, list[dict]]:
    """Run every planned stage in order, each in its own folder under `workroot`; return the last
    artifact and one record per stage for the report. With options.cache each finished stage is stored
    in the stage cache; with options.resume too, a stage whose key is stored is restored instead of run."""
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
            if isinstance(artifact, OnnxModel):
                ctx.notes += tidy_external_data(artifact.path)
            seconds = time.perf_counter() - started
            log.info("stage %s done in %.1fs", step.config.type, seconds)
            record = {"type": step.config.type, "seconds": round(seconds, 3), "cached": False,
                      "output": artifact.kind, **ctx.details, **({"notes": ctx.notes} if ctx.notes else {})}
            if distributed.active() and step.stage.splits_calibration(step.config, step.input_kind):
                record["calibration_processes"] = distributed.size()
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
class BaselineSpec:
    """What every result is judged against: a runner, its size and what it is."""

    runner: Runner
    size_mb: float
    model: str


def baseline_for(recipe: Recipe, source: TorchModel, runner_args: dict) -> BaselineSpec:
    """The checkpoint, unless the recipe's first stage says what the model would be served as without
    the recipe (merge_lora: the checkpoint with its adapters attached, unmerged)."""
    first = recipe.stages[0]
    special = REGISTRY[first.type].baseline(first, source, recipe.task, runner_args)
    if special is not None:
        runner, size_mb, model = special
        return BaselineSpec(runner, size_mb, model)
    return BaselineSpec(make_runner(source, "baseline", **runner_args), source.size_mb(), "checkpoint")


def baseline_key(recipe: Recipe) -> str:
    """Recipes with equal keys are judged against the same baseline (and may share one evaluation)."""
    first = recipe.stages[0]
    return REGISTRY[first.type].baseline_key(first) or "checkpoint"


@dataclass
class Prepared:
    """Everything checked before any heavy work: plans, the checkpoint, a stored report to compare with."""

    recipes: list[Recipe]
    plans: list[list[PlannedStage]]
    checkpoint: Path
    previous: Optional[Report]
    options: RunOptions


def prepare(recipes: list[Recipe], model: str | Path, options: RunOptions) -> Prepared:
    plans = [plan(recipe) for recipe in recipes]
    if distributed.requested_size() > 1:
        _check_split_calibration(recipes, plans, options)
    for steps in plans:
        check_device(options.device, options.ort_provider, steps)
    checkpoint = inspect_checkpoint(model, options.allow_pickle)
    for recipe in recipes:
        check_sources(recipe)  # a wrong data or adapter path stops here, before any stage runs
        _check_class_goals(recipe, class_names(checkpoint))
        _check_generation_length(recipe, checkpoint)
        _check_task_evaluations(recipe, checkpoint)
        if options.measure_memory is False and recipe.goals.memory.max_ratio is not None:
            raise UserError(f"{recipe.where('goals', 'memory')}: goals.memory needs peak memory, which --no-memory "
                            "turns off")
    previous = None
    if options.against is not None:
        if len(recipes) != 1:
            raise UserError("--against compares one recipe's run with a stored report; give one recipe")
        regression = recipes[0].goals.regression
        if regression.max_latency_increase is None and regression.max_accuracy_drop is None:
            raise UserError(f"{recipes[0].where('goals')}: --against needs goals.regression (max_latency_increase "
                            "and/or max_accuracy_drop) to say what counts as a regression")
        previous = load_previous(options.against, recipes[0].task)
    return Prepared(recipes, plans, checkpoint, previous, options)


def last_splitting_stage(steps: list[PlannedStage]) -> Optional[int]:
    """The index of the last stage whose calibration is split across processes, or None."""
    found = [step.index for step in steps if step.stage.splits_calibration(step.config, step.input_kind)]
    return found[-1] if found else None


def _check_split_calibration(recipes: list[Recipe], plans: list[list[PlannedStage]], options: RunOptions) -> None:
    processes = distributed.requested_size()
    if len(recipes) != 1:
        raise UserError(f"{processes} processes split one recipe's calibration; run the recipes one at a time")
    if last_splitting_stage(plans[0]) is None:
        raise UserError(f"{recipes[0].where('stages')}: {processes} processes were asked for, but no stage of this "
                        "recipe splits its calibration across processes (prune wanda / sparsegpt and quantize "
                        "int4-weight-only gptq on a torch model do)")
    if options.resume:
        raise UserError("--resume restores stages in one process while the others would calibrate; run the "
                        "processes without --resume")


def calibrate_as_worker(recipe: Recipe, model: str | Path, options: RunOptions) -> None:
    """A process other than 0 (distributed.py): run the stages up to the last one that splits calibration,
    taking this process's share of every such stage's batches, in a scratch folder; nothing is kept."""
    prepared = prepare([recipe], model, replace(options, cache=False, resume=False, against=None))
    steps = prepared.plans[0]
    last = last_splitting_stage(steps)
    source = TorchModel(prepared.checkpoint, recipe.task)
    with tempfile.TemporaryDirectory(prefix="compress-worker-") as scratch:
        run_stages(recipe, steps[:last + 1], source, Path(scratch), replace(options, cache=False, resume=False))


@dataclass
class Outcome:
    """One recipe's judged result, written into its (not yet committed) run folder."""

    recipe: Recipe
    report: Report
    passed: bool


BASELINE_SIDE = "\0baseline"  # a key no recipe name can take


def _peak_memory(recipe: Recipe, checkpoint: Path, finals: list, names: list[str], feeds: list[dict],
                 runner_args: dict, torch_dtype: Optional[str], progress: Progress) -> dict[str, MemoryUse]:
    """Each side's peak memory, measured alone in a child process (memory.py says why)."""
    progress.phase("measuring each side's peak memory, one child process at a time")
    peaks = {BASELINE_SIDE: MemoryUse(**memory.measure(memory.side_for_baseline(recipe, checkpoint), feeds,
                                                       runner_args))}
    for name, final in zip(names, finals):
        peaks[name] = MemoryUse(**memory.measure({"artifact": artifact_spec(final)}, feeds,
                                                 {**runner_args, "torch_dtype": torch_dtype}))
    return peaks


def _classes(evaluation: Evaluation) -> Optional[Classes]:
    table = evaluation.classes
    return None if table is None else Classes(rows=[asdict(row) for row in table.rows], confusion=table.confusion)


def _check_task_evaluations(recipe: Recipe, checkpoint: Path) -> None:
    """generation_fidelity and lm_eval run the model many times over: it must be in memory; and every
    lm-eval task named must exist here, before any stage runs."""
    evaluation = recipe.evaluation
    for extra in ("generation_fidelity", "lm_eval"):
        if getattr(evaluation, extra) is not None and evaluation_holding(checkpoint, recipe.task).streamed:
            raise UserError(f"{recipe.where('evaluation', extra)}: evaluation.{extra} runs the model once per "
                            f"token or document, but {checkpoint.name} does not fit in memory and is evaluated "
                            "block by block from disk; remove it")
    named = [t for t in lm_eval_tasks(recipe) if not t.local]  # local tasks are built at run time
    if named:
        try:
            task_manager(named, None)
        except UserError as exc:
            raise UserError(f"{recipe.where('evaluation', 'lm_eval', 'tasks')}: {exc}") from None


def _check_generation_length(recipe: Recipe, checkpoint: Path) -> None:
    """benchmark.generate needs the model in memory, and its prompt and new tokens must fit its positions."""
    wanted = recipe.benchmark.generate
    if wanted is None:
        return
    if evaluation_holding(checkpoint, recipe.task).streamed:
        raise UserError(f"{recipe.where('benchmark', 'generate')}: benchmark.generate times decoding with a key/value "
                        f"cache, but {checkpoint.name} does not fit in memory and is evaluated block by block, "
                        "reading every block from disk for each token; remove benchmark.generate")
    limit = model_positions(checkpoint)  # None: a model without the field sets no limit
    if limit and wanted.prompt_tokens + wanted.new_tokens > limit:
        raise UserError(f"{recipe.where('benchmark', 'generate')}: benchmark.generate: {wanted.prompt_tokens} prompt "
                        f"+ {wanted.new_tokens} new tokens exceed the model's {limit} positions")


def _check_class_goals(recipe: Recipe, names: list[str]) -> None:
    """Per-class goals (`f1[LABEL]`) must name one of the checkpoint's classes (by index when its
    config.json has no id2label)."""
    for index, goal in enumerate(recipe.goals.accuracy):
        per_class = PER_CLASS_METRIC.fullmatch(goal.metric)
        label = per_class and per_class.group(2)
        if per_class and (label not in names if names else not label.isdigit()):
            known = ", ".join(names) if names else "none named: config.json has no id2label, so use class indices"
            raise UserError(f"{recipe.where('goals', 'accuracy', index, 'metric')}: goals.accuracy[{index}].metric: "
                            f"no class {label!r} in the checkpoint's labels ({known})")


def execute(prepared: Prepared, partial: Path, out: Path, progress: Progress = Silent(), nested: bool = False
            ) -> list[Outcome]:
    """Run, evaluate, time and gate every prepared recipe against one baseline. Run folders are written
    under `partial` (the recipe's own subfolder when `nested`), to be committed to `out` by the caller."""
    recipes, options = prepared.recipes, prepared.options
    first = recipes[0]
    task, bench = first.task, first.benchmark
    samples = load_samples(first.evaluation.data, task)  # fail on bad data before stages run
    for recipe in recipes:
        check_calibration_sources(recipe)
    # One object for the checkpoint: the first stage and the baseline share its loaded module.
    source = TorchModel(prepared.checkpoint, task)
    folders = [partial / recipe.name if nested else partial for recipe in recipes]
    finals, records = [], []
    for recipe, steps, folder in zip(recipes, prepared.plans, folders):
        folder.mkdir(exist_ok=True)
        artifact, stage_records = run_stages(recipe, steps, source, folder / "work", options, progress)
        finals.append(place(artifact, folder))
        records.append(stage_records)

    progress.phase("evaluating the baseline and " + ("every result" if nested else "the result")
                   + " on the same samples")
    tokenizer = load_tokenizer(prepared.checkpoint)
    runner_args = options.runner_args(bench.threads)
    baseline = baseline_for(first, source, runner_args)
    names = class_names(prepared.checkpoint)
    # The checkpoint's own scores may come from an earlier run (baseline_store.py); latency never does.
    keys = baseline_store.keys(first, prepared.checkpoint, samples, bench.threads, options.device) \
        if options.cache and baseline.model == "checkpoint" else None
    reused: list[str] = []
    base_eval = baseline_store.load_evaluation(keys.evaluation) if keys and options.resume else None
    if base_eval is None:
        started = time.perf_counter()
        base_eval = evaluate(task, baseline.runner, tokenizer, samples, first.evaluation, progress=progress,
                             class_names=names)
        if keys:
            baseline_store.store_evaluation(keys.evaluation, base_eval, first, prepared.checkpoint,
                                            time.perf_counter() - started)
    else:
        reused.append("evaluation")
    stored_scores = baseline_store.load_scores(keys.scores) if keys and keys.scores and options.resume else None
    if stored_scores is not None:
        reused.append("generation fidelity and lm-eval scores")
    runners = [make_runner(final, recipe.name if nested else "result", **runner_args, torch_dtype=options.torch_dtype)
               for recipe, final in zip(recipes, finals)]
    with ExitStack() as reuse:  # scores are unchanged by it, only sooner (weight_reuse's docstring)
        budget = WeightBudget()
        for runner in runners:
            reuse.enter_context(reused_weights(getattr(runner, "module", None), budget))
        evaluations = [evaluate(task, runner, tokenizer, samples, first.evaluation, reference=base_eval,
                                progress=progress, class_names=names) for runner in runners]
        started = time.perf_counter()
        extras, baseline_scores = extra_scores(first, prepared.checkpoint, tokenizer, samples, baseline.runner,
                                               runners, progress, stored=stored_scores)
        if keys and keys.scores and stored_scores is None:
            # timed with the results' scoring: the baseline's own share is in its lm-eval note
            baseline_store.store_scores(keys.scores, baseline_scores, first, prepared.checkpoint,
                                        time.perf_counter() - started)
    if reused:
        extras[0].notes.append(f"reused from the stage cache: the baseline's {' and its '.join(reused)}, stored by an "
                               "earlier run on the same checkpoint files, data, evaluation settings, threads and "
                               "package versions (`compress cache clear` drops them); its latency was measured in "
                               "this run")
    for evaluation, extra in zip([base_eval] + evaluations, extras):
        evaluation.metrics.update(extra.metrics)

    env = reporting.environment(threads=bench.threads, device=options.device)
    differences = machine_differences(prepared.previous, env) if prepared.previous else []
    progress.phase("benchmarking the baseline and " + ("every result" if nested else "the result")
                   + ", in alternating blocks")
    feed = benchmark_feed(tokenizer, samples.texts, bench.batch_size, bench.seq_len)
    thresholds = {runner.name: speedup_thresholds(recipe.goals, prepared.previous, same_machine=not differences)
                  for runner, recipe in zip(runners, recipes)}
    if options.max_remeasure_seconds is not None:
        bench = bench.model_copy(update={"max_remeasure_seconds": options.max_remeasure_seconds})
    if options.measure_memory is not None:
        bench = bench.model_copy(update={"memory": options.measure_memory})
    if options.benchmark_iterations is not None:
        bench = bench.model_copy(update={"iterations": options.benchmark_iterations,
                                         "warmup": min(bench.warmup, 2)})
    with OtherLoad() as load:
        timings, speedups, remeasured = measure([baseline.runner] + runners, feed, bench, thresholds, progress)
    generation = {}
    if bench.generate is not None:
        progress.phase("timing generation: time to first token and decode per token, sides alternating")
        wanted = bench.generate
        prompt = prompt_ids(tokenizer, samples.texts, wanted.prompt_tokens)
        times = time_generation([baseline.runner] + runners, prompt, wanted.new_tokens, wanted.rounds, progress)
        generation = {name: GenerationStats(**t.summary(wanted.prompt_tokens, wanted.new_tokens))
                      for name, t in times.items()}
    peaks = _peak_memory(first, prepared.checkpoint, finals, [runner.name for runner in runners],
                         [first_batch(task, tokenizer, samples, first.evaluation), feed], runner_args,
                         options.torch_dtype, progress) if bench.memory else {}
    base_side = BaselineSide(model=baseline.model, metrics=base_eval.metrics, classes=_classes(base_eval),
                             latency_ms=timings.latency(baseline.runner.name).as_dict(),
                             size_mb=round(baseline.size_mb, 3), backend=baseline.runner.backend,
                             memory=peaks.get(BASELINE_SIDE), generation=generation.get(baseline.runner.name),
                             metric_stderr=extras[0].stderr)
    outcomes, checkpoint_digest = [], None
    held_in = evaluation_holding(prepared.checkpoint, task).why  # why not float32 in memory, if not
    for recipe, runner, final, evaluation, extra, stage_records, folder in zip(
            recipes, runners, finals, evaluations, extras[1:], records, folders):
        final_folder = out / recipe.name if nested else out
        result_side = ResultSide(metrics=evaluation.metrics, classes=_classes(evaluation), metric_stderr=extra.stderr,
                                 memory=peaks.get(runner.name), generation=generation.get(runner.name),
                                 latency_ms=timings.latency(runner.name).as_dict(),
                                 speedup=Speedup(**speedups[runner.name].as_dict()),
                                 size_mb=round(final.size_mb(), 3), backend=runner.backend,
                                 artifact=str(final_folder / final.path.relative_to(folder)))
        gate = (check_evaluation(task, base_side, result_side) + check_goals(recipe.goals, base_side, result_side)
                + check_coverage(stage_records, MIN_COVERAGE))
        if prepared.previous is not None:
            gate += check_regression(recipe.goals.regression, task, prepared.previous, base_side, result_side,
                                     differences)
        report = reporting.build_report(recipe, prepared.checkpoint, base_side, result_side, gate,
                                        [StageRecord(**r) for r in stage_records], evaluated=base_eval.samples,
                                        data_source=samples.source, env=env, other_cpu_share=load.share,
                                        remeasured_seconds=remeasured, benchmark=bench)
        report.notes += _machine_notes(recipe, runner, env) + ([held_in] if held_in else [])
        report.notes += extras[0].notes + extra.notes  # what the baseline's notes say holds for every side
        regression = recipe.goals.regression
        if prepared.previous is not None:
            known = machine_facts_known(prepared.previous.environment)
            report.against = Against(report=str(options.against), recipe=prepared.previous.recipe,
                                     created=prepared.previous.created, verdict=prepared.previous.verdict,
                                     same_machine=not differences if known or differences else None,
                                     machine_differences=differences)
            if not known:
                report.notes.append(f"{options.against} records no CPU model or ISA flags (written before "
                                    "report schema 2): the latency regression was judged as if it came from "
                                    "this machine; store a new report to compare machines")
        elif regression.max_latency_increase is not None or regression.max_accuracy_drop is not None:
            report.notes.append("goals.regression was not checked: run with --against PREVIOUS/report.json")
        if not options.keep_intermediate:
            shutil.rmtree(folder / "work", ignore_errors=True)
        if checkpoint_digest is None:  # hashed once for every recipe's manifest: an LLM checkpoint is GBs
            checkpoint_digest = source.digest()
        reporting.write_all(folder, report, reporting.build_manifest(recipe, prepared.checkpoint, final, folder,
                                                                     checkpoint_digest))
        outcomes.append(Outcome(recipe, report, report.verdict == "pass"))
    return outcomes


def _machine_notes(recipe: Recipe, runner: Runner, env: Environment) -> list[str]:
    """What a reader on this machine must know to read the speed-up."""
    int8 = [c for c in recipe.stages if c.type == "quantize" and getattr(c, "scheme", "") in ("int8-dynamic",
                                                                                               "int8-static")]
    if int8 and runner.backend.startswith("onnxruntime") and env.device == "cpu" and env.isa_flags \
            and not has_int8_dot_product(env.isa_flags):
        return ["this CPU has no int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX): ONNX Runtime's "
                "int8 MatMul runs at about its fp32 speed here, so the speed-up over torch comes mostly from "
                "ONNX Runtime itself; on a CPU with VNNI or AMX int8 is 2-3x faster still. `compress compare` with "
                "an fp32 ONNX recipe beside this one shows what int8 adds on this machine"]
    return []


def run(recipe: Recipe, model: str | Path, options: RunOptions, progress: Progress = Silent()) -> RunResult:
    prepared = prepare([recipe], model, options)
    with RunFolder(options.out) as folder:
        [outcome] = execute(prepared, folder.partial, folder.out, progress)
        folder.commit()
    return RunResult(folder.out, outcome.report, outcome.passed)
