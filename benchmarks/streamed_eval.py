"""How slow evaluation block by block is: a synthetic Llama-shaped checkpoint with random bfloat16 weights
(default the Llama-2-7B shape of benchmarks/memory_scaling.py, 13.8 GB) run through the runner `compress
run` uses for a model that fits in memory neither as float32 nor as stored (runners.StreamedRunner: each
forward pass reads every block from its shard, runs it and drops it). A child process times a few
forward passes of one evaluation batch and reports its peak resident set (VmHWM); the first pass reads
the shards from disk, later ones from whatever the page cache kept.

Random weights: time and memory only; the logits mean nothing (their equality with the in-memory model
is tested on a small model in tests/test_layerwise.py).

Usage: python benchmarks/streamed_eval.py [--hidden 4096 --layers 32] [--batch 4 --tokens 256] [--passes 2]
       [--in-memory] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _memory_scaling():
    spec = importlib.util.spec_from_file_location("memory_scaling", HERE / "memory_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(folder: Path, batch: int, tokens: int, passes: int, in_memory: bool) -> None:
    import numpy as np
    import torch

    from compressor.artifacts import TorchModel
    from compressor.runners import StreamedRunner, TorchRunner

    if in_memory:  # the same model loaded whole in bf16, as from_pretrained loads it (one copy fits here)
        from transformers import AutoModelForCausalLM

        module = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
        runner = TorchRunner(module, "text-generation", name="in-memory", threads=2)
    else:
        runner = StreamedRunner(TorchModel(folder, "text-generation"), "streamed", threads=2, dtype="bfloat16")
    ids = np.random.default_rng(0).integers(3, 32000, size=(batch, tokens)).astype(np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    seconds = []
    for _ in range(passes):
        started = time.perf_counter()
        logits = runner(feed)
        seconds.append(round(time.perf_counter() - started, 1))
    np.save(folder.parent / f"logits-{'memory' if in_memory else 'streamed'}.npy", logits[:, -1])
    print(json.dumps({"runner": runner.backend, "pass_seconds": seconds,
                      "peak_mb": round(_memory_scaling().peak_resident_mb()),
                      "logits_shape": list(logits.shape), "finite": bool(np.isfinite(logits).all())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--in-memory", action="store_true",
                        help="also time the model loaded whole in bf16 (needs one bf16 copy of memory)")
    parser.add_argument("--keep", help="work in this folder and keep the checkpoint (reused when present)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.batch, args.tokens, args.passes, args.in_memory)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="streamed-eval-"))
    folder = root / f"llama-h{args.hidden}-l{args.layers}"
    try:
        if not (folder / "config.json").exists():
            started = time.perf_counter()
            size = _memory_scaling().make_checkpoint(folder, args.hidden, args.layers)
            print(json.dumps({"checkpoint_gb_bf16": round(size, 2), "write_s": round(time.perf_counter() - started)}),
                  flush=True)
        for in_memory in ([False, True] if args.in_memory else [False]):
            result = _memory_scaling().json_child(
                __file__, ["--child", str(folder), "--batch", str(args.batch), "--tokens", str(args.tokens),
                           "--passes", str(args.passes)] + (["--in-memory"] if in_memory else []), "the forward")
            print(json.dumps({"hidden": args.hidden, "layers": args.layers, "batch": args.batch,
                              "tokens": args.tokens, **result}), flush=True)
        if args.in_memory:
            import numpy as np

            streamed, whole = (np.load(root / f"logits-{kind}.npy") for kind in ("streamed", "memory"))
            print(json.dumps({"last_token_logits_max_abs_difference": float(np.abs(streamed - whole).max())}))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
