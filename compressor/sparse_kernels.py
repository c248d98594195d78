"""2:4 sparse kernels on CUDA: which nn.Linear weights are 2:4 sparse and shaped for PyTorch's
semi-structured tensors, and the swap of those weights for torch.sparse.SparseSemiStructuredTensor.

A leaf: the sparsify stage decides and records which layers take the kernels; runners replay that record
after the model is on the GPU in its dtype, because a semi-structured tensor cannot be saved in safetensors,
moved between devices or cast (the saved weights stay dense, with their zeros)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from .cuda import cuda_problem
from .errors import UserError

log = logging.getLogger(__name__)

# Beside the saved (dense, half precision) weights: which layers runners swap to sparse kernels.
SPARSE_KERNELS_FILE = "compress_sparse_kernels.json"
# Sparse tensor cores came with Ampere; the semi-structured kernels need compute capability 8.0.
MIN_CAPABILITY = (8, 0)
DTYPES = ("float16", "bfloat16")
# Rows and columns of a weight must be multiples of these (torch.sparse.semi_structured's constraints for
# float16 / bfloat16; CUTLASS's are the stricter, so a layer that fits them fits either backend).
MULTIPLE = {"cutlass": (32, 64), "cusparselt": (16, 16)}


def sparse_kernels_problem() -> Optional[str]:
    """Why this machine cannot run 2:4 semi-structured kernels, or None."""
    problem = cuda_problem()
    if problem:
        return f"2:4 sparse kernels run on an NVIDIA GPU only: {problem}"
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    if (major, minor) < MIN_CAPABILITY:
        return (f"{torch.cuda.get_device_name(0)} has compute capability {major}.{minor}; 2:4 sparse tensor cores "
                "need 8.0 or newer (Ampere)")
    return None


def is_2_4(weight) -> bool:
    """True when at most 2 of every 4 consecutive inputs of each row are non-zero."""
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def shape_problem(shape: tuple[int, int], backend: str) -> Optional[str]:
    """Why a weight of this [out, in] shape cannot become a semi-structured tensor, or None."""
    multiple = MULTIPLE["cutlass" if backend == "auto" else backend]
    if shape[0] % multiple[0] or shape[1] % multiple[1]:
        return f"shape {list(shape)} is not a multiple of {list(multiple)}"
    return None


def candidate_layers(layers: dict, backend: str) -> tuple[list[str], dict[str, str]]:
    """Of `layers` (name -> nn.Linear), (the names whose weights are 2:4 sparse and fit the kernels, {name: why
    not} for the others)."""
    chosen, skipped = [], {}
    for name, layer in layers.items():
        weight = layer.weight.detach()
        why = shape_problem(tuple(weight.shape), backend) or (None if is_2_4(weight) else "not 2:4 sparse")
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return chosen, skipped


def to_semi_structured_(module, names: list[str], backend: str = "auto") -> str:
    """Swap each named layer's weight (on CUDA, float16 / bfloat16) for a semi-structured sparse tensor, in
    place; returns the kernel class used."""
    import torch
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    # A class-wide switch in torch: set it every time, so that one model's choice does not leak into another's.
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    if backend == "auto" and not torch.backends.cusparselt.is_available():
        SparseSemiStructuredTensor._FORCE_CUTLASS = True  # torch's CUTLASS kernels ship with every CUDA build
    kernel = ""
    for name in names:
        layer = module.get_submodule(name)
        sparse = to_sparse_semi_structured(layer.weight.detach().contiguous())
        layer.weight = torch.nn.Parameter(sparse, requires_grad=False)
        kernel = type(sparse).__name__
    return kernel


def write_record(folder: Path, record: dict) -> None:
    (folder / SPARSE_KERNELS_FILE).write_text(json.dumps(record, indent=2) + "\n")


def read_record(folder: Path) -> Optional[dict]:
    """The sparse-kernel record of a saved torch model, or None for a model without one."""
    path = Path(folder) / SPARSE_KERNELS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); run the sparsify stage again") from None
