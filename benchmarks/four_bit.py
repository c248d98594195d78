"""4-bit weight-only quantization of SmolLM2-135M and LoRA merging, measured side by side in one process.

Sections (all by default; pick with --sections):
- onnx: ONNX int4 (MatMulNBits) by RTN, GPTQ and HQQ at blocks of 32 and 128 (a variant may add
  `:al4`, accuracy_level 4 = int8 activations): perplexity on lee_background (32 windows of 256
  tokens, the shipped recipes' evaluation) as a ratio to the fp32 ONNX model, file size ratio, and
  prompt latency (batch 1, 128 tokens) against ONNX fp32 in alternating blocks. GPTQ (asymmetric,
  act order) runs on the torch model, calibrated on 16 windows of 256 tokens of lee-test (news
  documents not in lee_background), and reaches ONNX through export_onnx, which keeps its codes.
- decode: the same model exported with past key values; per-token decode latency (batch 1, one new
  token after a 128-token prompt) of int4 RTN blocks of 32, with and without accuracy_level 4,
  against fp32, in alternating blocks. GPTQ and HQQ write the same MatMulNBits layout, so their
  kernels and latency are RTN's.
- bnb: bitsandbytes nf4 and fp4 (torch, double quant, float32 compute): perplexity against torch
  fp32, size of the saved folder, prompt latency against torch fp32.
- lora: the sentiment-lora adapter merged into MiniLM-L6: max abs difference of merged vs unmerged
  logits, and latency (batch 1, 128 tokens, torch) of the merged model and of the unmerged PEFT
  model against the base model without adapter (target: merged / base <= 1.02).

Anchors: GPTQ 4-bit on OPT-125M 1.125x fp16 perplexity; AWQ on Llama-2-7B 1.024x.
Caveat, printed with the results: SmolLM2's shipped weights were 4-bit once (Q4_1), which flatters
4-bit numbers, most of all for methods with float zero points (HQQ).

Usage: python benchmarks/four_bit.py [--sections onnx,decode,bnb,lora]
       [--variants rtn:32,rtn:128,gptq:32,gptq:128,hqq:32,hqq:128,rtn:32:al4]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

CALIBRATION = {"data": {"dataset": "lee-test", "segment": "window"}, "samples": 16, "max_length": 256,
               "batch_size": 4}
TASK = "text-generation"
CAVEAT = ("CAVEAT: SmolLM2's shipped weights were 4-bit once (Q4_1, blocks of 32, float offset); 4-bit results "
          "on it look better than on a true 16-bit model, most of all with float zero points (HQQ)")
ANCHORS = "anchors: GPTQ 4-bit OPT-125M 1.125x fp16; AWQ Llama-2-7B 1.024x"


def int4_config(variant: str):
    """`rtn:32`, `gptq:128`, `rtn:32:al4` -> a quantize config."""
    from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig

    algorithm, block, *rest = variant.split(":")
    extra = {"calibration": CALIBRATION, "act_order": True} if algorithm == "gptq" else {}
    if rest:
        extra["accuracy_level"] = int(rest[0].removeprefix("al"))
    return Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm=algorithm,
                                block_size=int(block), **extra)


def measure_against(base_runner, base_metrics, candidates, tokenizer, samples, evaluation, feed, iterations):
    """Perplexity, top-1 agreement, size and prompt latency of each (name, make) candidate against the
    baseline runner; `make()` returns (artifact, quantize seconds, size ratio)."""
    from compressor.bench import interleaved
    from compressor.evaluate import evaluate
    from compressor.runners import make_runner

    rows = []
    for name, make in candidates:
        artifact, seconds, size = make()
        runner = make_runner(artifact, name, threads=2)
        metrics = evaluate(TASK, runner, tokenizer, samples, evaluation, reference=base_metrics).metrics
        latency = interleaved([base_runner, runner], feed, warmup=5, iterations=iterations)
        rows.append((name, metrics["perplexity"], metrics["top1_agreement"], size,
                     latency[name].p50 / latency[base_runner.name].p50, latency[base_runner.name].p50, seconds))
        print(f"  {name}: done", flush=True)
    return rows


def print_rows(title: str, rows, dense: float) -> None:
    print(title)
    print(f"{'variant':11} {'perplexity':>10} {'/ fp32':>7} {'top-1':>6} {'size':>6} {'p50 / fp32':>10} "
          f"{'fp32 p50':>9} {'quantize s':>10}")
    for variant, ppl, top1, size, speed, base_ms, seconds in rows:
        print(f"{variant:11} {ppl:10.3f} {ppl / dense:7.3f} {top1:6.3f} {size:6.3f} {speed:10.3f} "
              f"{base_ms:7.1f}ms {seconds:10.0f}")
    print(ANCHORS)
    print(CAVEAT, flush=True)


def onnx_section(variants, stage, checkpoint, tokenizer, samples, evaluation, feed) -> None:
    from compressor.artifacts import TorchModel
    from compressor.evaluate import evaluate
    from compressor.runners import make_runner
    from compressor.stages.export.export_onnx import ExportOnnxConfig

    fp32, _ = stage(ExportOnnxConfig(type="export_onnx", atol=1e-3), TorchModel(checkpoint, TASK), "fp32")
    fp32_runner = make_runner(fp32, "fp32", threads=2)
    fp32_mb = fp32.size_mb()
    base = evaluate(TASK, fp32_runner, tokenizer, samples, evaluation)

    def maker(variant):
        def make():
            name = variant.replace(":", "-")
            if variant.startswith("gptq"):  # torch GPTQ, then exported with its codes
                started = time.perf_counter()
                quantized, _ = stage(int4_config(variant), TorchModel(checkpoint, TASK), name + "-torch")
                quantized, _ = stage(ExportOnnxConfig(type="export_onnx", atol=1e-3), quantized, name)
                seconds = time.perf_counter() - started
            else:
                quantized, seconds = stage(int4_config(variant), fp32, name)
            return quantized, seconds, quantized.size_mb() / fp32_mb
        return make

    rows = measure_against(fp32_runner, base, [(v, maker(v)) for v in variants.split(",")], tokenizer, samples,
                           evaluation, feed, iterations=100)
    dense = base.metrics["perplexity"]
    print_rows(f"\nSmolLM2-135M ONNX, perplexity on {base.samples} x 256 tokens of lee_background; fp32 {dense:.3f}, "
               f"{fp32_mb:.1f} MB; latency: batch 1 x 128-token prompt", rows, dense)


class DecodeStep:
    """A runner that decodes one token after a fixed prompt: each call feeds the last token and the
    prompt's past key values, which is the per-token cost of generation at that context length."""

    def __init__(self, path, name: str, prompt: dict):
        import numpy as np
        import onnxruntime as ort

        from compressor.onnx_graph import complete_feed

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name, self.backend = name, "onnxruntime-cpu"
        inputs = complete_feed(self.session.get_inputs(), prompt)
        names = [o.name for o in self.session.get_outputs()]
        outputs = dict(zip(names, self.session.run(names, inputs)))
        length = prompt["input_ids"].shape[1]
        self.past = {name.replace("present", "past_key_values"): value for name, value in outputs.items()
                     if name.startswith("present")}
        token = outputs["logits"][:, -1].argmax(-1)[:, None].astype(np.int64)
        self.step = {"input_ids": token, "attention_mask": np.ones((1, length + 1), dtype=np.int64),
                     "position_ids": np.array([[length]], dtype=np.int64), **self.past}
        wanted = {i.name for i in self.session.get_inputs()}
        self.step = {k: v for k, v in self.step.items() if k in wanted}

    def __call__(self, _feed):
        return self.session.run(["logits"], self.step)[0]


