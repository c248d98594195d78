"""TensorRT engines: what TensorRT can build (precision plan, capability and graph checks, parser
errors), building one (TensorRT's Python API, imported only here and only when used), the metadata
written beside it, and the refusal to load it where it was not built for.

The decisions are plain functions, checked without a GPU; the build_engine stage calls them and
`build()`, and runners.TrtRunner loads what `build()` wrote.

An engine is specific to the GPU model and the TensorRT version that built it, so `model.engine.json`
records both (with the precision, profiles, ONNX digest and build time), and loading compares them
with the machine before TensorRT sees the file.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from .artifacts import EngineModel, OnnxModel, sha256_file
from .errors import BackendMissing, StageFailed, UserError

log = logging.getLogger(__name__)

METADATA_FORMAT = 1

# Minimum compute capability per precision (TensorRT's support matrix: bf16 from Ampere, fp8 from Ada).
MIN_CAPABILITY = {"fp32": (0, 0), "fp16": (0, 0), "bf16": (8, 0), "int8": (0, 0), "fp8": (8, 9)}
# Inputs shaped [batch, sequence] that a profile covers; other inputs (past key/values) are refused.
TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# ONNX Runtime-only operators that TensorRT's parser does not know, and the stage that puts them there.
ORT_ONLY_OPS = {"MatMulInteger": "quantize int8-dynamic", "DynamicQuantizeLinear": "quantize int8-dynamic",
                "MatMulNBits": "quantize int4-weight-only", "Attention": "optimize_onnx",
                "SkipLayerNormalization": "optimize_onnx", "EmbedLayerNormalization": "optimize_onnx",
                "FastGelu": "optimize_onnx", "BiasGelu": "optimize_onnx"}


def gpu_identity() -> Optional[dict]:
    """Name, compute capability and memory of CUDA device 0 as torch sees it, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return {"name": properties.name, "capability": (properties.major, properties.minor),
            "memory_gb": round(properties.total_memory / 2**30, 1)}


def tensorrt_version() -> Optional[str]:
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt.__version__


def precision_plan(precision: str, tensorrt_major: int, strongly_typed: Optional[bool],
                   fp16_fallback: bool = True) -> tuple[bool, list[str]]:
    """(strongly typed network?, BuilderFlag names to set) for a precision on a TensorRT major version.

    Weakly typed (TensorRT 10): precision flags let the builder choose lower-precision kernels, and
    Q/DQ nodes fix the int8 layers. Strongly typed: every tensor's type comes from the graph, and
    setting precision flags is an error, so fp16/bf16 need a graph already in that type."""
    strong = strongly_typed if strongly_typed is not None else (precision == "fp8" or tensorrt_major >= 11)
    if precision == "fp8" and not strong:
        raise UserError("build_engine precision fp8: FP8 engines are built strongly typed (the FP8 Q/DQ nodes "
                        "carry the types); remove strongly_typed: false")
    if tensorrt_major >= 11 and not strong:
        raise UserError(f"build_engine: TensorRT {tensorrt_major} builds strongly typed networks only; "
                        "remove strongly_typed: false")
    if strong:
        if precision in ("fp16", "bf16"):
            raise UserError(f"build_engine precision {precision}: a strongly typed network takes its types from "
                            f"the ONNX graph, which is fp32 here; use TensorRT 10 with strongly_typed: false, or "
                            f"an ONNX graph converted to {precision}")
        return True, []
    flags = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8"] + (["FP16"] if fp16_fallback else [])}
    return False, flags[precision]


def check_capability(precision: str, capability: tuple[int, int], gpu: str) -> Optional[str]:
    need = MIN_CAPABILITY[precision]
    if capability < need:
        return (f"precision {precision} needs compute capability {need[0]}.{need[1]} or newer; {gpu} has "
                f"{capability[0]}.{capability[1]}")
    return None


def check_graph(op_counts: Counter, precision: str, input_names: list[str]) -> None:
    """Refuse graphs TensorRT cannot parse or that do not fit the precision, naming the cause."""
    foreign = sorted(op for op in op_counts if op in ORT_ONLY_OPS)
    if foreign:
        stages = sorted({ORT_ONLY_OPS[op] for op in foreign})
        raise UserError(f"build_engine: the ONNX graph has ONNX Runtime-only operators ({', '.join(foreign)}) that "
                        f"TensorRT cannot parse; they come from {' and '.join(stages)}: build the engine from the "
                        "exported graph (or one quantized with int8-static) instead")
    quantized = op_counts.get("QuantizeLinear", 0) and op_counts.get("DequantizeLinear", 0)
    if precision in ("int8", "fp8") and not quantized:
        raise UserError(f"build_engine precision {precision}: the graph has no QuantizeLinear/DequantizeLinear "
                        "pairs; add `quantize scheme: int8-static` before build_engine (fp8: `quantize scheme: fp8` "
                        "with `activations: static` on the torch model, then export_onnx)")
    past = [name for name in input_names if name not in TOKEN_INPUTS]
    if past:
        raise UserError(f"build_engine: inputs {past[:3]} are not [batch, sequence] token inputs; export without "
                        "with_past to build an engine")


