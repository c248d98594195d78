"""report.json as typed models: what the gate, regression checks, compare and CI read.

report.json is an interface: CI jobs parse it and `compress run --against` reads an earlier one. Every
field is declared here, `schema_version` says which layout a file has, and an older or hand-edited file
is validated with these models so a bad field is named rather than failing somewhere later.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# 2: first versioned layout (schema_version, machine facts in environment, `against`). Reports written
# before it have no schema_version and are read as version 1 where their fields allow.
SCHEMA_VERSION = 2


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LatencyStats(Model):
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    throughput: float = Field(description="samples per second at the benchmark batch size")
    iterations: int = Field(description="timed calls")


class Speedup(Model):
    speedup: float = Field(description="baseline p50 / result p50")
    interval: tuple[float, float] = Field(description="bootstrap confidence interval of the speed-up")
    confidence: float
    rounds: int = Field(description="interleaved rounds of calls the interval was resampled from")
    marginal: bool = Field(description="a latency threshold still lay inside the interval after re-measuring")


class ClassScore(Model):
    label: str = Field(description="the class's name in the checkpoint's id2label, or its index")
    support: int = Field(description="evaluation samples whose true class this is")
    precision: float
    recall: float
    f1: float


class Classes(Model):
    """A classifier's per-class scores and confusion matrix on the evaluation samples."""

    rows: list[ClassScore]
    confusion: list[list[int]] = Field(description="confusion[true][predicted], classes in the order of `rows`")


class MemoryUse(Model):
    """Peak memory of serving one side, measured alone in a fresh child process."""

    peak_rss_mb: float = Field(description="the child process's peak resident memory (VmHWM): runtime, model, "
                                           "one evaluation batch and the benchmark input")
    runtime_rss_mb: float = Field(description="its resident memory after importing the runtime (torch or ONNX "
                                              "Runtime), before loading the model")
    cuda_peak_mb: Optional[float] = Field(None, description="torch.cuda.max_memory_allocated, on CUDA")


class GenerationStats(Model):
    """Greedy generation after a prompt (benchmark.generate), medians over the timed rounds."""

    prompt_tokens: int
    new_tokens: int
    time_to_first_token_ms: float = Field(description="the prompt's forward pass and the first token out of it")
    decode_ms_per_token: float = Field(description="one decode step with the KV cache, median over every step")
    tokens_per_s: float = Field(description="1000 / decode_ms_per_token, at batch 1")
    rounds: int = Field(description="timed generations of this side, alternating with the other sides")


class Side(Model):
    """What one side of the comparison measured: metrics, latency, size and the backend it ran on."""

    metrics: dict[str, float]
    latency_ms: LatencyStats
    size_mb: float
    backend: str
    classes: Optional[Classes] = Field(None, description="text-classification: per-class scores and the "
                                                         "confusion matrix")
    memory: Optional[MemoryUse] = Field(None, description="peak memory, when the benchmark measured it")
    generation: Optional[GenerationStats] = Field(None, description="generation speed, with benchmark.generate")
    metric_stderr: dict[str, float] = Field(default_factory=dict, description="standard error of the metrics that "
                                                                              "have one (lm-eval task metrics)")


class BaselineSide(Side):
    model: str = Field(description="what the result is judged against, e.g. `checkpoint`")


class ResultSide(Side):
    speedup: Optional[Speedup] = None
    artifact: str = Field(description="path of the compressed model in the run folder")


class GateRow(Model):
    goal: str
    threshold: float
    measured: float
    passed: bool
    margin: float = Field(description="how far inside the threshold (positive) or outside it (negative)")
    unit: str = ""
    interval: Optional[tuple[float, float]] = Field(None, description="confidence interval of `measured` "
                                                                      "(latency goals; lm-eval metrics: plus or "
                                                                      "minus two standard errors)")
    marginal: bool = Field(False, description="the interval still held the threshold after re-measuring")
    judged: bool = Field(True, description="false when the goal could not be judged fairly (e.g. a latency "
                                           "regression against a report from another machine); it then "
                                           "neither passes nor fails the run")
    significant: Optional[bool] = Field(None, description="goals on metrics with a standard error: whether the "
                                                          "change exceeds two standard errors")
    note: Optional[str] = None


class StageRecord(BaseModel):
    """One stage's record; every stage adds its own details (counts, errors, settings) as extra fields."""

    model_config = ConfigDict(extra="allow")

    type: str
    seconds: float
    cached: bool
    output: Optional[str] = None
    notes: list[str] = Field(default_factory=list)
    cache_key: Optional[str] = None
    cached_from: Optional[str] = None
    stage_seconds: Optional[float] = Field(None, description="for a reused stage: how long it took when it ran")

    def details(self) -> dict:
        return dict(self.model_extra or {})


class EvaluationInfo(Model):
    samples: int
    data: str
    max_length: int


class BenchmarkInfo(Model):
    batch_size: int
    seq_len: int
    threads: int
    warmup: int
    iterations: int
    confidence: float
    max_remeasure_seconds: float
    generate: Optional[dict] = Field(None, description="benchmark.generate: prompt_tokens, new_tokens, rounds")
    memory: bool = Field(False, description="each side's peak memory was measured (reports before it: not)")
    other_cpu_share: Optional[float] = Field(None, description="share of the CPU other processes used while timing")
    remeasured_seconds: float = 0.0


class Machine(Model):
    python: str
    platform: str
    machine: str
    processor: str
    cpu_count: Optional[int]
    cpu_model: str = "unknown"
    isa_flags: list[str] = Field(default_factory=list, description="CPU extensions that decide int8/bf16 speed")
    gpu: Optional[str] = None


class Environment(Machine):
    threads: Optional[int] = Field(None, description="intra-op threads every runner used")
    device: str = "cpu"
    packages: dict[str, str] = Field(default_factory=dict)


class Against(Model):
    """The stored report that goals.regression compared with."""

    report: str
    recipe: Optional[str]
    created: Optional[str]
    verdict: Optional[str]
    same_machine: Optional[bool] = Field(None, description="None when the stored report predates machine facts")
    machine_differences: list[str] = Field(default_factory=list)


class Report(Model):
    schema_version: int = SCHEMA_VERSION
    recipe: str
    recipe_file: str
    model: str
    task: str
    verdict: Literal["pass", "fail"]
    baseline: BaselineSide
    result: ResultSide
    gate: list[GateRow]
    stages: list[StageRecord]
    evaluation: EvaluationInfo
    benchmark: BenchmarkInfo
    notes: list[str] = Field(default_factory=list)
    environment: Environment
    created: str
    against: Optional[Against] = None

    def as_json(self) -> dict:
        return self.model_dump(mode="json", exclude_none=False)