def decode_section(stage, checkpoint, tokenizer, samples) -> None:
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed, interleaved
    from compressor.stages.export.export_onnx import ExportOnnxConfig

    fp32, _ = stage(ExportOnnxConfig(type="export_onnx", atol=1e-3, with_past=True), TorchModel(checkpoint, TASK),
                    "fp32-past")
    prompt = benchmark_feed(tokenizer, samples.texts, 1, 128)
    runners = [DecodeStep(fp32.path, "fp32", prompt)]
    for variant in ("rtn:32", "rtn:32:al4"):
        quantized, _ = stage(int4_config(variant), fp32, variant.replace(":", "-") + "-past")
        runners.append(DecodeStep(quantized.path, variant, prompt))
    latency = interleaved(runners, prompt, warmup=20, iterations=400)
    print(f"\nSmolLM2-135M ONNX with past key values: one new token after a 128-token prompt, batch 1, "
          f"{latency['fp32'].iterations} timed steps each, interleaved")
    print(f"{'variant':11} {'p50 ms':>8} {'p90 ms':>8} {'p50 / fp32':>10}")
    for runner in runners:
        timing = latency[runner.name]
        print(f"{runner.name:11} {timing.p50:8.2f} {timing.p90:8.2f} {timing.p50 / latency['fp32'].p50:10.3f}")
    print(flush=True)


