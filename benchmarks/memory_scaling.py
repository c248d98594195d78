"""Peak memory of layer-by-layer compression as models grow: synthetic Llama-shaped checkpoints with random
bfloat16 weights (written shard by shard, never whole in memory) at a fixed width and growing depth, and a
Llama-2-7B-shaped one, each through Wanda 50% and then int8 weight-only, both with `execution: layerwise`.
Every stage runs in a child process of its own, which reports its peak resident set (VmHWM) and time.

Random weights: memory and time only; the quality of the result means nothing and is not measured.
The vocabulary is SmolLM2's (49,152 tokens), because its tokenizer is the one shipped here; Llama-2's is
32,000, so the 7B shape has 0.14B parameters more than Llama-2-7B.

Usage: python benchmarks/memory_scaling.py [--depths 4,8,16,32] [--hidden 2048] [--seven-b] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDTHS = {2048: {"intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4},  # TinyLlama
          4096: {"intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}}  # Llama-2-7B
CALIBRATION = {"data": {"dataset": "lee-test", "segment": "window"}, "samples": 8, "max_length": 128,
               "batch_size": 4}


def make_checkpoint(folder: Path, hidden: int, layers: int) -> float:
    """A random bf16 Llama checkpoint in 2 GB shards with SmolLM2's tokenizer; returns its size in GB."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, LlamaConfig

    from compressor import fixtures
    from compressor.shards import ShardWriter

    tokenizer_source = fixtures.ensure("smollm2")
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, vocab_size=49152,
                         max_position_embeddings=2048, tie_word_embeddings=False, dtype="bfloat16",
                         bos_token_id=1, eos_token_id=2, **WIDTHS[hidden])
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    writer = ShardWriter(folder, shard_bytes=2 * 1024 ** 3)
    generator = torch.Generator().manual_seed(0)
    total = 0
    for name, tensor in skeleton.state_dict().items():
        if name.endswith("inv_freq"):
            continue
        if tensor.dim() == 1:
            value = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
        writer.add(name, value)
        total += value.numel() * 2
    writer.finish()
    config.save_pretrained(folder)
    for item in tokenizer_source.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, folder / item.name)
    return total / 1e9


def child(stage: str, source: Path, workdir: Path) -> None:
    """Run one stage layer by layer and print {seconds, peak_mb, out}."""
    from compressor.artifacts import TorchModel
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.prune.prune import PruneConfig
    from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig

    if stage == "wanda":
        config = PruneConfig(type="prune", method="wanda", sparsity=0.5, execution="layerwise",
                             calibration=CALIBRATION)
    else:
        config = Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only", execution="layerwise")
    workdir.mkdir(parents=True)
    started = time.perf_counter()
    ctx = StageContext(workdir, "text-generation", 2)
    result = REGISTRY[config.type].run(config, TorchModel(source, "text-generation"), ctx)
    seconds = time.perf_counter() - started
    peak_mb = peak_resident_mb()
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "out": str(result.path),
                      "execution": ctx.details.get("execution")}))


def peak_resident_mb() -> float:
    """This process's peak resident set (VmHWM). Not ru_maxrss: Linux carries the parent's peak at fork
    into the child's, so every child would report at least what the checkpoint writer held."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def json_child(script: str, arguments: list[str], what: str) -> dict:
    """Run `script` with `arguments` in a child process of its own (its peak memory alone) and return the
    JSON object its last line prints; stop with its error output if it fails."""
    done = subprocess.run([sys.executable, script, *arguments], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{what} failed:\n" + "\n".join(done.stderr.splitlines()[-20:]))
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_child(stage: str, source: Path, workdir: Path) -> dict:
    return json_child(__file__, ["--child", stage, str(source), str(workdir)], f"{stage} on {source}")


def measure(hidden: int, layers: int, root: Path, keep: bool) -> dict:
    folder = root / f"llama-h{hidden}-l{layers}"
    started = time.perf_counter()
    size_gb = make_checkpoint(folder, hidden, layers)
    written = time.perf_counter() - started
    wanda = run_child("wanda", folder, root / f"wanda-h{hidden}-l{layers}")
    int8 = run_child("int8", Path(wanda["out"]), root / f"int8-h{hidden}-l{layers}")
    out_gb = sum(p.stat().st_size for p in Path(int8["out"]).glob("*.safetensors")) / 1e9
    row = {"hidden": hidden, "layers": layers, "checkpoint_gb": size_gb, "write_s": written,
           "wanda_s": wanda["seconds"], "wanda_peak_mb": wanda["peak_mb"], "int8_s": int8["seconds"],
           "int8_peak_mb": int8["peak_mb"], "int8_gb": out_gb}
    print(json.dumps(row), flush=True)
    if not keep:
        for path in (folder, root / f"wanda-h{hidden}-l{layers}", root / f"int8-h{hidden}-l{layers}"):
            shutil.rmtree(path, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="4,8,16,32")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--seven-b", action="store_true", help="also the Llama-2-7B shape (hidden 4096, 32 blocks)")
    parser.add_argument("--keep", help="work in this folder and keep the checkpoints")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child[0], Path(args.child[1]), Path(args.child[2]))

    from compressor.machine import describe

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="memory-scaling-"))
    root.mkdir(parents=True, exist_ok=True)
    shapes = [(args.hidden, int(d)) for d in args.depths.split(",") if d] + ([(4096, 32)] if args.seven_b else [])
    try:
        rows = [measure(hidden, layers, root, bool(args.keep)) for hidden, layers in shapes]
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nWanda 50% (calibration: {CALIBRATION['samples']} x {CALIBRATION['max_length']} tokens of lee-test) "
          "then int8 weight-only, both layer by layer, random bf16 weights")
    print(f"{'hidden':>6} {'blocks':>6} {'ckpt GB':>8} {'Wanda s':>8} {'Wanda MB':>9} {'int8 s':>7} {'int8 MB':>8} "
          f"{'int8 GB':>8}")
    for r in rows:
        print(f"{r['hidden']:6d} {r['layers']:6d} {r['checkpoint_gb']:8.2f} {r['wanda_s']:8.0f} "
              f"{r['wanda_peak_mb']:9.0f} {r['int8_s']:7.0f} {r['int8_peak_mb']:8.0f} {r['int8_gb']:8.2f}")
    same_width = [r for r in rows if r["hidden"] == args.hidden]
    if len(same_width) > 1:
        first, last = same_width[0], same_width[-1]
        for stage in ("wanda", "int8"):
            growth = last[f"{stage}_peak_mb"] / first[f"{stage}_peak_mb"] - 1
            print(f"{stage}: peak grows {growth:+.1%} from {first['layers']} to {last['layers']} blocks "
                  f"(target <= +10%): {'met' if growth <= 0.10 else 'MISSED'}")
    big = [r for r in rows if r["hidden"] == 4096]
    if big:
        peak = max(big[0]["wanda_peak_mb"], big[0]["int8_peak_mb"])
        print(f"7B shape: peak {peak:.0f} MB (target <= 6144 MB): {'met' if peak <= 6144 else 'MISSED'}")
    machine = describe()
    print(f"machine: {machine['cpu_model']}, {machine['cpu_count']} cores, flags {' '.join(machine['isa_flags'])}")


if __name__ == "__main__":
    main()
