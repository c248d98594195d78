"""Static int8: compress against Optimum's static quantization, on MiniLM-L6 and the sentiment
classifier, evaluated on the same sentences and timed interleaved in one process.

Contestants per model, all batch 1 x 128 tokens, 2 threads:
  ORT fp32                Optimum's plain export, unquantized (the reference for every ratio)
  Optimum static int8     ORTQuantizer + AutoQuantizationConfig.avx512_vnni(is_static=True,
                          per_channel=True) + AutoCalibrationConfig.minmax, calibrated on the
                          same 1,024 training sentences as compress
  compress int8-dynamic   the stages of the shipped int8-dynamic recipe
  compress int8-static    the stages of the shipped int8-static recipe

Targets: static int8 <= 0.6 x ORT fp32 latency with min cosine >= 0.995 on the encoder, and <= 1
point accuracy drop on the classifier.

Usage: python benchmarks/static_int8.py [--iterations 300] [--model minilm|classifier|both]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = {
    "minilm": ("minilm", "feature-extraction", "minilm-int8-dynamic.yaml", "minilm-int8-static.yaml"),
    "classifier": ("sentiment-classifier", "text-classification", "minilm-sentiment-int8-dynamic.yaml",
                   "minilm-sentiment-int8-static.yaml"),
}


def calibration_texts(recipe_name: str) -> list[str]:
    """The sentences the shipped static recipe calibrates on (same seed, same draw)."""
    from compressor.data import draw_texts
    from compressor.recipe import load_recipe

    recipe = load_recipe(ROOT / "recipes" / recipe_name)
    return draw_texts(next(s for s in recipe.stages if s.type == "quantize").calibration)


def optimum_static(checkpoint: Path, task: str, texts: list[str], workdir: Path) -> tuple[Path, Path, dict]:
    """Optimum's export and static quantization, in its own virtualenv (benchmarks/optimum_worker.py)."""
    from optimum_peer import optimum

    exported = workdir / f"optimum-{task}"
    optimum("export", checkpoint, task, exported)
    texts_file = workdir / f"calibration-{task}.txt"
    texts_file.write_text("\n".join(text.replace("\n", " ") for text in texts) + "\n")
    done = optimum("quantize-static", exported, workdir / f"optimum-static-{task}", "--texts", texts_file)
    return exported / "model.onnx", Path(done["model"]), done["versions"]


def compress_recipe(checkpoint: Path, task: str, recipe_name: str, workdir: Path) -> Path:
    from compressor.artifacts import TorchModel
    from compressor.recipe import load_recipe
    from compressor.stages import REGISTRY, StageContext

    recipe = load_recipe(ROOT / "recipes" / recipe_name)
    artifact = TorchModel(checkpoint, task)
    for index, config in enumerate(recipe.stages):
        folder = workdir / f"{recipe.name}-{index}"
        folder.mkdir()
        artifact = REGISTRY[config.type].run(config, artifact, StageContext(folder, task, 2))
    return artifact.path


def measure(model: str, iterations: int, warmup: int) -> None:
    from compressor import fixtures
    from compressor.bench import OtherLoad, benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.evaluate import evaluate
    from compressor.recipe import EvaluationConfig
    from compressor.runners import OrtRunner

    fixture, task, dynamic_recipe, static_recipe = MODELS[model]
    checkpoint = fixtures.ensure(fixture)
    tokenizer = load_tokenizer(checkpoint)
    eval_config = EvaluationConfig.model_validate(
        {"data": {"dataset": "sentiment-test"}, "max_length": 128, "batch_size": 32})
    samples = load_samples(eval_config.data, task)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        ort_fp32, optimum_q, peer = optimum_static(checkpoint, task, calibration_texts(static_recipe), workdir)
        print("Optimum's side: " + ", ".join(f"{k} {v}" for k, v in peer.items()))
        paths = {"ORT fp32": ort_fp32, "Optimum static int8": optimum_q,
                 "compress int8-dynamic": compress_recipe(checkpoint, task, dynamic_recipe, workdir),
                 "compress int8-static": compress_recipe(checkpoint, task, static_recipe, workdir)}
        runners = [OrtRunner(path, task, name=name, threads=2) for name, path in paths.items()]
        reference = evaluate(task, runners[0], tokenizer, samples, eval_config)
        fidelity = {r.name: evaluate(task, r, tokenizer, samples, eval_config, reference).metrics for r in runners}
        feed = benchmark_feed(tokenizer, samples.texts, batch_size=1, seq_len=128)
        started = time.time()
        with OtherLoad() as load:
            latency = interleaved(runners, feed, warmup=warmup, iterations=iterations)
        seconds = time.time() - started
        sizes = {name: sum(f.stat().st_size for f in path.parent.glob(path.name + "*")) / 1e6
                 for name, path in paths.items()}

    base = latency["ORT fp32"].p50
    print(f"\n{fixture} ({task}), batch 1 x 128 tokens, 2 threads, {iterations} interleaved iterations "
          f"({seconds:.0f} s, other processes used {load.share:.0%} of the CPU); "
          f"fidelity on {reference.samples} test sentences")
    if task == "feature-extraction":
        print(f"{'':24} {'p50 ms':>8} {'p90 ms':>8} {'/ORT fp32':>10} {'cos min':>8} {'cos mean':>9} {'MB':>6}")
        for runner in runners:
            stats, metrics = latency[runner.name], fidelity[runner.name]
            print(f"{runner.name:24} {stats.p50:8.2f} {stats.p90:8.2f} {stats.p50 / base:10.3f} "
                  f"{metrics['cosine_min']:8.4f} {metrics['cosine_mean']:9.4f} {sizes[runner.name]:6.1f}")
        ratio = latency["compress int8-static"].p50 / base
        cosine = fidelity["compress int8-static"]["cosine_min"]
        verdict = "met" if ratio <= 0.6 and cosine >= 0.995 else "MISSED"
        print(f"target: static int8 <= 0.6 x ORT fp32 with min cosine >= 0.995: {ratio:.3f} x, "
              f"min cosine {cosine:.4f} -> {verdict}")
    else:
        base_accuracy = fidelity["ORT fp32"]["accuracy"]
        print(f"{'':24} {'p50 ms':>8} {'p90 ms':>8} {'/ORT fp32':>10} {'accuracy':>9} {'drop pts':>9} "
              f"{'agree':>7} {'MB':>6}")
        for runner in runners:
            stats, metrics = latency[runner.name], fidelity[runner.name]
            print(f"{runner.name:24} {stats.p50:8.2f} {stats.p90:8.2f} {stats.p50 / base:10.3f} "
                  f"{metrics['accuracy']:9.4f} {100 * (base_accuracy - metrics['accuracy']):9.2f} "
                  f"{metrics['agreement']:7.4f} {sizes[runner.name]:6.1f}")
        drop = 100 * (base_accuracy - fidelity["compress int8-static"]["accuracy"])
        ratio = latency["compress int8-static"].p50 / base
        print(f"target: static int8 <= 1 point accuracy drop: {drop:.2f} points -> "
              f"{'met' if drop <= 1 else 'MISSED'} (latency {ratio:.3f} x ORT fp32)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--model", choices=["minilm", "classifier", "both"], default="both")
    args = parser.parse_args()

    from compressor.machine import package_versions

    for model in (["minilm", "classifier"] if args.model == "both" else [args.model]):
        measure(model, args.iterations, args.warmup)
    versions = package_versions()
    print("versions: " + ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "onnxruntime")))


if __name__ == "__main__":
    main()
