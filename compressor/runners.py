"""One Runner interface (numpy in, numpy out) over torch, ONNX Runtime, TensorRT engines and AOTInductor
packages; evaluation and benchmark use it."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np

from . import aoti, sparse_kernels
from .artifacts import AotiModel, Artifact, EngineModel, OnnxModel, TorchModel
from .checkpoint import load_torch_model
from .engine import check_compatible, gpu_identity, read_metadata, tensorrt_version
from .errors import BackendMissing, StageFailed, UserError
from .fit import evaluation_holding
from .onnx_graph import complete_feed
from .streamed import LayerwiseModel, streamed_logits

log = logging.getLogger(__name__)

# The output each task is judged on.
MAIN_OUTPUT = {"text-classification": "logits", "feature-extraction": "last_hidden_state", "text-generation": "logits"}


class Runner:
    """Runs a model on a feed of named int64 arrays and returns the task's main output as float32."""

    name: str
    backend: str
    # (batch, sequence) the model was fixed to at export, or None where that axis is dynamic.
    fixed_shape: tuple[Optional[int], Optional[int]] = (None, None)

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class TorchRunner(Runner):
    """A torch module on CPU, or on CUDA (optionally cast to float16 / bfloat16 there)."""

    def __init__(self, module, task: str, name: str = "torch", threads: Optional[int] = None, device: str = "cpu",
                 dtype: Optional[str] = None):
        import inspect

        import torch

        if threads:
            torch.set_num_threads(threads)
        self.device = device
        if device == "cuda":
            quantized = getattr(module, "is_quantized", False) or getattr(module, "is_loaded_in_4bit", False)
            if dtype and dtype != "float32" and not quantized:
                # A copy: the module may be the baseline's too, which stays float32.
                module = copy.deepcopy(module).to(device="cuda", dtype=getattr(torch, dtype))
            else:
                module = module.to("cuda")
        self.module, self.task, self.name = module, task, name
        if device == "cuda":
            self.backend = f"torch-cuda-{dtype or 'float32'}"
        else:  # a cast model runs in its own dtype on the CPU too
            weights = next(iter(module.parameters()), None)
            held = str(weights.dtype).removeprefix("torch.") if weights is not None else "float32"
            self.backend = "torch-cpu" if held == "float32" else f"torch-cpu-{held}"
        self._accepted = set(inspect.signature(module.forward).parameters)
        self._torch = torch

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in feed.items() if k in self._accepted}
        if self.task == "text-generation":
            inputs["use_cache"] = False
        with torch.inference_mode():
            output = self.module(**inputs)
        return output[MAIN_OUTPUT[self.task]].float().cpu().numpy()  # .cpu() waits for the GPU


class StreamedRunner(Runner):
    """A causal LM too large for memory even in its stored dtype (fit.evaluation_holding): each call runs
    the model's forward on its meta-device skeleton, reading every transformer block from the shards just
    before it runs and dropping it after (streamed.py). Slow, disk-bound, but memory stays near one block."""

    def __init__(self, artifact: TorchModel, name: str, threads: Optional[int] = None, dtype: Optional[str] = None,
                 trust_remote_code: bool = False):
        import inspect

        import torch

        if threads:
            torch.set_num_threads(threads)
        self.model = LayerwiseModel(artifact.path, artifact.task, trust_remote_code)
        self.dtype = getattr(torch, dtype or "float32")
        self.name, self.task = name, artifact.task
        self.backend = f"torch-cpu-streamed-{dtype or 'float32'}"
        self._accepted = set(inspect.signature(self.model.module.forward).parameters)
        self._torch = torch

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        inputs = {k: torch.from_numpy(v) for k, v in feed.items() if k in self._accepted}
        return streamed_logits(self.model, inputs, self.dtype, buffers_in_dtype=False).numpy()


PROVIDER_LABEL = {"CPUExecutionProvider": "onnxruntime-cpu", "CUDAExecutionProvider": "onnxruntime-cuda",
                  "TensorrtExecutionProvider": "onnxruntime-tensorrt"}
# --ort-provider on --device cuda -> the providers ONNX Runtime is asked for, in order of preference.
CUDA_PROVIDERS = {"cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
                  "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")}


