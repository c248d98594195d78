"""Pruning benchmarks, all measured side by side in one process.

Part `unstructured`: SmolLM2-135M perplexity of magnitude, Wanda and SparseGPT at 50% and 2:4,
as ratios to the dense model.

Evaluation: 16 windows of 256 tokens of lee_background (the first windows, as the shipped SmolLM2
recipes use). Calibration for Wanda and SparseGPT: 16 windows of 256 tokens drawn from lee-test
(news documents not in lee_background), seed 0.

Published anchors on OPT-125M (dense 27.65): 50% SparseGPT 1.34x, Wanda 1.41x, magnitude 7.0x;
2:4 SparseGPT 2.2x, Wanda 2.9x. Targets: Wanda and SparseGPT at 50% <= 1.45x dense, and each
<= 0.25x magnitude's perplexity.

Part `structured`: the sentiment classifier (MiniLM-L6) with 50% of its FFN channels removed
(importance from activations on sentiment-train), without and with recovery distillation:
accuracy on the 2,114 sentiment-test sentences, MACs ratio, and latency ratios for torch and for
ONNX Runtime (dense and pruned exported the same way), each pair timed in alternating blocks.
Anchor: a latency gain of 0.77 of the MAC reduction (Torch-Pruning, ViT-B). Targets: latency gain
>= 0.6 of the MAC reduction; <= 2 points accuracy drop with recovery.

Usage: python benchmarks/pruning.py [--part unstructured|structured|all]
           [--methods magnitude,wanda,sparsegpt] [--patterns unstructured,2:4]
           [--recover-steps 400] [--recover-lr 2e-5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

CALIBRATION = {"data": {"dataset": "lee-test", "segment": "window"}, "samples": 16, "max_length": 256,
               "batch_size": 4}


def perplexity(module, windows) -> float:
    import numpy as np
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(windows), 4):
            ids = windows[start:start + 4]
            logits = module(ids, use_cache=False).logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += ids[:, 1:].numel()
    return float(np.exp(total / count))


STRUCTURED = {"kind": "structured", "channels": 0.5, "importance": "activations",
              "calibration": {"data": {"dataset": "sentiment-train"}, "samples": 1024, "max_length": 128,
                              "batch_size": 16}}


def structured(args) -> None:
    import torch

    from compressor import fixtures
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import DataConfig, load_samples
    from compressor.evaluate import evaluate
    from compressor.recipe import EvaluationConfig
    from compressor.machine import package_versions
    from compressor.runners import make_runner
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.export.export_onnx import ExportOnnxConfig
    from compressor.stages.prune.prune import PruneConfig
    from compressor.stages.quantize.quantize import Int8DynamicConfig

    torch.set_num_threads(2)
    task = "text-classification"
    checkpoint = fixtures.ensure("sentiment-classifier")
    tokenizer = load_tokenizer(checkpoint)
    evaluation = EvaluationConfig(data=DataConfig(dataset="sentiment-test"), max_length=128, batch_size=32)
    samples = load_samples(evaluation.data, task)
    feed = benchmark_feed(tokenizer, samples.texts, 1, 128)
    dense = TorchModel(checkpoint, task)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)

        def stage(config, artifact, name):
            ctx = StageContext(work / name, task, threads=2)
            ctx.workdir.mkdir(parents=True)
            started = time.time()
            result = REGISTRY[config.type].run(config, artifact, ctx)
            print(f"  {name}: {time.time() - started:.0f} s", flush=True)
            return result, ctx.details

        variants = {"dense": (dense, {})}
        variants["pruned"] = stage(PruneConfig(type="prune", **STRUCTURED), dense, "pruned")
        recover = {"steps": args.recover_steps, "lr": args.recover_lr}
        variants["pruned+recovery"] = stage(PruneConfig(type="prune", **STRUCTURED, recover=recover), dense,
                                            "recovered")
        accuracy = {}
        for name, (artifact, _) in variants.items():
            accuracy[name] = evaluate(task, make_runner(artifact, name, threads=2), tokenizer, samples,
                                      evaluation).metrics["accuracy"]
        macs_ratio = variants["pruned"][1]["macs_ratio"]
        exported = {name: stage(ExportOnnxConfig(type="export_onnx"), variants[name][0], f"onnx-{name}")[0]
                    for name in ("dense", "pruned+recovery")}
        torch_latency = interleaved([make_runner(variants[n][0], n, threads=2) for n in ("dense", "pruned+recovery")],
                                    feed, warmup=10, iterations=300)
        ort_latency = interleaved([make_runner(exported[n], n, threads=2) for n in ("dense", "pruned+recovery")],
                                  feed, warmup=10, iterations=300)
        # and after int8 dynamic quantization of both: does pruning still pay once int8 has?
        int8 = Int8DynamicConfig(type="quantize", scheme="int8-dynamic", per_channel=True)
        quantized = {n: stage(int8, exported[n], f"int8-{n}")[0] for n in exported}
        int8_latency = interleaved([make_runner(quantized[n], n, threads=2) for n in ("dense", "pruned+recovery")],
                                   feed, warmup=10, iterations=300)

    print(f"\nsentiment classifier (MiniLM-L6), FFN channels -50% by activation importance "
          f"({STRUCTURED['calibration']['samples']} sentiment-train sentences); recovery {recover}")
    print(f"accuracy on {len(samples.texts)} sentiment-test sentences:")
    for name, value in accuracy.items():
        print(f"  {name:16} {value:.4f}  drop {100 * (accuracy['dense'] - value):5.2f} points")
    print(f"parameters {variants['pruned'][1]['params_ratio']:.3f}x, MACs at 1x128 {macs_ratio:.3f}x "
          f"(reduction {1 - macs_ratio:.3f})")
    for backend, latency in (("torch", torch_latency), ("onnxruntime", ort_latency), ("ort int8", int8_latency)):
        base, cand = latency["dense"].p50, latency["pruned+recovery"].p50
        share = (1 - cand / base) / (1 - macs_ratio)
        verdict = "(both int8 dynamic; no target)" if backend == "ort int8" else \
            f"-> {'met' if share >= 0.6 else 'MISSED'} (target >= 0.6)"
        print(f"  {backend:12} p50 {base:6.2f} -> {cand:6.2f} ms: {cand / base:.3f}x, gain = {share:.2f} of the "
              f"MAC reduction {verdict}")
    drop = 100 * (accuracy["dense"] - accuracy["pruned+recovery"])
    print(f"target accuracy drop with recovery <= 2 points: {drop:.2f} -> {'met' if drop <= 2 else 'MISSED'}")
    versions = package_versions()
    print("versions: " + ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "onnxruntime")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("unstructured", "structured", "all"), default="all")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--recover-steps", type=int, default=400)
    parser.add_argument("--recover-lr", type=float, default=2e-5)
    args = parser.parse_args()
    if args.part in ("structured", "all"):
        structured(args)
    if args.part in ("unstructured", "all"):
        unstructured(args)


def unstructured(args) -> None:
    import torch

    from compressor import fixtures
    from compressor.artifacts import TorchModel
    from compressor.checkpoint import load_tokenizer, load_torch_model
    from compressor.data import DataConfig, load_samples, token_windows
    from compressor.machine import package_versions
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.prune.prune import PruneConfig

    torch.set_num_threads(2)
    checkpoint = fixtures.ensure("smollm2")
    tokenizer = load_tokenizer(checkpoint)
    texts = load_samples(DataConfig(dataset="lee-background"), "text-generation").texts
    windows = torch.from_numpy(token_windows(tokenizer, texts, 256, 16))
    source = TorchModel(checkpoint, "text-generation")
    dense = perplexity(load_torch_model(source), windows)
    rows = [("dense", "-", dense, 0.0, 0.0)]
    for pattern in args.patterns.split(","):
        for method in args.methods.split(","):
            config = PruneConfig(type="prune", method=method, pattern=pattern,
                                 calibration=None if method == "magnitude" else CALIBRATION)
            with tempfile.TemporaryDirectory() as tmp:
                ctx = StageContext(Path(tmp), "text-generation", threads=2)
                started = time.time()
                pruned = REGISTRY["prune"].run(config, source, ctx)
                seconds = time.time() - started
                rows.append((method, pattern, perplexity(pruned.module, windows), seconds,
                             ctx.details["sparsity_pruned_layers"]))
            print(f"  {method} {pattern}: done in {seconds:.0f} s", flush=True)

    print(f"\nSmolLM2-135M, perplexity on {len(windows)} x 256 tokens of lee_background; calibration "
          f"{CALIBRATION['samples']} x {CALIBRATION['max_length']} tokens of lee-test")
    print(f"{'method':10} {'pattern':13} {'perplexity':>10} {'/ dense':>8} {'sparsity':>9} {'prune s':>8}")
    for method, pattern, value, seconds, sparsity in rows:
        print(f"{method:10} {pattern:13} {value:10.2f} {value / dense:8.2f} {sparsity:9.4f} {seconds:8.0f}")
    by = {(m, p): v for m, p, v, _, _ in rows}
    for method in ("wanda", "sparsegpt"):
        if (method, "unstructured") in by and ("magnitude", "unstructured") in by:
            ratio, vs_magnitude = by[method, "unstructured"] / dense, by[method, "unstructured"] / by["magnitude",
                                                                                                       "unstructured"]
            verdict = "met" if ratio <= 1.45 and vs_magnitude <= 0.25 else "MISSED"
            print(f"target {method} 50%: <= 1.45x dense ({ratio:.2f}x) and <= 0.25x magnitude "
                  f"({vs_magnitude:.2f}x) -> {verdict}")
    versions = package_versions()
    print("versions: " + ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers")))


if __name__ == "__main__":
    main()