def format_parser_errors(errors: list[Any], node_names: list[str]) -> str:
    """TensorRT's ONNX parser errors with the ONNX node each one is about."""
    lines = []
    for error in errors:
        name = error.node_name() if hasattr(error, "node_name") else ""
        index = error.node()
        if not name and 0 <= index < len(node_names):
            name = node_names[index]
        operator = error.node_operator() if hasattr(error, "node_operator") else ""
        where = f"node {name or index}" + (f" ({operator})" if operator else "")
        lines.append(f"{where}: {error.desc()}")
    return "; ".join(lines)


def write_metadata(engine: EngineModel, metadata: dict) -> None:
    engine.metadata_path.write_text(json.dumps(metadata, indent=2) + "\n")


def read_metadata(engine: EngineModel) -> dict:
    try:
        metadata = json.loads(engine.metadata_path.read_text())
    except FileNotFoundError:
        raise UserError(f"{engine.metadata_path}: missing; compress only loads engines with the metadata "
                        "it wrote when building them (rebuild with the recipe's build_engine stage)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{engine.metadata_path}: unreadable engine metadata ({exc})") from None
    if metadata.get("format") != METADATA_FORMAT:
        raise UserError(f"{engine.metadata_path}: metadata format {metadata.get('format')!r}, expected "
                        f"{METADATA_FORMAT}; rebuild the engine with this version of compress")
    return metadata


def check_compatible(metadata: dict, tensorrt: Optional[str], gpu: Optional[dict], where: Path) -> None:
    """Refuse an engine built for another TensorRT version or GPU, saying which and how to rebuild."""
    rebuild = ("rebuild it on this machine: compress run RECIPE --model CHECKPOINT --device cuda (the recipe's "
               "build_engine stage), carrying the timing cache to make it quick")
    if tensorrt is None:
        raise BackendMissing(f"{where}: running a TensorRT engine needs the tensorrt package, not installed here")
    if gpu is None:
        raise BackendMissing(f"{where}: running a TensorRT engine needs a CUDA GPU; none is visible here")
    built_trt, built_gpu = metadata["tensorrt"], metadata["gpu"]
    if built_trt != tensorrt:
        raise UserError(f"{where}: built with TensorRT {built_trt}, this machine has TensorRT {tensorrt}; "
                        f"engines do not move between TensorRT versions; {rebuild}")
    capability = tuple(built_gpu["capability"])
    if built_gpu["name"] != gpu["name"] or capability != tuple(gpu["capability"]):
        raise UserError(f"{where}: built for {built_gpu['name']} (compute capability {capability[0]}.{capability[1]}), "
                        f"this machine has {gpu['name']} ({gpu['capability'][0]}.{gpu['capability'][1]}); engines "
                        f"are tuned to one GPU model; {rebuild}")


def _onnx_summary(path: Path):
    from collections import Counter

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    return Counter(node.op_type for node in model.graph.node), inputs, [node.name for node in model.graph.node]


def build(onnx_model: OnnxModel, out: EngineModel, config, profile, timing_cache: Path, progress) -> dict:
    """Parse the ONNX file, configure precision, profile, workspace, optimisation level and timing
    cache, build and serialize the engine, and write its metadata. Returns the metadata."""
    ops, inputs, node_names = _onnx_summary(onnx_model.path)
    check_graph(ops, config.precision, inputs)
    import tensorrt as trt

    gpu = gpu_identity()
    major = int(trt.__version__.split(".")[0])
    strongly_typed, flags = precision_plan(config.precision, major, config.strongly_typed, config.fp16_fallback)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    progress.phase(f"build_engine: parsing {onnx_model.path.name}")
    if not parser.parse_from_file(str(onnx_model.path)):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        raise StageFailed(f"build_engine: TensorRT cannot parse {onnx_model.path}: "
                          f"{format_parser_errors(errors, node_names)}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mb << 20)
    builder_config.builder_optimization_level = config.optimization_level
    for flag in flags:
        builder_config.set_flag(getattr(trt.BuilderFlag, flag))
    optimisation_profile = builder.create_optimization_profile()
    shapes = {}
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        optimisation_profile.set_shape(tensor.name, profile.min, profile.opt, profile.max)
        shapes[tensor.name] = {"min": list(profile.min), "opt": list(profile.opt), "max": list(profile.max)}
    builder_config.add_optimization_profile(optimisation_profile)
    cached = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = builder_config.create_timing_cache(cached)
    builder_config.set_timing_cache(cache, ignore_mismatch=False)

    progress.phase(f"build_engine: building a {config.precision} engine for {gpu['name']} (minutes)")
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise StageFailed("build_engine: TensorRT could not build the engine (see its log above); try a larger "
                          "workspace_mb or another precision")
    seconds = time.perf_counter() - started
    out.path.write_bytes(bytes(serialized))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    partial = timing_cache.with_name(timing_cache.name + ".partial")
    partial.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    partial.replace(timing_cache)  # never a half-written cache for the next build to trip on
    metadata = {"format": METADATA_FORMAT, "tensorrt": trt.__version__,
                "gpu": {"name": gpu["name"], "capability": list(gpu["capability"])},
                "precision": config.precision, "strongly_typed": strongly_typed, "flags": flags,
                "profiles": [shapes], "workspace_mb": config.workspace_mb,
                "optimization_level": config.optimization_level,
                "onnx_sha256": sha256_file(onnx_model.path),
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(seconds, 1),
                "timing_cache": {"path": str(timing_cache), "reused_bytes": len(cached)}}
    write_metadata(out, metadata)
    return metadata

