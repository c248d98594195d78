"""Generation speed of SmolLM2-135M on this CPU, split into what the runtime buys and what 4-bit
weights buy: torch fp32, ONNX Runtime fp32 and ONNX Runtime int4 (torch GPTQ, asymmetric groups of
32, exported with its codes into MatMulNBits), the two ONNX models exported with past key/values.
All three decode greedily after the same 128-token prompt of evaluation text, timed in alternating
rounds by compress's own generation timer (compressor/generation.py).

Usage: python benchmarks/generation.py [--new-tokens 32] [--rounds 5] [--prompt-tokens 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

CALIBRATION = {"data": {"dataset": "lee-test", "segment": "window"}, "samples": 16, "max_length": 256,
               "batch_size": 4}
TASK = "text-generation"


def main() -> None:
    from compressor import fixtures, machine
    from compressor.artifacts import TorchModel
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.generation import prompt_ids, time_generation
    from compressor.recipe import EvaluationConfig
    from compressor.runners import make_runner
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.export.export_onnx import ExportOnnxConfig
    from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    facts = machine.describe()
    print(f"machine: {facts['cpu_model']}, {facts['cpu_count']} CPUs, flags {' '.join(facts['isa_flags'])}")
    checkpoint = fixtures.ensure("smollm2")
    samples = load_samples(EvaluationConfig.model_validate({"data": {"dataset": "lee-background"}}).data, TASK)
    prompt = prompt_ids(load_tokenizer(checkpoint), samples.texts, args.prompt_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        def stage(config, artifact, name):
            ctx = StageContext(Path(tmp) / name, TASK, threads=2)
            ctx.workdir.mkdir(parents=True)
            return REGISTRY[config.type].run(config, artifact, ctx)

        source = TorchModel(checkpoint, TASK)
        export = ExportOnnxConfig(type="export_onnx", with_past=True, atol=1e-3)
        fp32 = stage(export, source, "onnx-fp32")
        gptq = stage(Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm="gptq", block_size=32,
                                          act_order=True, calibration=CALIBRATION), source, "gptq")
        int4 = stage(export, gptq, "onnx-int4")
        runners = [make_runner(source, "torch fp32", threads=2), make_runner(fp32, "onnx fp32", threads=2),
                   make_runner(int4, "onnx int4", threads=2)]
        times = time_generation(runners, prompt, args.new_tokens, args.rounds)
    print(f"\nSmolLM2-135M, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens, batch 1, 2 threads, "
          f"{args.rounds} rounds per form, alternating")
    print(f"{'form':12} {'first token ms':>15} {'decode ms/token':>16} {'tokens/s':>9} {'/ torch fp32':>13}")
    base = times["torch fp32"].summary(args.prompt_tokens, args.new_tokens)["decode_ms_per_token"]
    for name, measured in times.items():
        summary = measured.summary(args.prompt_tokens, args.new_tokens)
        print(f"{name:12} {summary['time_to_first_token_ms']:15.1f} {summary['decode_ms_per_token']:16.2f} "
              f"{summary['tokens_per_s']:9.1f} {base / summary['decode_ms_per_token']:12.2f}x")


if __name__ == "__main__":
    main()
