"""Recipe schema (pydantic, extra fields forbidden) and a YAML loader whose errors name file:line and field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from .data import DataConfig
from .errors import UserError
from .recipe_yaml import compose, format_path, line_index, read_capped
from .run_folder import folder_name_problem
from .stages import REGISTRY
from .stages.export.build_engine import BuildEngineConfig
from .stages.cast.cast import CastConfig
from .stages.export.compressed_tensors import ExportCompressedTensorsConfig
from .stages.export.export_aoti import ExportAotiConfig
from .stages.export.export_onnx import ExportOnnxConfig
from .stages.lora.merge_lora import MergeLoraConfig
from .stages.export.optimize_onnx import OptimizeOnnxConfig
from .stages.prune.prune import PruneConfig
from .stages.quantize.quantize import QuantizeConfig
from .stages.prune.sparsify import SparsifyConfig

Task = Literal["text-classification", "feature-extraction", "text-generation"]

# Written out rather than generated from the registry so that the types stay visible to readers
# and type checkers; tests check that it and the registry agree. QuantizeConfig is itself a union on
# `scheme`, so a quantize stage's errors carry two tags.
StageConfig = Annotated[
    Union[MergeLoraConfig, ExportOnnxConfig, OptimizeOnnxConfig, PruneConfig, QuantizeConfig,
          CastConfig, ExportCompressedTensorsConfig, BuildEngineConfig, SparsifyConfig, ExportAotiConfig],
    Field(discriminator="type"),
]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LmEvalConfig(Strict):
    tasks: list[str] = Field(
        min_length=1, max_length=64,
        description="lm-eval task names (resolved as lm-eval resolves them here: hub data must be in the local "
                    "cache), paths of task YAML files (relative to the recipe), or the local tasks "
                    "compress_next_word and compress_sentence_ending (`compress data` lists them)")
    num_fewshot: Optional[int] = Field(None, ge=0, le=64, description="few-shot examples per document (default: "
                                                                      "each task's own)")
    limit: Optional[int] = Field(None, gt=0, le=1_000_000,
                                 description="score the first N documents of each task (default: all)")
    batch_size: int = Field(8, gt=0, le=1024, description="documents per forward pass")
    apply_chat_template: bool = Field(False, description="render every document with the tokenizer's chat template")
    max_length: Optional[int] = Field(
        None, gt=1, le=131_072, description="longest sequence scored, longer ones cut from the left (default: the "
                                            "model's positions, at most 2048)")
    data: Optional[DataConfig] = Field(
        None, description="text the local tasks are cut from (default: the lee-background card, the text the "
                          "language-model recipes are evaluated on, which no calibration set shares)")


class GenerationFidelityConfig(Strict):
    prompts: int = Field(16, gt=0, le=10_000, description="prompts, each from the start of one evaluation text")
    prompt_tokens: int = Field(32, gt=0, le=8192, description="tokens of text in each prompt")
    new_tokens: int = Field(32, gt=0, le=4096, description="greedy tokens generated per prompt (fewer where "
                                                           "the model ends its text)")
    chat_template: Optional[bool] = Field(
        None, description="wrap each prompt as a user message in the tokenizer's chat template (default: where "
                          "the tokenizer has one)")


class EvaluationConfig(Strict):
    data: DataConfig
    max_samples: Optional[int] = Field(
        None, gt=0, le=10_000_000,
        description="evaluate the first N samples (sentences, or token windows for text-generation)")
    max_length: int = Field(128, gt=0, le=8192, description="truncate / window length in tokens")
    batch_size: int = Field(32, gt=0, le=4096)
    lm_eval: Optional[LmEvalConfig] = Field(
        None, description="text-generation: also score baseline and result with lm-evaluation-harness tasks; "
                          "each task metric becomes a gate metric `TASK/METRIC`")
    generation_fidelity: Optional[GenerationFidelityConfig] = Field(
        None, description="text-generation: greedy generations from the same prompts on both sides, compared: "
                          "gate metrics generation_exact_match and generation_prefix_tokens")


class GenerateConfig(Strict):
    prompt_tokens: int = Field(128, gt=0, le=8192, description="prompt length in tokens (real evaluation text)")
    new_tokens: int = Field(32, ge=2, le=4096, description="tokens generated greedily after the prompt")
    rounds: int = Field(5, gt=0, le=10_000, description="timed generations per side, in alternating rounds")


class BenchmarkConfig(Strict):
    batch_size: int = Field(1, gt=0, le=4096)
    seq_len: int = Field(128, gt=0, le=8192)
    threads: int = Field(2, gt=0, le=1024, description="intra-op threads for every runner")
    warmup: int = Field(10, ge=0, le=100_000, description="untimed calls per runner before timing")
    iterations: int = Field(50, gt=0, le=100_000,
                            description="timed calls per runner, taken in alternating blocks of 10")
    confidence: float = Field(
        0.95, ge=0.5, lt=1.0, description="confidence level of the speed-up's bootstrap interval (over rounds: "
                                          "interleaved pairs of blocks of calls)")
    max_remeasure_seconds: float = Field(
        60.0, ge=0, le=86_400, description="while the speed-up's interval still holds a latency threshold, keep "
                                           "timing for up to this many more seconds; a verdict still undecided then "
                                           "is marked marginal; 0 turns re-measuring off")
    memory: bool = Field(True, description="measure each side's peak memory (load, one evaluation batch, the "
                                           "benchmark input) in a fresh child process")
    generate: Optional[GenerateConfig] = Field(
        None, description="text-generation: also time generation (time to first token, decode per token with "
                          "the KV cache, tokens/s) on every side")


class AccuracyGoal(Strict):
    metric: str = Field(description="a metric the task reports, e.g. accuracy, perplexity, cosine_min")
    max_drop: Optional[float] = Field(
        None, ge=0, le=1_000_000, description="largest allowed worsening vs baseline, in the metric's units")
    max_drop_pct: Optional[float] = Field(
        None, ge=0, le=10_000, description="largest allowed worsening vs baseline, in percent of the baseline")
    min: Optional[float] = Field(None, description="absolute floor for the candidate's value")
    max: Optional[float] = Field(None, description="absolute ceiling for the candidate's value")

    @model_validator(mode="after")
    def _has_threshold(self) -> "AccuracyGoal":
        if all(v is None for v in (self.max_drop, self.max_drop_pct, self.min, self.max)):
            raise ValueError("an accuracy goal needs one of max_drop, max_drop_pct, min, max")
        return self


class LatencyGoals(Strict):
    min_speedup: Optional[float] = Field(None, gt=0, le=1000,
                                         description="baseline p50 / candidate p50 must be at least this")
    max_p95_ms: Optional[float] = Field(None, gt=0, le=86_400_000,
                                        description="candidate p95 latency ceiling in milliseconds")
    min_decode_speedup: Optional[float] = Field(
        None, gt=0, le=1000,
        description="baseline / candidate decode time per token (benchmark.generate) must be at least this")
    min_tokens_per_s: Optional[float] = Field(
        None, gt=0, le=1_000_000_000,
        description="candidate decode speed in tokens per second (benchmark.generate) must be at least this")


class SizeGoals(Strict):
    max_ratio: Optional[float] = Field(None, gt=0, le=100,
                                       description="candidate size / baseline size must be at most this")


class MemoryGoals(Strict):
    max_ratio: Optional[float] = Field(None, gt=0, le=100, description="candidate peak memory / baseline peak memory "
                                                                       "(each side's process, measured apart) must be "
                                                                       "at most this")


class RegressionGoals(Strict):
    """Goals against a stored report (`compress run --against PREVIOUS/report.json`), for CI."""

    max_latency_increase: Optional[float] = Field(
        None, ge=0, le=100, description="largest allowed slow-down against the previous result, as a fraction "
                                        "(0.10 = 10%); measured on the speed-up over each run's own baseline, so a "
                                        "slower machine does not read as a regression")
    max_accuracy_drop: Optional[float] = Field(
        None, ge=0, le=1_000_000,
        description="largest allowed worsening of the task's main metric (accuracy, cosine_mean or perplexity) "
                    "against the previous result, in the metric's units")


class Goals(Strict):
    accuracy: list[AccuracyGoal] = Field(default_factory=list)
    latency: LatencyGoals = Field(default_factory=LatencyGoals)
    size: SizeGoals = Field(default_factory=SizeGoals)
    memory: MemoryGoals = Field(default_factory=MemoryGoals)
    regression: RegressionGoals = Field(default_factory=RegressionGoals)


class Recipe(Strict):
    name: str
    description: str = ""
    task: Task
    stages: list[StageConfig] = Field(min_length=1)
    evaluation: EvaluationConfig
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    goals: Goals = Field(default_factory=Goals)

    @model_validator(mode="after")
    def _has_goals(self) -> "Recipe":
        goals = self.goals
        latency = goals.latency
        if not goals.accuracy and all(v is None for v in (latency.min_speedup, latency.max_p95_ms,
                                                          latency.min_decode_speedup, latency.min_tokens_per_s)) \
                and goals.size.max_ratio is None and goals.memory.max_ratio is None:
            raise ValueError("goals: a recipe needs at least one goal (accuracy, latency, size or memory) to gate on")
        if goals.memory.max_ratio is not None and not self.benchmark.memory:
            raise ValueError("goals.memory needs benchmark.memory: true (peak memory is not measured otherwise)")
        decode = goals.latency.min_decode_speedup is not None or goals.latency.min_tokens_per_s is not None
        if decode and self.benchmark.generate is None:
            raise ValueError("goals.latency.min_decode_speedup and min_tokens_per_s need benchmark.generate")
        if self.benchmark.generate is not None and self.task != "text-generation":
            raise ValueError("benchmark.generate applies to text-generation recipes")
        for extra in ("lm_eval", "generation_fidelity"):
            if getattr(self.evaluation, extra) is not None and self.task != "text-generation":
                raise ValueError(f"evaluation.{extra} applies to text-generation recipes")
        return self

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        problem = folder_name_problem(name)
        if problem:  # the name becomes runs/NAME (and a folder of compare's output): it must not lead elsewhere
            raise ValueError(f"{problem}; the name is the default run folder runs/NAME, so give a plain folder name "
                             "such as minilm-int8")
        return name

    @field_validator("goals")
    @classmethod
    def _language_models_gate_on_fidelity(cls, goals: Goals, info: ValidationInfo) -> Goals:
        metrics = {goal.metric for goal in goals.accuracy}
        if info.data.get("task") == "text-generation" and "perplexity" in metrics and "top1_agreement" not in metrics:
            raise ValueError("a text-generation recipe that gates on perplexity also needs a fidelity goal in "
                             "goals.accuracy, e.g. `- metric: top1_agreement` with `min: 0.8` (perplexity alone can "
                             "pass a broken evaluation or a model that no longer predicts like the baseline)")
        return goals

    _source: str = PrivateAttr("<recipe>")
    _lines: dict = PrivateAttr(default_factory=dict)

    @property
    def source(self) -> str:
        return self._source

    def where(self, *path) -> str:
        """`file:line` of a field path such as ("stages", 2), for errors found after parsing."""
        line = next((self._lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in self._lines), None)
        return f"{self._source}:{line}" if line else self._source


# Fields whose value picks a union member: the stage's `type`, then a quantize stage's `scheme`.
UNION_TAGS = ("type", "scheme")


def _data_path(loc: tuple, data) -> tuple:
    """The error location as a path into the YAML document. pydantic also inserts each union member's
    tag (the stage's `type` value, then its `scheme` value), which names no YAML node, so it is dropped."""
    path, cursor = [], data
    for part in loc:
        in_dict = isinstance(cursor, dict) and part in cursor
        in_list = isinstance(cursor, list) and isinstance(part, int) and part < len(cursor)
        if in_dict or in_list:
            cursor = cursor[part]
            path.append(part)
        elif isinstance(cursor, dict) and any(part == cursor.get(tag) for tag in UNION_TAGS):
            continue
        else:
            path.append(part)  # a missing or unknown key: it names the field
            break
    return tuple(path)


def _wrong_variant(loc: tuple) -> Optional[str]:
    """For a field unknown to the scheme it was given to but taken by another (loc: "stages", index, type,
    scheme, field), which schemes take it; None for a field no scheme has, or a stage without schemes."""
    if len(loc) != 5 or loc[0] != "stages" or loc[2] not in REGISTRY:
        return None
    variants = REGISTRY[loc[2]].config_variants()
    given = next((v for v in variants if loc[3] in v.values), None)
    owners = [" / ".join(v.values) for v in variants if loc[4] in v.model.model_fields]
    if given is None or not owners:
        return None
    listed = ", ".join(owners[:-1]) + " and " + owners[-1] if len(owners) > 1 else owners[0]
    takes = f"{given.tag} {listed} takes" if len(owners) == 1 else f"{given.tag}s {listed} take"
    return (f"unknown field for {given.label}; only {takes} it (`compress stages` "
            "lists the options of each)")


def _tag_choices(loc: tuple) -> list[str]:
    """What a missing union tag may be: a stage type, or one of the stage's schemes."""
    if len(loc) == 2 and loc[0] == "stages":
        return list(REGISTRY)
    if len(loc) == 3 and loc[0] == "stages" and loc[2] in REGISTRY:
        return [value for variant in REGISTRY[loc[2]].config_variants() for value in variant.values]
    return []


def _explain(error: dict, data, lines: dict[tuple, int], source: str) -> str:
    path = _data_path(error["loc"], data)
    tag_error = error["type"] in ("union_tag_invalid", "union_tag_not_found")
    if tag_error:  # the tag field itself is wrong or missing: point at it
        path += (error["ctx"]["discriminator"].strip("'"),)
    line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
    where = f"{source}:{line}" if line else source
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = _wrong_variant(error["loc"]) or \
            "unknown field (check the spelling; `compress stages` lists every option)"
    elif error["type"] == "union_tag_invalid":
        kind = "stage type" if path[-1] == "type" else path[-1]
        expected = error["ctx"]["expected_tags"].replace("'", "")
        message = f"unknown {kind} {error['ctx']['tag']!r}; expected one of {expected} (`compress stages` lists them)"
    elif error["type"] == "union_tag_not_found":
        choices = _tag_choices(error["loc"])
        message = "field required" + (f": one of {', '.join(choices)}" if choices else "")
    elif error["type"] == "missing":
        message = "field required"
    elif error["type"] == "value_error":  # pydantic's prefix for a validator's own message says nothing
        message = message.removeprefix("Value error, ")
    if "input" in error and error["type"] not in ("missing", "extra_forbidden") and not tag_error \
            and not isinstance(error["input"], (dict, list)):
        message += f", got {error['input']!r}"
    return f"{where}: {format_path(path)}: {message}"


def parse_recipe(text: str, source: str = "<recipe>") -> Recipe:
    node, data = compose(text, source)
    if not isinstance(data, dict):
        raise UserError(f"{source}: a recipe is a YAML mapping with name, task, stages, evaluation, goals")
    lines = line_index(node)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = [_explain(e, data, lines, source) for e in exc.errors()]
        raise UserError("invalid recipe:\n  " + "\n  ".join(problems)) from None
    recipe._source, recipe._lines = source, lines
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    try:
        content = read_capped(path)
    except FileNotFoundError:
        raise UserError(f"{path}: recipe file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder; give a recipe file (RECIPE.yaml)") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read recipe: {exc.strerror}") from None
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not a recipe: byte {exc.start} is not UTF-8 text (a recipe is a YAML "
                        "file)") from None
    return parse_recipe(text, str(path))
