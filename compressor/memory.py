"""Peak memory of serving one side of a comparison, each measured in a fresh child process.

Why a child process: the run itself holds the baseline, the result, calibration data and every
runtime at once, and a process's peak resident memory (VmHWM) never goes down, so nothing measured
inside it could be told apart. The child (`python -m compressor.memory`) imports only the runtime
the side needs (torch, or ONNX Runtime), loads the model as a server would, runs one evaluation-
shaped batch and the benchmark input, and reports:
- peak_rss_mb: the process's peak resident memory (VmHWM), what a server process needs;
- runtime_rss_mb: its resident memory after importing the runtime, before the model (the part no
  compression changes);
- cuda_peak_mb: torch.cuda.max_memory_allocated, on CUDA.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from .artifacts import TorchModel, artifact_from_spec, artifact_spec
from .errors import StageFailed

PROBE_TIMEOUT_S = 1800
# glibc raises its mmap threshold each time a large block is freed, after which freed tensors stay in
# the heap instead of going back to the system: the same model then peaked 977 MB in one process and
# 1,109 MB in the next. A fixed threshold returns every large tensor when it is freed, so the peak is
# the memory in use, the same from run to run (a server can set the same variable).
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure(side: dict, feeds: list[dict[str, np.ndarray]], runner_args: dict) -> dict:
    """Peak memory of one side, in a child process. `side`: {"artifact": artifact_spec(...)} or, for
    a baseline that a recipe's first stage builds (merge_lora's unmerged adapters), {"baseline_stage":
    the stage config as JSON, "checkpoint": path, "task": task}."""
    with tempfile.TemporaryDirectory(prefix="compress-memory-") as folder:
        folder = Path(folder)
        for index, feed in enumerate(feeds):
            np.savez(folder / f"feed{index}.npz", **feed)
        (folder / "side.json").write_text(json.dumps({"side": side, "feeds": len(feeds),
                                                      "runner_args": runner_args}))
        try:
            done = subprocess.run([sys.executable, "-m", "compressor.memory", str(folder)], capture_output=True,
                                  text=True, timeout=PROBE_TIMEOUT_S, env={**os.environ, **ALLOCATOR})
        except subprocess.TimeoutExpired:
            raise StageFailed(f"measuring peak memory took over {PROBE_TIMEOUT_S} s in its child process; run with "
                              "--no-memory to skip it") from None
        result = folder / "memory.json"
        if done.returncode != 0 or not result.exists():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise StageFailed(f"measuring peak memory failed in its child process (exit {done.returncode}): "
                              + " | ".join(tail))
        return json.loads(result.read_text())


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _probe(folder: Path) -> None:
    """The child's side: import the runtime, load, run, report."""
    request = json.loads((folder / "side.json").read_text())
    side, runner_args = request["side"], request["runner_args"]
    kind = side.get("artifact", {}).get("kind", "torch")
    device = runner_args.get("device", "cpu")
    runtimes = {"onnx": ("onnxruntime",), "engine": ("torch", "tensorrt")}.get(kind, ("torch", "transformers"))
    for name in runtimes:
        importlib.import_module(name)  # the runtime's own memory, counted before the model's
    runtime = _status_mb("VmRSS")
    feeds = [dict(np.load(folder / f"feed{i}.npz")) for i in range(request["feeds"])]
    if "baseline_stage" in side:
        from .recipe import StageConfig
        from .stages import REGISTRY
        from pydantic import TypeAdapter

        config = TypeAdapter(StageConfig).validate_python(side["baseline_stage"])
        source = TorchModel(Path(side["checkpoint"]), side["task"])
        runner = REGISTRY[config.type].baseline(config, source, side["task"], runner_args)[0]
    else:
        from .runners import make_runner

        runner = make_runner(artifact_from_spec(side["artifact"]), "memory", **runner_args)
    batch, length = runner.fixed_shape
    for feed in feeds:
        ids = feed["input_ids"]
        if (batch and ids.shape[0] != batch) or (length and ids.shape[1] != length):
            continue  # a model fixed to other shapes runs only the input that fits it
        runner(feed)
    peak = _status_mb("VmHWM")  # before anything else is imported
    cuda = None
    if device == "cuda" and kind == "torch":  # ONNX Runtime and TensorRT do not allocate through torch
        import torch

        cuda = torch.cuda.max_memory_allocated() / 2**20
    (folder / "memory.json").write_text(json.dumps({"peak_rss_mb": round(peak, 1),
                                                    "runtime_rss_mb": round(runtime, 1),
                                                    "cuda_peak_mb": None if cuda is None else round(cuda, 1)}))


def side_for_baseline(recipe, checkpoint: Path) -> dict:
    """What the memory probe loads for a recipe's baseline: its first stage's own baseline where it
    has one (baseline_key set), else the checkpoint."""
    from .stages import REGISTRY

    first = recipe.stages[0]
    if REGISTRY[first.type].baseline_key(first) is not None:
        return {"baseline_stage": first.model_dump(mode="json"), "checkpoint": str(checkpoint), "task": recipe.task}
    return {"artifact": artifact_spec(TorchModel(checkpoint, recipe.task))}


if __name__ == "__main__":
    _probe(Path(sys.argv[1]))
