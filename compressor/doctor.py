"""`compress doctor`: what this machine can run (torch CUDA, ONNX Runtime providers, TensorRT,
bitsandbytes, AOTInductor, 2:4 sparse kernels, the GPU), with the reason for every missing piece. The same
checks stop `--device cuda` runs and GPU stages with exit 3 before any heavy work."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from . import engine
from .aoti import aoti_problem, cxx_compiler
from .cuda import cuda_problem
from .sparse_kernels import sparse_kernels_problem
from .stages.quantize.bnb_4bit import bnb_unavailable


@dataclass
class Check:
    component: str
    usable: bool
    detail: str  # version, device, providers: what is there
    reason: str = ""  # why it is not usable, and what would make it so


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def ort_provider_problem(provider: str) -> Optional[str]:
    """Why ONNX Runtime's `cuda` or `tensorrt` execution provider is unavailable, or None."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed"
    name = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[provider]
    available = ort.get_available_providers()
    if name in available:
        return None
    if _version("onnxruntime-gpu"):
        return f"onnxruntime-gpu {ort.__version__} did not find {name}'s libraries (CUDA, cuDNN, TensorRT)"
    return f"onnxruntime {ort.__version__} is the CPU build, without {name}; install onnxruntime-gpu instead"


def _gpu() -> Check:
    if cuda_problem():
        return Check("GPU", False, "none visible to torch", "see torch CUDA")
    gpu = engine.gpu_identity()
    major, minor = gpu["capability"]
    return Check("GPU", True, f"{gpu['name']}, compute capability {major}.{minor}, {gpu['memory_gb']} GiB")


def _torch() -> Check:
    import torch

    problem = cuda_problem()
    detail = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else "")
    if problem:
        return Check("torch CUDA", False, detail, problem)
    kinds = ["float32", "float16"] + (["bfloat16"] if torch.cuda.is_bf16_supported() else [])
    return Check("torch CUDA", True, f"{detail}; {' / '.join(kinds)}")


def _onnxruntime() -> list[Check]:
    try:
        import onnxruntime as ort
    except ImportError:
        return [Check("ONNX Runtime", False, "not installed", "pip install onnxruntime (or onnxruntime-gpu)")]
    checks = [Check("ONNX Runtime", True, f"{ort.__version__}: {', '.join(ort.get_available_providers())}")]
    for provider in ("cuda", "tensorrt"):
        problem = ort_provider_problem(provider)
        checks.append(Check(f"ONNX Runtime {provider} provider", problem is None,
                            "available" if problem is None else "missing", problem or ""))
    return checks


def _tensorrt() -> Check:
    version = engine.tensorrt_version()
    if version is None:
        return Check("TensorRT", False, "not installed",
                     "pip install tensorrt on a machine with an NVIDIA GPU and driver (its wheels fetch the "
                     "libraries from NVIDIA's index); needed by build_engine and engine runs")
    problem = cuda_problem()
    return Check("TensorRT", problem is None, version, problem or "")


def _bitsandbytes() -> Check:
    version = _version("bitsandbytes")
    if version is None:
        return Check("bitsandbytes", False, "not installed", "pip install bitsandbytes; needed by quantize nf4 / fp4")
    problem = bnb_unavailable()
    backend = "CUDA" if cuda_problem() is None else "CPU"
    return Check("bitsandbytes", problem is None, f"{version}, {backend} backend", problem or "")


def _aoti() -> list[Check]:
    """AOTInductor packages (export_aoti) for each device."""
    found = []
    for device in ("cpu", "cuda"):
        problem, triton = aoti_problem(device), _version("triton")
        detail = f"C++ compiler {cxx_compiler() or 'none'}"
        if device == "cuda" and triton:
            detail += f", triton {triton}"
        found.append(Check(f"AOTInductor {device}", problem is None, detail, problem or ""))
    return found


def _sparse_kernels() -> Check:
    problem = sparse_kernels_problem()
    if problem:
        return Check("2:4 sparse kernels", False, "none", problem)
    import torch

    cusparselt = "cuSPARSELt and CUTLASS" if torch.backends.cusparselt.is_available() else "CUTLASS"
    return Check("2:4 sparse kernels", True, f"{cusparselt}; float16 / bfloat16")


def checks() -> list[Check]:
    return [_gpu(), _torch(), *_onnxruntime(), _tensorrt(), _bitsandbytes(), *_aoti(), _sparse_kernels()]