def bnb_section(stage, checkpoint, tokenizer, samples, evaluation, feed) -> None:
    from compressor.artifacts import TorchModel
    from compressor.evaluate import evaluate
    from compressor.runners import make_runner
    from compressor.stages.quantize.bnb_4bit import Bnb4bitConfig

    source = TorchModel(checkpoint, TASK)
    fp32_runner = make_runner(source, "fp32", threads=2)
    base = evaluate(TASK, fp32_runner, tokenizer, samples, evaluation)

    def maker(scheme):
        def make():
            quantized, seconds = stage(Bnb4bitConfig(type="quantize", scheme=scheme), source, scheme)
            return TorchModel(quantized.path, TASK), seconds, quantized.size_mb() / source.size_mb()
        return make

    rows = measure_against(fp32_runner, base, [(s, maker(s)) for s in ("nf4", "fp4")], tokenizer, samples,
                           evaluation, feed, iterations=40)
    dense = base.metrics["perplexity"]
    print_rows(f"\nSmolLM2-135M torch + bitsandbytes (CPU, double quant, float32 compute), perplexity on "
               f"{base.samples} x 256 tokens; torch fp32 {dense:.3f}, {source.size_mb():.1f} MB; latency: batch 1 x "
               "128-token prompt", rows, dense)


def lora_section() -> None:
    import tempfile

    from compressor import fixtures
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import DataConfig, load_samples
    from compressor.runners import TorchRunner, make_runner
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.lora.merge_lora import MergeLoraConfig, load_unmerged

    task = "text-classification"
    checkpoint = fixtures.ensure("minilm")
    config = MergeLoraConfig(type="merge_lora", adapters=[{"fixture": "sentiment-lora"}], atol=1e-4)
    source = TorchModel(checkpoint, task)
    tokenizer = load_tokenizer(checkpoint)
    samples = load_samples(DataConfig(dataset="sentiment-test"), task)
    feed = benchmark_feed(tokenizer, samples.texts, 1, 128)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(Path(tmp), task, threads=2)
        merged = REGISTRY["merge_lora"].run(config, source, ctx)
        unmerged = TorchRunner(load_unmerged(config, source).get_base_model(), task, name="unmerged", threads=2)
        runners = [make_runner(source, "base", threads=2), make_runner(merged, "merged", threads=2), unmerged]
        latency = interleaved(runners, feed, warmup=10, iterations=300)
    base_ms = latency["base"].p50
    print(f"\nLoRA merge: sentiment-lora (r=8, query/key/value/dense) into MiniLM-L6, torch fp32, batch 1 x 128 "
          f"tokens, {latency['base'].iterations} interleaved calls each")
    print(f"merged vs unmerged logits on the stage's check inputs: max abs diff {ctx.details['max_abs_diff']:.3g} "
          f"(the adapter itself moves them by up to {ctx.details['adapter_effect_max_abs']:.3g})")
    for name in ("base", "merged", "unmerged"):
        print(f"{name:9} p50 {latency[name].p50:7.2f} ms   / base {latency[name].p50 / base_ms:6.3f}")
    print("target: merged / base <= 1.02", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="onnx,decode,bnb,lora")
    parser.add_argument("--variants", default="rtn:32,rtn:128,gptq:32,gptq:128,hqq:32,hqq:128,rtn:32:al4")
    args = parser.parse_args()
    sections = args.sections.split(",")

    import torch

    from compressor import fixtures
    from compressor.bench import benchmark_feed
    from compressor.checkpoint import load_tokenizer
    from compressor.data import DataConfig, load_samples
    from compressor.recipe import EvaluationConfig
    from compressor.machine import package_versions
    from compressor.stages import REGISTRY, StageContext

    torch.set_num_threads(2)
    checkpoint = fixtures.ensure("smollm2")
    tokenizer = load_tokenizer(checkpoint)
    evaluation = EvaluationConfig(data=DataConfig(dataset="lee-background"), max_length=256, max_samples=32,
                                  batch_size=4)
    samples = load_samples(evaluation.data, TASK)
    feed = benchmark_feed(tokenizer, samples.texts, 1, 128)
    with tempfile.TemporaryDirectory() as tmp:
        def stage(config, artifact, name):
            ctx = StageContext(Path(tmp) / name, TASK, threads=2)
            ctx.workdir.mkdir(parents=True)
            started = time.time()
            result = REGISTRY[config.type].run(config, artifact, ctx)
            return result, time.time() - started

        if "onnx" in sections:
            onnx_section(args.variants, stage, checkpoint, tokenizer, samples, evaluation, feed)
        if "decode" in sections:
            decode_section(stage, checkpoint, tokenizer, samples)
        if "bnb" in sections:
            bnb_section(stage, checkpoint, tokenizer, samples, evaluation, feed)
    if "lora" in sections:
        lora_section()
    versions = package_versions()
    print("versions: " + ", ".join(f"{k} {versions[k]}" for k in ("torch", "onnxruntime", "onnx", "peft",
                                                                   "bitsandbytes")))


if __name__ == "__main__":
    main()
