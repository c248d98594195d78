"""One Runner interface (numpy in, numpy out) over torch and ONNX Runtime; evaluation and benchmark use it."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from .artifacts import Artifact, EngineModel, OnnxModel, TorchModel
from .errors import BackendMissing, UserError

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
        self.backend = f"torch-cuda-{dtype or 'float32'}" if device == "cuda" else "torch-cpu"
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


def _ort_dtype(type_name: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}.get(type_name, np.float32)


def complete_feed(session_inputs, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs an ONNX graph takes, from a tokenizer's output: drop what it does not take and fill
    in what tokenizers do not produce (position ids, token type ids, empty past key/values)."""
    wanted = {i.name: i for i in session_inputs}
    inputs = {k: v for k, v in feed.items() if k in wanted}
    batch, length = feed["input_ids"].shape
    if "position_ids" in wanted and "position_ids" not in inputs:
        inputs["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
    if "token_type_ids" in wanted and "token_type_ids" not in inputs:
        inputs["token_type_ids"] = np.zeros_like(feed["input_ids"])
    for name, meta in wanted.items():
        if name.startswith("past_key_values"):
            heads, head_dim = meta.shape[1], meta.shape[3]
            inputs[name] = np.zeros((batch, heads, 0, head_dim), dtype=_ort_dtype(meta.type))
    return inputs


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


def make_runner(artifact: Artifact, name: str, threads: Optional[int] = None, allow_pickle: bool = False,
                trust_remote_code: bool = False, device: str = "cpu", torch_dtype: Optional[str] = None,
                ort_provider: str = "cuda") -> Runner:
    """The runner for an artifact on `device`: torch (torch_dtype on CUDA), ONNX Runtime (CPU, or the
    CUDA / TensorRT execution provider), or a TensorRT engine (CUDA only)."""
    if isinstance(artifact, EngineModel):
        if device != "cuda":
            raise UserError(f"{artifact.path}: a TensorRT engine runs on a GPU only; run with --device cuda")
        from .engine import TrtRunner

        return TrtRunner(artifact, name=name)
    if isinstance(artifact, OnnxModel):
        providers = CUDA_PROVIDERS[ort_provider] if device == "cuda" else ("CPUExecutionProvider",)
        return OrtRunner(artifact.path, artifact.task, name=name, threads=threads, providers=providers)
    if isinstance(artifact, TorchModel):
        from .checkpoint import load_torch_model

        module = load_torch_model(artifact, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        return TorchRunner(module, artifact.task, name=name, threads=threads, device=device, dtype=torch_dtype)
    raise TypeError(f"no runner for {type(artifact).__name__}")
