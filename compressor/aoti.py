"""AOTInductor packages (`model.pt2`): what compiling one needs here, the metadata written beside it, and the
refusal to load it where it was not built for.

A package holds compiled kernels and the weights; it is loaded by torch alone
(torch._inductor.aoti_load_package), without transformers or the model's Python code. Its kernels are
built for one device kind and one torch version (and, on CUDA, one GPU architecture), so
`model.pt2.json` records them and loading compares them with the machine before torch sees the file.
A leaf: the export_aoti stage writes packages, runners load them."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from .artifacts import AotiModel
from .cuda import cuda_problem
from .engine import gpu_identity
from .errors import BackendMissing, UserError

METADATA_FORMAT = 1


def cxx_compiler() -> Optional[str]:
    """The C++ compiler Inductor would call (it compiles the package's wrapper and CPU kernels), or None."""
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def aoti_problem(device: str) -> Optional[str]:
    """Why an AOTInductor package for `device` cannot be compiled and run here, or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    if device == "cuda":
        problem = cuda_problem()
        if problem:
            return f"an AOTInductor package for cuda is compiled and run on an NVIDIA GPU: {problem}"
        if importlib.util.find_spec("triton") is None:
            return "Inductor writes its CUDA kernels in Triton, which is not installed (pip install triton)"
    if cxx_compiler() is None:
        return ("AOTInductor compiles C++ (the package's wrapper, and CPU kernels) and found no compiler: install "
                "g++ (or set CXX)")
    return None


def gpu_name() -> Optional[str]:
    return (gpu_identity() or {}).get("name")


def write_metadata(package: AotiModel, metadata: dict) -> None:
    package.metadata_path.write_text(json.dumps({"format": METADATA_FORMAT, **metadata}, indent=2) + "\n")


def read_metadata(package: AotiModel) -> dict:
    path = package.metadata_path
    if not path.is_file():
        raise UserError(f"{package.path}: no {path.name} beside it (device, dtype, inputs, torch version); "
                        "export it again with the export_aoti stage")
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); export the package again") from None


def check_loadable(metadata: dict, path: Path) -> None:
    """Refuse a package built by another torch version, or for CUDA where there is no GPU or another one."""
    import torch

    if metadata.get("torch") != torch.__version__:
        raise UserError(f"{path}: compiled by torch {metadata.get('torch')}, this is torch {torch.__version__}; "
                        "AOTInductor packages load only in the torch that built them: run the recipe again here")
    if metadata.get("device") == "cuda":
        problem = cuda_problem()
        if problem:
            raise BackendMissing(f"{path}: a package compiled for cuda; {problem}")
        here = gpu_name()
        if metadata.get("gpu") and metadata["gpu"] != here:
            raise UserError(f"{path}: compiled for {metadata['gpu']}, this GPU is {here}; its kernels were tuned "
                            "and built for that GPU's architecture: run the recipe again here")
