"""`make gpu-wheels`: the wheels benchmarks/gpu_check.sh installs offline on the lent GPU machine, which has no
network. Its image holds CPython (3.12 expected; the version is not known here, so the compiled wheels come
for 3.11 and 3.13 too) with PyTorch (a CUDA build), Triton, ONNX Runtime (CPU build) and an older transformers; what compress pins beyond that comes along as wheels, in a folder that travels with the
source tree (64 MiB together).

Taken from pyproject.toml: every pinned dependency except torch (the image's CUDA build is the point),
onnxruntime (the image has the CPU build; onnxruntime-gpu cannot be had there), datasets, pyarrow and
matplotlib (Parquet sources and compare's plot; the image has pyarrow and matplotlib, and the GPU tests
use neither), plus the test extra's pytest. Then what those need that the image lacks (EXTRA below).
bitsandbytes comes too only if it fits what is left of the budget.

Usage: python benchmarks/gpu_wheels.py [--out gpu-wheels] [--python 3.12,3.11,3.13]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 64 * 2**20  # what may travel to the GPU machine: the source tree and this folder together
MARGIN = 4 * 2**20  # room for the tree to grow before the next `make gpu-wheels`
LEFT_OUT = {"torch", "onnxruntime", "datasets", "pyarrow", "matplotlib", "numpy", "bitsandbytes"}
# Needed by the pinned packages and absent from (or too old in) the GPU image: pydantic's core and helpers,
# compressed-tensors' logger, transformers' regex floor, onnx's protobuf and ml_dtypes floors, pytest's own.
EXTRA = ["pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5", "typing-extensions==4.16.0",
         "loguru==0.7.3", "regex==2026.11.19", "protobuf==7.36.2", "ml-dtypes==0.6.0", "iniconfig==2.3.1",
         "pluggy==1.7.0"]
PLATFORMS = ["manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_28_x86_64",
             "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def pinned() -> tuple[list[str], str]:
    """(compress's pinned dependencies that travel, the pytest pin)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = re.compile(r"^[A-Za-z0-9_.-]+")
    pins = [d for d in project["dependencies"] if "==" in d and name.match(d).group(0).lower() not in LEFT_OUT]
    [pytest] = [d for d in project["optional-dependencies"]["test"] if d.startswith("pytest")]
    return pins, pytest


def download(requirements: list[str], folder: Path, python: str) -> None:
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", python, "--implementation", "cp", "-d", str(folder)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run(command + requirements, check=True)


def tree_bytes() -> int:
    """Bytes of what travels besides the wheels: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return sum((ROOT / name).stat().st_size for name in listed if name and (ROOT / name).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu-wheels")
    parser.add_argument("--python", default="3.12,3.11,3.13",
                        help="the CPython versions the GPU image may have, most likely first (comma-separated): "
                             "pure-Python wheels come once, compiled ones per version")
    arguments = parser.parse_args()
    out = arguments.out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pins, pytest = pinned()
    versions = [v.strip() for v in arguments.python.split(",") if v.strip()]
    for python in versions:  # pip skips the wheels already there: only compiled ones are added per version
        download(pins + [pytest] + EXTRA, out, python)
    # What gpu_check.sh installs with pip's resolver (pytest only where the image has none: its plugins
    # are built against the image's own).
    (out / "requirements.txt").write_text("\n".join(pins + EXTRA) + "\n")
    (out / "pytest.txt").write_text(pytest + "\n")
    left = BUDGET - MARGIN - tree_bytes() - folder_bytes(out)
    bnb = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
           if d.startswith("bitsandbytes")]
    trial = out / ".bitsandbytes"
    try:
        download(bnb, trial, versions[0])
        size = folder_bytes(trial)
        if size <= left:
            for wheel in trial.iterdir():
                wheel.rename(out / wheel.name)
            (out / "requirements.txt").write_text((out / "requirements.txt").read_text() + bnb[0] + "\n")
            print(f"{bnb[0]}: {size / 2**20:.1f} MiB, fits")
        else:
            print(f"{bnb[0]}: {size / 2**20:.1f} MiB, left out ({max(left, 0) / 2**20:.1f} MiB left in the budget)")
    except subprocess.CalledProcessError:
        print(f"{bnb[0]}: no wheel for CPython {versions[0]}; left out")
    finally:
        shutil.rmtree(trial, ignore_errors=True)
    wheels, tree = folder_bytes(out), tree_bytes()
    for wheel in sorted(out.glob("*.whl"), key=lambda p: p.stat().st_size, reverse=True):
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{wheels / 2**20:.1f} MiB of wheels + {tree / 2**20:.1f} MiB of source tree = "
          f"{(wheels + tree) / 2**20:.1f} MiB of {BUDGET / 2**20:.0f} MiB")
    return 0 if wheels + tree <= BUDGET else 1


if __name__ == "__main__":
    sys.exit(main())
