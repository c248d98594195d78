"""Calibration split across processes (distributed.py) against one process, on SmolLM2-135M: a calibrated
stage (SparseGPT 50% by default, or GPTQ int4) run once in one process and once in N processes over gloo,
each process taking every N-th calibration batch, and once more in one process with the threads each of
the N gets. Prints each run's stage time and how far the results are apart (largest weight difference,
share of pruning-mask entries or int4 codes that differ).

On a CPU the processes share its cores (each gets cores / N threads), so the split pays where each
process has cores or a device of its own; the figure here says what it costs or gains on this machine.

Usage: python benchmarks/split_calibration.py [--stage sparsegpt|gptq] [--nproc 2] [--samples 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

TASK = "text-generation"


def config(stage: str, samples: int):
    from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
    from compressor.stages.prune.prune import PruneConfig

    calibration = {"data": {"dataset": "lee-test", "segment": "window"}, "samples": samples, "max_length": 256,
                   "batch_size": 4}
    if stage == "gptq":
        return Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm="gptq", block_size=32,
                                    calibration=calibration)
    return PruneConfig(type="prune", method="sparsegpt", sparsity=0.5, calibration=calibration)


def run_stage(stage: str, samples: int, checkpoint: Path, workdir: Path) -> tuple[Path, float]:
    from compressor.artifacts import TorchModel
    from compressor.stages import REGISTRY, StageContext

    chosen = config(stage, samples)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = REGISTRY[chosen.type].run(chosen, TorchModel(checkpoint, TASK), StageContext(workdir, TASK, 2))
    return result.path, time.perf_counter() - started


def one_rank(rank: int, size: int, port: int, stage: str, samples: int, checkpoint: str, workdir: str) -> None:
    from compressor import distributed

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    distributed.start()
    try:
        path, seconds = run_stage(stage, samples, Path(checkpoint), Path(workdir) / f"rank{rank}")
        if rank == 0:
            (Path(workdir) / "split.json").write_text(json.dumps({"path": str(path), "seconds": seconds}))
    finally:
        distributed.stop()


def compare(one: Path, split: Path) -> dict:
    import torch

    from compressor.shards import read_state

    expected, written = read_state(one), read_state(split)
    largest, masks, differing = 0.0, 0, 0
    for name, tensor in expected.items():
        other = written[name]
        if tensor.is_floating_point():
            largest = max(largest, float((other.float() - tensor.float()).abs().max()))
            if name.endswith("proj.weight"):
                masks += tensor.numel()
                differing += int(((other == 0) != (tensor == 0)).sum())
        elif not torch.equal(other, tensor):
            differing += int((other != tensor).sum())
            masks += tensor.numel()
    return {"largest_weight_difference": largest, "differing_share": differing / max(masks, 1)}


def main() -> None:
    import torch
    import torch.multiprocessing as mp

    from compressor import distributed, fixtures

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=["sparsegpt", "gptq"], default="sparsegpt")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--samples", type=int, default=16, help="windows of 256 tokens of lee-test (19 at most)")
    args = parser.parse_args()
    checkpoint = fixtures.ensure("smollm2")
    with tempfile.TemporaryDirectory(prefix="split-calibration-") as scratch:
        root = Path(scratch)
        one, one_seconds = run_stage(args.stage, args.samples, checkpoint, root / "one")
        print(json.dumps({"processes": 1, "threads": torch.get_num_threads(), "stage_seconds": round(one_seconds, 1)}),
              flush=True)
        # Each of N processes computes with cores / N threads, and float32 sums come out in another order
        # with another thread count: this run separates that from the split itself.
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.nproc))
        narrow, narrow_seconds = run_stage(args.stage, args.samples, checkpoint, root / "narrow")
        print(json.dumps({"processes": 1, "threads": torch.get_num_threads(), "stage_seconds": round(narrow_seconds, 1),
                          "against_default_threads": compare(one, narrow)}), flush=True)
        torch.set_num_threads(threads)
        started = time.perf_counter()
        mp.spawn(one_rank, args=(args.nproc, distributed._free_port(), args.stage, args.samples, str(checkpoint),
                                 str(root / "split")), nprocs=args.nproc)
        wall = time.perf_counter() - started
        split = json.loads((root / "split" / "split.json").read_text())
        print(json.dumps({"processes": args.nproc, "stage_seconds": round(split["seconds"], 1),
                          "with_process_start_seconds": round(wall, 1),
                          "against_default_threads": compare(one, Path(split["path"])),
                          "against_same_threads": compare(narrow, Path(split["path"]))}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
