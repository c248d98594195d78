"""Whether torch can use a CUDA GPU here, and why not: a leaf, so that stages, runners and `compress doctor`
give the same reason without importing each other."""

from __future__ import annotations

from typing import Optional


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
