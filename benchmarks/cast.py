"""Half precision on this CPU: torch float32 / bfloat16 / float16 and ONNX Runtime float32 / float16,
timed side by side in alternating blocks in one process, with each cast's output difference.

Models: the sentiment classifier (MiniLM-L6) at batch 1 x 128 tokens, and SmolLM2-135M at
1 x 128 tokens (one prompt forward pass). Every form comes from compress's own stages (export_onnx,
optimize_onnx for the classifier's ONNX baseline, cast), so what is timed is what a recipe ships.
Latency ratios are against torch float32 (torch rows) and ONNX float32 (ONNX rows). bfloat16 matrix
products are native on CPUs with AVX-512 BF16 or AMX and emulated elsewhere; the CPU's flags are
printed with the table.

Usage: python benchmarks/cast.py [--models classifier,smollm2] [--iterations 60]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def forms(checkpoint: Path, task: str, root: Path):
    """(name, artifact, cast details) for every form of one model."""
    from compressor.artifacts import TorchModel
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.cast.cast import CastConfig
    from compressor.stages.export.export_onnx import ExportOnnxConfig

    def stage(config, artifact, name):
        ctx = StageContext(root / name, task, threads=2)
        ctx.workdir.mkdir(parents=True)
        return REGISTRY[config.type].run(config, artifact, ctx), ctx.details

    source = TorchModel(checkpoint, task)
    found = [("torch fp32", source, {})]
    for dtype in ("bfloat16", "float16"):
        result, details = stage(CastConfig(type="cast", dtype=dtype), source, f"torch-{dtype}")
        found.append((f"torch {dtype}", result, details))
    onnx32, _ = stage(ExportOnnxConfig(type="export_onnx", atol=1e-3), source, "onnx")
    found.append(("onnx fp32", onnx32, {}))
    onnx16, details = stage(CastConfig(type="cast", dtype="float16"), onnx32, "onnx-float16")
    found.append(("onnx float16", onnx16, details))
    return found


def measure(label: str, checkpoint: Path, task: str, iterations: int) -> None:
    from compressor.bench import benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.recipe import EvaluationConfig
    from compressor.runners import make_runner

    dataset = "sentiment-test" if task == "text-classification" else "lee-background"
    samples = load_samples(EvaluationConfig.model_validate({"data": {"dataset": dataset}}).data, task)
    feed = benchmark_feed(load_tokenizer(checkpoint), samples.texts, 1, 128)
    with tempfile.TemporaryDirectory() as tmp:
        found = forms(checkpoint, task, Path(tmp))
        runners = [make_runner(artifact, name, threads=2) for name, artifact, _ in found]
        latency = interleaved(runners, feed, warmup=5, iterations=iterations)
        print(f"\n{label}: batch 1 x 128 tokens, 2 threads, {iterations} calls each in alternating blocks")
        print(f"{'form':14} {'p50 ms':>8} {'/ fp32':>7} {'size MB':>8} {'rel. diff':>10}")
        for name, artifact, details in found:
            base = "torch fp32" if name.startswith("torch") else "onnx fp32"
            ratio = latency[name].p50 / latency[base].p50
            diff = f"{details['relative_diff']:.2e}" if details else "-"
            print(f"{name:14} {latency[name].p50:8.2f} {ratio:7.3f} {artifact.size_mb():8.1f} {diff:>10}")


def main() -> None:
    from compressor import fixtures, machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="classifier,smollm2")
    parser.add_argument("--iterations", type=int, default=60)
    args = parser.parse_args()
    facts = machine.describe()
    print(f"machine: {facts['cpu_model']}, {facts['cpu_count']} CPUs, flags {' '.join(facts['isa_flags'])}")
    chosen = args.models.split(",")
    if "classifier" in chosen:
        measure("sentiment classifier (MiniLM-L6)", fixtures.ensure("sentiment-classifier"), "text-classification",
                args.iterations)
    if "smollm2" in chosen:
        measure("SmolLM2-135M (prompt)", fixtures.ensure("smollm2"), "text-generation", args.iterations)


if __name__ == "__main__":
    main()
