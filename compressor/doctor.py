"""`compress doctor`: what this machine can run (torch CUDA, ONNX Runtime providers, TensorRT,
bitsandbytes, the GPU), with the reason for every missing piece. The same checks stop `--device cuda`
runs and GPU stages with exit 3 before any heavy work."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Optional

from . import engine
from .stages.bnb_4bit import bnb_unavailable


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


def cuda_problem() -> Optional[str]:
    """Why torch cannot use a CUDA GPU here, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if torch.version.cuda is None:
        return (f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch on a machine with an "
                "NVIDIA GPU")
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: no NVIDIA driver or device"
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


def checks() -> list[Check]:
    return [_gpu(), _torch(), *_onnxruntime(), _tensorrt(), _bitsandbytes()]
