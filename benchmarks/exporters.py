"""ONNX exporters side by side: Optimum's (optimum-onnx 0.1.0 on transformers 4.57, the exporter compress
used before) against compress's torch.onnx.export paths, `torchscript` (the default) and `dynamo`, on
transformers 5. Each graph then goes through the rest of a shipped recipe's stages, and every result is
evaluated on the recipe's data and timed, all exporters interleaved in one process.

Per model and exporter it prints: whether Optimum's ORTModel class loads compress's export folder and
runs it (generates, for the causal LM); export seconds; the graph (nodes, MatMuls, distinct op types, MB);
max |ORT - torch| of the float export; the float and the compressed graph's task metrics against torch
(accuracy and agreement, cosine, or perplexity and top-1 agreement); p50 latency and its ratio to the
Optimum export's float graph, at the recipe's benchmark shape.

Models and recipes: the sentiment classifier (minilm-sentiment-int8-dynamic: export, fuse, int8
dynamic), MiniLM-L6 (minilm-int8-dynamic), SmolLM2-135M (smollm2-int8-dynamic and smollm2-onnx-int4-rtn).
Optimum runs in its own virtualenv: `make peer-optimum` first.

Usage: python benchmarks/exporters.py [--models classifier,minilm,smollm2] [--iterations 100]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

EXPORTERS = ("optimum", "torchscript", "dynamo")
MODELS = {  # fixture, task, recipes whose stages after export_onnx run on each exporter's graph
    "classifier": ("sentiment-classifier", "text-classification", ["minilm-sentiment-int8-dynamic"]),
    "minilm": ("minilm", "feature-extraction", ["minilm-int8-dynamic"]),
    "smollm2": ("smollm2", "text-generation", ["smollm2-int8-dynamic", "smollm2-onnx-int4-rtn"]),
}
PEER_VERSIONS: dict[str, str] = {}
SHOWN = {"text-classification": ("accuracy", "agreement"), "feature-extraction": ("cosine_mean", "cosine_min"),
         "text-generation": ("perplexity", "top1_agreement")}


def graph_summary(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = collections.Counter(node.op_type for node in model.graph.node)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {"nodes": sum(ops.values()), "matmuls": ops["MatMul"] + ops["MatMulInteger"] + ops["MatMulNBits"]
            + ops["DynamicQuantizeMatMul"], "op_types": len(ops), "mb": size / 1e6,
            "fused": {op: ops[op] for op in ("Attention", "SkipLayerNormalization", "BiasGelu") if ops[op]}}


def export(exporter: str, checkpoint: Path, task: str, export_config, workdir: Path):
    """The float graph from one exporter, as the OnnxModel the later stages take, and the seconds it took."""
    from compressor.artifacts import OnnxModel, TorchModel
    from compressor.stages import REGISTRY, StageContext

    folder = workdir / f"{exporter}-export"
    folder.mkdir()
    if exporter == "optimum":
        from optimum_peer import optimum

        done = optimum("export", checkpoint, task, folder, "--opset", export_config.opset,
                       *(["--with-past"] if export_config.with_past else []))
        PEER_VERSIONS.update(done["versions"])
        return OnnxModel(folder / "model.onnx", task, with_past=export_config.with_past), done["seconds"]
    config = export_config.model_copy(update={"exporter": exporter})
    started = time.perf_counter()
    artifact = REGISTRY["export_onnx"].run(config, TorchModel(checkpoint, task), StageContext(folder, task, 2))
    return artifact, time.perf_counter() - started


def compress_rest(artifact, stages, task: str, workdir: Path, label: str):
    from compressor.stages import REGISTRY, StageContext

    for index, config in enumerate(stages):
        folder = workdir / f"{label}-{index}"
        folder.mkdir()
        artifact = REGISTRY[config.type].run(config, artifact, StageContext(folder, task, 2))
    return artifact


def measure(model: str, iterations: int, exporters: list[str]) -> None:
    from compressor import fixtures
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.evaluate import evaluate
    from compressor.recipe import load_recipe
    from compressor.runners import OrtRunner, make_runner
    from compressor.stages.export.export_onnx import max_abs_difference
    from compressor.stages.base import StageContext

    fixture, task, recipe_names = MODELS[model]
    checkpoint = fixtures.ensure(fixture)
    recipes = [load_recipe(ROOT / "recipes" / f"{name}.yaml") for name in recipe_names]
    export_config = recipes[0].stages[0]
    tokenizer = load_tokenizer(checkpoint)
    evaluation, bench = recipes[0].evaluation, recipes[0].benchmark
    samples = load_samples(evaluation.data, task)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        paths = {}
        for exporter in exporters:
            exported, seconds = export(exporter, checkpoint, task, export_config, workdir)
            diff = max_abs_difference(TorchModel(checkpoint, task), exported, StageContext(workdir, task, 2))
            rows[f"{exporter} fp32"] = {"export_s": seconds, "max_abs_diff": diff, **graph_summary(exported.path)}
            if exporter != "optimum":  # the folder must still be what Optimum's ORTModel classes load
                from optimum_peer import optimum

                loaded = optimum("load", exported.folder, task)
                print(f"{model}: {exporter} export loads in Optimum as {loaded['class']}: "
                      f"{ {k: v for k, v in loaded.items() if k not in ('class', 'versions')} }")
            paths[f"{exporter} fp32"] = exported
            for recipe in recipes:
                label = f"{exporter} {recipe.name.replace('minilm-sentiment-', '').replace('smollm2-', '')}"
                result = compress_rest(exported, recipe.stages[1:], task, workdir, label.replace(" ", "-"))
                rows[label] = graph_summary(result.path)
                paths[label] = result
        torch_runner = make_runner(TorchModel(checkpoint, task), "torch fp32", threads=2)
        reference = evaluate(task, torch_runner, tokenizer, samples, evaluation)
        runners = [OrtRunner(artifact.path, task, name=name, threads=2) for name, artifact in paths.items()]
        for runner in runners:
            rows[runner.name].update(evaluate(task, runner, tokenizer, samples, evaluation, reference).metrics)
        feed = benchmark_feed(tokenizer, samples.texts, batch_size=bench.batch_size, seq_len=bench.seq_len)
        started = time.time()
        latency = interleaved(runners, feed, warmup=bench.warmup, iterations=iterations)
        seconds = time.time() - started

    first, second = SHOWN[task]
    base = latency[f"{exporters[0]} fp32"].p50
    print(f"\n{model} ({task}), {reference.samples} evaluation samples; torch fp32 {first} "
          f"{reference.metrics.get(first, float('nan')):.4f}; latency batch {bench.batch_size} x {bench.seq_len}, "
          f"2 threads, {iterations} interleaved iterations ({seconds:.0f} s)")
    print(f"{'':28} {'export s':>8} {'nodes':>6} {'MatMul':>6} {'ops':>4} {'MB':>7} {'max|d|':>8} "
          f"{first:>11} {second:>10} {'p50 ms':>7} {'/' + exporters[0]:>8}  fused")
    for name, row in rows.items():
        export_s = f"{row['export_s']:8.1f}" if "export_s" in row else f"{'':8}"
        diff = f"{row['max_abs_diff']:8.1e}" if "max_abs_diff" in row else f"{'':8}"
        p50 = latency[name].p50
        fused = ", ".join(f"{op} {n}" for op, n in row["fused"].items()) or "-"
        print(f"{name:28} {export_s} {row['nodes']:6d} {row['matmuls']:6d} {row['op_types']:4d} {row['mb']:7.1f} "
              f"{diff} {row.get(first, float('nan')):11.4f} {row.get(second, float('nan')):10.4f} {p50:7.2f} "
              f"{p50 / base:8.3f}  {fused}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="classifier,minilm,smollm2")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--exporters", default=",".join(EXPORTERS))
    args = parser.parse_args()

    from compressor.machine import describe, package_versions

    for model in args.models.split(","):
        measure(model, args.iterations, args.exporters.split(","))
    versions, machine = package_versions(), describe()
    print("\nversions: " + ", ".join(f"{k} {versions[k]}" for k in ("torch", "transformers", "onnx", "onnxscript",
                                                                     "onnxruntime")))
    print("Optimum's side: " + ", ".join(f"{k} {v}" for k, v in PEER_VERSIONS.items()))
    print(f"machine: {machine['cpu_model']}, flags {' '.join(machine.get('isa_flags', []))}")


if __name__ == "__main__":
    main()
