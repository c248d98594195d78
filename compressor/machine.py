"""What machine and software a figure was measured on: CPU model, the ISA extensions that decide int8 / bf16
speed, GPU, package versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

from . import __version__

# The CPU features that change which kernels ONNX Runtime and PyTorch pick: int8 dynamic quantization
# is about as fast as fp32 on AVX2 alone, and 2-4x faster with VNNI or AMX.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "sve", "i8mm", "bf16")
INT8_DOT_PRODUCT = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def _cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo (Linux), else empty."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    entries: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if entries:
                break
            continue
        key, _, value = line.partition(":")
        entries.setdefault(key.strip(), value.strip())
    return entries


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or info.get("Hardware") or platform.processor() or "unknown"


def isa_flags() -> list[str]:
    info = _cpuinfo()
    present = set((info.get("flags") or info.get("Features") or "").split())
    return [flag for flag in ISA_FLAGS if flag in present]


def has_int8_dot_product(flags: list[str]) -> bool:
    return any(flag in flags for flag in INT8_DOT_PRODUCT)


def gpu_name() -> Optional[str]:
    """The CUDA device torch sees, when torch is already imported (never imported just to ask)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # a broken CUDA install must not break a report
        return None
    return None


def describe() -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(), "machine": platform.machine(),
            "processor": platform.processor() or "unknown", "cpu_count": os.cpu_count(), "cpu_model": cpu_model(),
            "isa_flags": isa_flags(), "gpu": gpu_name()}


PACKAGES = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "peft",
            "bitsandbytes", "tensorrt", "numpy", "pydantic")


def package_versions() -> dict[str, str]:
    versions = {"compress": __version__}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