class OrtRunner(Runner):
    """ONNX Runtime, on CPU or through the CUDA / TensorRT execution providers. Feeds empty past
    key/values to models exported with past, so that one graph serves both full-sequence evaluation
    and decoding."""

    def __init__(self, path: Path, task: str, name: str = "onnxruntime", threads: Optional[int] = None,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        except Exception as exc:  # ORT raises its own Fail / InvalidGraph types
            raise UserError(f"{path}: ONNX Runtime cannot load it: {exc}") from None
        # ONNX Runtime falls back to the CPU when an execution provider fails to load; a CUDA timing
        # taken on the CPU would be a lie, so that is an error here.
        if providers[0] not in self.session.get_providers():
            raise BackendMissing(f"{path}: ONNX Runtime could not start {providers[0]} (running on "
                                 f"{', '.join(self.session.get_providers())}); see `compress doctor`")
        self.task, self.name = task, name
        self.backend = PROVIDER_LABEL.get(providers[0], providers[0])
        self._inputs = {i.name: i for i in self.session.get_inputs()}
        self._output = MAIN_OUTPUT[task]
        ids = self._inputs.get("input_ids")
        if ids is not None:
            self.fixed_shape = tuple(d if isinstance(d, int) else None for d in ids.shape[:2])

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        inputs = complete_feed(self._inputs.values(), feed)
        (output,) = self.session.run([self._output], inputs)
        return output.astype(np.float32, copy=False)


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


class AotiRunner(Runner):
    """An AOTInductor package, loaded by torch alone (no transformers, no model code), on the device it was
    compiled for: the feed completed to the inputs it was exported with, the main output copied back."""

    def __init__(self, package: AotiModel, name: str = "aoti", threads: Optional[int] = None):
        metadata = aoti.read_metadata(package)
        aoti.check_loadable(metadata, package.path)
        import torch

        if threads:
            torch.set_num_threads(threads)
        self._torch, self.device = torch, metadata["device"]
        self.name, self.task = name, package.task
        self.backend = f"aoti-{self.device}-{metadata['dtype']}"
        self.inputs = list(metadata["inputs"])
        static = metadata.get("static_axes") or {}
        self.fixed_shape = (static.get("batch_size"), static.get("sequence_length"))
        self.limit = metadata.get("max_sequence_length") or float("inf")
        try:
            self.model = torch._inductor.aoti_load_package(str(package.path))
        except Exception as exc:  # torch raises RuntimeError with the loader's message for a broken file
            raise UserError(f"{package.path}: torch could not load the package: {exc}") from None

    def __call__(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        inputs = complete_feed([SimpleNamespace(name=n) for n in self.inputs], feed)
        batch, length = inputs["input_ids"].shape
        fixed_batch, fixed_length = self.fixed_shape
        # A compiled package does not check shapes: a wrong one reads out of bounds and aborts the process.
        if (fixed_length and length != fixed_length) or (fixed_batch and batch > fixed_batch) or length > self.limit:
            raise UserError(f"{self.name}: the package was compiled for [batch, sequence] {list(self.fixed_shape)} "
                            f"(None: dynamic, sequence up to {self.limit}) and was fed [{batch}, {length}]")
        if fixed_batch and batch < fixed_batch:  # rows are independent: fill with copies of the last, drop after
            inputs = {n: np.concatenate([v, np.repeat(v[-1:], fixed_batch - batch, axis=0)]) for n, v in inputs.items()}
        tensors = [torch.from_numpy(inputs[n]).to(self.device) for n in self.inputs]
        with torch.inference_mode():
            output = self.model(*tensors)
        if isinstance(output, (list, tuple)):  # some torch releases return the outputs as a list
            output = output[0]
        return output[:batch].float().cpu().numpy()  # .cpu() waits for the GPU


def _with_sparse_kernels(runner: TorchRunner, record: dict, folder: Path) -> TorchRunner:
    """Swap the layers the sparsify stage chose for 2:4 semi-structured kernels, once the module is on the
    GPU in its dtype (a semi-structured tensor can be neither moved nor cast)."""
    problem = sparse_kernels.sparse_kernels_problem()
    if problem:
        raise BackendMissing(f"{folder}: {problem}")
    dtype = str(next(runner.module.parameters()).dtype).removeprefix("torch.")
    if dtype not in sparse_kernels.DTYPES:
        raise UserError(f"{folder}: 2:4 sparse kernels take float16 or bfloat16 weights, not {dtype}; leave "
                        "--torch-dtype out (the model runs in the dtype the sparsify stage chose)")
    # The module may be shared with an earlier runner of the same artifact, already swapped.
    kernel = getattr(runner.module, "_sparse_kernel", None)
    if kernel is None:
        kernel = sparse_kernels.to_semi_structured_(runner.module, record["layers"], record.get("backend", "auto"))
        runner.module._sparse_kernel = kernel
    runner.backend = f"torch-cuda-{dtype}-2:4-{kernel.removeprefix('SparseSemiStructuredTensor').lower()}"
    return runner


def make_runner(artifact: Artifact, name: str, threads: Optional[int] = None, allow_pickle: bool = False,
                trust_remote_code: bool = False, device: str = "cpu", torch_dtype: Optional[str] = None,
                ort_provider: str = "cuda") -> Runner:
    """The runner for an artifact on `device`: torch (torch_dtype on CUDA; 2:4 sparse kernels where the
    sparsify stage recorded them), ONNX Runtime (CPU, or the CUDA / TensorRT execution provider), a TensorRT
    engine (CUDA only), or an AOTInductor package (on the device it was compiled for; planning checks that
    it is the run's)."""
    if isinstance(artifact, EngineModel):
        if device != "cuda":
            raise UserError(f"{artifact.path}: a TensorRT engine runs on a GPU only; run with --device cuda")
        return TrtRunner(artifact, name=name)
    if isinstance(artifact, OnnxModel):
        providers = CUDA_PROVIDERS[ort_provider] if device == "cuda" else ("CPUExecutionProvider",)
        return OrtRunner(artifact.path, artifact.task, name=name, threads=threads, providers=providers)
    if isinstance(artifact, AotiModel):
        return AotiRunner(artifact, name=name, threads=threads)
    if isinstance(artifact, TorchModel):
        record = sparse_kernels.read_record(artifact.path)
        if record and device != "cuda":  # before loading: the dense fallback on a CPU is not what was asked
            raise UserError(f"{artifact.path}: its layers run on 2:4 sparse kernels, which need a GPU; run with "
                            "--device cuda")
        if artifact.module is None and device == "cpu" and not record:  # not loaded yet: is it loadable at all?
            holding = evaluation_holding(artifact.path, artifact.task)
            if holding.streamed:
                return StreamedRunner(artifact, name=name, threads=threads, dtype=holding.dtype,
                                      trust_remote_code=trust_remote_code)
        module = load_torch_model(artifact, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        runner = TorchRunner(module, artifact.task, name=name, threads=threads, device=device, dtype=torch_dtype)
        return _with_sparse_kernels(runner, record, artifact.path) if record else runner
    raise TypeError(f"no runner for {type(artifact).__name__}")
