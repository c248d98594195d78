"""compress's int8 ONNX pipeline against Optimum's own, on MiniLM-L6, timed interleaved in one process.

Contestants, all on the same sentences and the same 1 x 128 input, 2 threads:
  torch fp32            the checkpoint as transformers runs it
  ORT fp32              Optimum's plain export, unquantized (the reference for ratios)
  Optimum int8          main_export + ORTQuantizer with AutoQuantizationConfig.avx512_vnni(
                        is_static=False, per_channel=True)
  compress int8         the stages of recipes/minilm-int8-dynamic.yaml (export, fuse, int8 dynamic
                        on every weight MatMul)
  compress int8, FFN-down float   the same with the FFN down-projections kept in float

Usage: python benchmarks/peer_optimum.py [--iterations 300] [--samples 2114]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def optimum_int8(checkpoint: Path, workdir: Path) -> tuple[Path, Path, dict]:
    """Optimum's export and dynamic quantization, in its own virtualenv (benchmarks/optimum_worker.py)."""
    from optimum_peer import optimum

    exported = workdir / "optimum-fp32"
    optimum("export", checkpoint, "feature-extraction", exported)
    done = optimum("quantize-dynamic", exported, workdir / "optimum-int8")
    return exported / "model.onnx", Path(done["model"]), done["versions"]


FFN_DOWN = "/encoder/layer.*/output/dense/MatMul"


def compress_int8(checkpoint: Path, workdir: Path, exclude_ffn_down: bool) -> Path:
    from compressor.artifacts import TorchModel
    from compressor.recipe import load_recipe
    from compressor.stages import REGISTRY, StageContext

    recipe = load_recipe(ROOT / "recipes" / "minilm-int8-dynamic.yaml")
    artifact = TorchModel(checkpoint, "feature-extraction")
    for index, config in enumerate(recipe.stages):
        if config.type == "quantize" and exclude_ffn_down:
            config = config.model_copy(update={"exclude": [FFN_DOWN]})
        folder = workdir / f"compress-{'ffn-float' if exclude_ffn_down else 'recipe'}-{index}"
        folder.mkdir()
        artifact = REGISTRY[config.type].run(config, artifact, StageContext(folder, "feature-extraction", 2))
    return artifact.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--samples", type=int, default=None, help="evaluation sentences (default: all 2,114)")
    args = parser.parse_args()

    from compressor import fixtures
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.evaluate import evaluate
    from compressor.recipe import EvaluationConfig
    from compressor.machine import package_versions
    from compressor.runners import OrtRunner, make_runner

    checkpoint = fixtures.ensure("minilm")
    tokenizer = load_tokenizer(checkpoint)
    eval_config = EvaluationConfig.model_validate(
        {"data": {"dataset": "sentiment-test"}, "max_length": 128, "batch_size": 32, "max_samples": args.samples})
    samples = load_samples(eval_config.data, "feature-extraction")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ort_fp32, optimum_q, peer_versions = optimum_int8(checkpoint, workdir)
        paths = {"ORT fp32": ort_fp32, "Optimum int8": optimum_q,
                 "compress int8": compress_int8(checkpoint, workdir, exclude_ffn_down=False),
                 "compress, FFN-down float": compress_int8(checkpoint, workdir, exclude_ffn_down=True)}
        runners = [make_runner(TorchModel(checkpoint, "feature-extraction"), "torch fp32", threads=2)]
        runners += [OrtRunner(path, "feature-extraction", name=name, threads=2) for name, path in paths.items()]

        reference = evaluate("feature-extraction", runners[0], tokenizer, samples, eval_config)
        fidelity = {r.name: evaluate("feature-extraction", r, tokenizer, samples, eval_config, reference).metrics
                    for r in runners[1:]}
        feed = benchmark_feed(tokenizer, samples.texts, batch_size=1, seq_len=128)
        started = time.time()
        latency = interleaved(runners, feed, warmup=args.warmup, iterations=args.iterations)
        seconds = time.time() - started
        sizes = {name: path.stat().st_size / 1e6 for name, path in paths.items()}

    base, optimum = latency["ORT fp32"].p50, latency["Optimum int8"].p50
    print(f"MiniLM-L6 feature-extraction, batch 1 x 128 tokens, 2 threads, {args.iterations} interleaved "
          f"iterations ({seconds:.0f} s); fidelity on {reference.samples} sentences (batch 32)")
    print(f"{'':24} {'p50 ms':>8} {'p90 ms':>8} {'/ORT fp32':>10} {'/Optimum':>9} {'cos min':>8} {'cos mean':>9} {'MB':>6}")
    for runner in runners:
        stats, metrics = latency[runner.name], fidelity.get(runner.name, {"cosine_min": 1.0, "cosine_mean": 1.0})
        size = sizes.get(runner.name, float("nan"))
        print(f"{runner.name:24} {stats.p50:8.2f} {stats.p90:8.2f} {stats.p50 / base:10.3f} {stats.p50 / optimum:9.3f} "
              f"{metrics['cosine_min']:8.4f} {metrics['cosine_mean']:9.4f} {size:6.1f}")
    ratio = latency["compress int8"].p50 / optimum
    cosine = fidelity["compress int8"]["cosine_min"]
    verdict = "met" if ratio <= 0.8 and cosine >= 0.99 else "MISSED"
    print(f"target: compress int8 <= 0.8 x Optimum int8 latency with min cosine >= 0.99: "
          f"{ratio:.3f} x, min cosine {cosine:.4f} -> {verdict}")
    versions = package_versions()
    print("versions: " + ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "onnxruntime")) +
          "; Optimum's side: " + ", ".join(f"{k} {v}" for k, v in peer_versions.items()))


if __name__ == "__main__":
    main()
