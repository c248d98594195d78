"""The quantized token table in an exported int4 graph, three ways, timed side by side in alternating blocks
in one process, with each file's size and how far its logits are from its torch model's and from float32's:

- int8 table (the default): the table and the head tied to it stay one float matrix in the graph (their
  dequantized values), what export_onnx writes for it;
- int8 table as GatherBlockQuantized and the tied head as an 8-bit MatMulNBits on the same codes (the form
  export_onnx does not write for int8: this run is why);
- int4 table (`embeddings: int4`): GatherBlockQuantized and a 4-bit MatMulNBits head on the same codes.

Model: SmolLM2-135M (tied head, 49,152 x 576 table: 21% of its parameters), torch int4 round to nearest in
asymmetric groups of 32, exported by compress's export_onnx; the second form is the same stage with its
vocabulary plan overridden.

Usage: python benchmarks/onnx_vocabulary.py [--iterations 40]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from unittest import mock


def exports(checkpoint: Path, root: Path):
    """{form name: (its torch int4 model, its ONNX model)}."""
    from compressor.artifacts import TorchModel
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.export import int4_export
    from compressor.stages.export.export_onnx import ExportOnnxConfig
    from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig

    def stage(config, artifact, name):
        ctx = StageContext(root / name, "text-generation", threads=2)
        ctx.workdir.mkdir(parents=True)
        return REGISTRY[config.type].run(config, artifact, ctx), ctx.details

    def quantized(scheme):
        config = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", block_size=32, embeddings=scheme)
        return stage(config, TorchModel(checkpoint, "text-generation"), f"int4-{scheme}")[0]

    export = ExportOnnxConfig(type="export_onnx", atol=1e-3)
    eight, four = quantized("int8"), quantized("int4")
    forms = {"int8 table, float in the graph": (eight, stage(export, eight, "onnx-int8")[0])}
    with mock.patch.object(int4_export, "vocabulary_plan", lambda scheme, head, tied: (True, True, None)):
        forms["int8 GatherBlockQuantized + 8-bit head"] = (eight, stage(export, eight, "onnx-int8-packed")[0])
    packed, details = stage(export, four, "onnx-int4")
    assert details["head"] == "int4 MatMulNBits, reading the table's codes", details
    forms["int4 GatherBlockQuantized + 4-bit head"] = (four, packed)
    return forms


def main() -> None:
    import numpy as np

    from compressor import fixtures, machine
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.recipe import EvaluationConfig
    from compressor.runners import make_runner

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=40)
    args = parser.parse_args()
    facts = machine.describe()
    print(f"machine: {facts['cpu_model']}, {facts['cpu_count']} CPUs, flags {' '.join(facts['isa_flags'])}")
    checkpoint = fixtures.ensure("smollm2")
    tokenizer = load_tokenizer(checkpoint)
    samples = load_samples(EvaluationConfig.model_validate({"data": {"dataset": "lee-background"}}).data,
                           "text-generation")
    with tempfile.TemporaryDirectory() as tmp:
        forms = exports(checkpoint, Path(tmp))
        texts = benchmark_feed(tokenizer, samples.texts, 4, 256)
        float32 = make_runner(TorchModel(checkpoint, "text-generation"), "torch fp32", threads=2)(texts)
        runners = [make_runner(model, name, threads=2) for name, (_, model) in forms.items()]
        print(f"\n{'form':40} {'size MB':>8} {'max|diff|/max|logit| vs torch':>30} {'top-1 = torch':>14} "
              f"{'top-1 = fp32':>13}")
        for runner in runners:
            source, model = forms[runner.name]
            expected, got = make_runner(source, "torch", threads=2)(texts), runner(texts)
            relative = float(np.abs(got - expected).max() / np.abs(expected).max())
            print(f"{runner.name:40} {model.size_mb():8.1f} {relative:30.2e} "
                  f"{float((got.argmax(-1) == expected.argmax(-1)).mean()):14.4f} "
                  f"{float((got.argmax(-1) == float32.argmax(-1)).mean()):13.4f}")
        for batch, length in ((1, 128), (1, 16)):
            feed = benchmark_feed(tokenizer, samples.texts, batch, length)
            latency = interleaved(runners, feed, warmup=5, iterations=args.iterations)
            base = latency[runners[0].name].p50
            print(f"\nbatch {batch} x {length} tokens, 2 threads, {args.iterations} calls each in alternating blocks")
            for runner in runners:
                print(f"  {runner.name:40} p50 {latency[runner.name].p50:8.2f} ms  "
                      f"{latency[runner.name].p50 / base:6.3f}x")

if __name__ == "__main__":
    main()
