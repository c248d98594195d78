"""TensorRT engines: building one (TensorRT's Python API, imported only here and only when used),
the metadata written beside it, the refusal to load it where it was not built for, and a runner.

An engine is specific to the GPU model and the TensorRT version that built it, so `model.engine.json`
records both (with the precision, profiles, ONNX digest and build time), and loading compares them
with the machine before TensorRT sees the file.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from .artifacts import EngineModel, OnnxModel
from .errors import BackendMissing, StageFailed, UserError
from .runners import MAIN_OUTPUT, Runner, complete_feed

log = logging.getLogger(__name__)

METADATA_FORMAT = 1


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
    from .artifacts import sha256_file
    from .stages.build_engine import check_graph, format_parser_errors, precision_plan

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


class TrtRunner(Runner):
    """A TensorRT engine on CUDA device 0: inputs copied to device tensors, the first profile's shapes
    set per call, execute_async_v3 on a dedicated stream, the main output copied back."""

    def __init__(self, engine: EngineModel, name: str = "tensorrt"):
        metadata = read_metadata(engine)
        check_compatible(metadata, tensorrt_version(), gpu_identity(), engine.path)
        import tensorrt as trt
        import torch

        self._trt, self._torch = trt, torch
        self.name, self.task, self.backend = name, engine.task, f"tensorrt-{metadata['precision']}"
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(engine.path.read_bytes())
        if self.engine is None:
            raise UserError(f"{engine.path}: TensorRT could not deserialize it (corrupt file?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self._output = MAIN_OUTPUT[self.task]
        if self._output not in self.outputs:
            raise UserError(f"{engine.path}: has outputs {self.outputs}, not {self._output!r}")

    def _torch_dtype(self, name: str):
        trt, torch = self._trt, self._torch
        return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8,
                trt.bool: torch.bool}[self.engine.get_tensor_dtype(name)]

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        inputs = complete_feed([SimpleNamespace(name=n) for n in self.inputs], feed)
        with torch.cuda.stream(self.stream):
            tensors: dict[str, Any] = {}
            for name in self.inputs:
                tensors[name] = torch.from_numpy(inputs[name]).to("cuda", self._torch_dtype(name), non_blocking=True)
                self.context.set_input_shape(name, tuple(tensors[name].shape))
                self.context.set_tensor_address(name, tensors[name].data_ptr())
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                tensors[name] = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
                self.context.set_tensor_address(name, tensors[name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise StageFailed(f"{self.name}: TensorRT execution failed")
            result = tensors[self._output].float().cpu()  # waits for the stream
        return result.numpy()
