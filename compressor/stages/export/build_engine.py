"""build_engine: a TensorRT engine from an ONNX artifact, with the metadata that says where it may run.

The stage's own decisions (optimisation profiles from the recipe's shapes, which earlier stages leave
an ONNX graph TensorRT can parse) are plain functions, checked without a GPU; what TensorRT itself
decides (precision flags, capability, graph checks) and the build live in engine.py, which imports
TensorRT only when the stage runs. `plan()` stops with exit 3 before any heavy work where TensorRT or
a CUDA GPU is missing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ... import engine
from ...artifacts import EngineModel, OnnxModel
from ...cache import cache_root
from ..base import Stage, StageConfigBase, StageContext
from .export_onnx import copy_tokenizer_files

log = logging.getLogger(__name__)



# Each of batch and sequence; _ordered below holds the lower bound (1 <= min <= opt <= max).
ProfileSize = Annotated[int, Field(le=1_048_576)]


class ShapeRange(BaseModel):
    """min / opt / max of the [batch, sequence] inputs for one optimisation profile."""

    model_config = ConfigDict(extra="forbid")
    min: tuple[ProfileSize, ProfileSize] = Field(
        description="[batch, sequence] the engine must accept at least down to")
    opt: tuple[ProfileSize, ProfileSize] = Field(description="[batch, sequence] TensorRT tunes kernels for")
    max: tuple[ProfileSize, ProfileSize] = Field(description="[batch, sequence] the engine accepts at most")

    @model_validator(mode="after")
    def _ordered(self) -> "ShapeRange":
        for axis, name in ((0, "batch"), (1, "sequence")):
            if not 1 <= self.min[axis] <= self.opt[axis] <= self.max[axis]:
                raise ValueError(f"{name}: need 1 <= min <= opt <= max, got {self.min[axis]}, "
                                 f"{self.opt[axis]}, {self.max[axis]}")
        return self


class BuildEngineConfig(StageConfigBase):
    type: Literal["build_engine"]
    precision: Literal["fp32", "fp16", "bf16", "int8", "fp8"] = Field(
        "fp16", description="fp32; fp16 / bf16 (bf16 needs compute capability 8.0+); int8 from an explicitly "
                            "quantized (QDQ) ONNX made by `quantize scheme: int8-static`; fp8 from an ONNX with "
                            "FP8 Q/DQ nodes (`quantize scheme: fp8` with static activations, then export_onnx), "
                            "on compute capability 8.9+")
    strongly_typed: Optional[bool] = Field(
        None, description="build a strongly typed network (types from the ONNX graph, no precision flags); "
                          "default: yes for fp8 and on TensorRT 11+, where it is the only mode; no otherwise")
    fp16_fallback: bool = Field(True, description="int8: let layers outside Q/DQ pairs run in fp16 rather than fp32")
    profile: Optional[ShapeRange] = Field(
        None, description="the optimisation profile of every [batch, sequence] input; default: min [1, 1], opt "
                          "the benchmark's [batch_size, seq_len], max the larger of benchmark and evaluation")
    workspace_mb: int = Field(4096, gt=0, le=1_048_576,
                              description="builder scratch memory limit (MemoryPoolType.WORKSPACE)")
    optimization_level: int = Field(3, ge=0, le=5, description="builder optimisation level: 0 builds fastest, "
                                                               "5 searches longest for the fastest engine")
    timing_cache: Optional[str] = Field(
        None, description="timing cache file read before and written after the build, so that rebuilds and "
                          "other models reuse kernel timings; default: tensorrt-timing.cache in the stage cache "
                          "folder. Only valid for the same GPU, CUDA and TensorRT version")


def default_profile(benchmark: tuple[int, int], evaluation: tuple[int, int]) -> ShapeRange:
    """min [1, 1]; opt the benchmark's shape, which is what the gate times; max covering both the
    benchmark and the evaluation batches (padded to at most evaluation.max_length)."""
    return ShapeRange(min=(1, 1), opt=benchmark,
                      max=(max(benchmark[0], evaluation[0]), max(benchmark[1], evaluation[1])))


def check_profile_covers(profile: ShapeRange, shapes: dict[str, tuple[int, int]]) -> Optional[str]:
    """Why an explicit profile would reject a shape the run feeds the engine, or None."""
    for purpose, (batch, length) in shapes.items():
        if not (profile.min[0] <= batch <= profile.max[0] and profile.min[1] <= length <= profile.max[1]):
            return (f"profile [{profile.min}..{profile.max}] does not cover the {purpose} shape [{batch}, {length}]; "
                    "widen it or leave `profile` out to derive it from the recipe")
    return None


class BuildEngine(Stage):
    type = "build_engine"
    summary = "Build a TensorRT engine from the ONNX model, stamped with the GPU and TensorRT it was built for"
    config_model = BuildEngineConfig
    accepts = ("onnx",)

    def output_kind(self, config, input_kind):
        return "engine"

    def check_order(self, config: BuildEngineConfig, earlier: list[Any]) -> Optional[str]:
        for index, stage in enumerate(earlier):
            if stage.type == "optimize_onnx":
                return (f"stages[{index}] (optimize_onnx) writes ONNX Runtime-only fused operators that TensorRT "
                        "cannot parse (TensorRT fuses by itself); remove it from this recipe")
            if stage.type == "quantize" and stage.scheme in ("int8-dynamic", "int4-weight-only"):
                return (f"stages[{index}] (quantize {stage.scheme}) writes ONNX Runtime-only operators that TensorRT "
                        "cannot parse; use int8-static (QDQ) with precision int8, or build from the float graph")
        quantized = [s for s in earlier if s.type == "quantize"]
        if config.precision == "fp8" and quantized and quantized[-1].scheme != "fp8":
            return (f"precision fp8 needs FP8 Q/DQ nodes, and this recipe quantizes to {quantized[-1].scheme}: use "
                    "`quantize scheme: fp8` with `activations: static` on the torch model, then export_onnx")
        if config.precision == "int8" and not any(s.type == "quantize" and s.scheme == "int8-static" for s in earlier):
            return ("precision int8 needs an explicitly quantized (QDQ) ONNX graph: add `quantize scheme: "
                    "int8-static` before build_engine")
        return None

    def check_shapes(self, config: BuildEngineConfig, shapes: dict[str, tuple[int, int]]) -> Optional[str]:
        return check_profile_covers(config.profile, shapes) if config.profile else None

    def backends(self, config, input_kind):
        return ["tensorrt"]

    def cache_salt(self, config: BuildEngineConfig) -> dict:
        gpu = engine.gpu_identity()
        return {"gpu": gpu and {"name": gpu["name"], "capability": list(gpu["capability"])}}

    def unavailable(self, config: BuildEngineConfig, input_kind) -> Optional[str]:
        gpu = engine.gpu_identity()
        if gpu is None:
            return ("build_engine needs an NVIDIA GPU with a CUDA build of torch; this machine has none "
                    "(see compress doctor)")
        return engine.check_capability(config.precision, gpu["capability"], gpu["name"])

    def run(self, config: BuildEngineConfig, artifact: OnnxModel, ctx: StageContext) -> EngineModel:
        benchmark = ctx.shapes.get("benchmark", (1, 128))
        evaluation = ctx.shapes.get("evaluation", benchmark)
        profile = config.profile or default_profile(benchmark, evaluation)
        out = EngineModel(ctx.workdir / "model.engine", artifact.task)
        started = time.perf_counter()
        metadata = engine.build(artifact, out, config, profile, timing_cache_path(config), ctx.progress)
        copy_tokenizer_files(artifact.folder, ctx.workdir)
        for leftover in ctx.workdir.glob("*.onnx*"):  # only the engine and its metadata ship
            leftover.unlink()
        ctx.details.update({"backend": f"tensorrt {metadata['tensorrt']}", "precision": config.precision,
                            "strongly_typed": metadata["strongly_typed"], "flags": metadata["flags"],
                            "gpu": metadata["gpu"]["name"], "profile": metadata["profiles"][0],
                            "build_seconds": round(time.perf_counter() - started, 1),
                            "timing_cache": metadata["timing_cache"]})
        return out


def timing_cache_path(config: BuildEngineConfig) -> Path:
    return Path(config.timing_cache).expanduser() if config.timing_cache else cache_root() / "tensorrt-timing.cache"

