"""Why runners are timed in alternating blocks: MiniLM-L6 latency (p50) under several timing schemes.

Runtimes keep worker threads spinning after each call (ONNX Runtime's intra-op pool, torch's
OpenMP threads); a call made while another runtime's threads spin is slowed by them. Each scheme
runs in its own process (spinning is set per process):
  alone        each runner timed on its own
  alternating  single calls, A B B A (how compress timed before)
  blocks       compress's scheme: blocks of 10 timed calls, each after 2 untimed calls
  passive      alternating single calls with spinning disabled (ORT allow_spinning=0,
               OMP_WAIT_POLICY=PASSIVE)

Usage: python benchmarks/timing_modes.py [--iterations 100]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build(workdir: Path) -> dict[str, str]:
    from compressor import fixtures
    from compressor.artifacts import TorchModel
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.export.export_onnx import ExportOnnxConfig
    from compressor.stages.quantize.quantize import Int8DynamicConfig

    checkpoint = fixtures.ensure("minilm")
    paths = {"torch fp32": str(checkpoint)}
    artifact = TorchModel(checkpoint, "feature-extraction")
    for name, config in (("ORT fp32", ExportOnnxConfig(type="export_onnx")),
                         ("ORT int8", Int8DynamicConfig(type="quantize", scheme="int8-dynamic"))):
        folder = workdir / name.replace(" ", "-")
        folder.mkdir()
        artifact = REGISTRY[config.type].run(config, artifact, StageContext(folder, "feature-extraction", 2))
        paths[name] = str(artifact.path)
    return paths


def child(scheme: str, names: list[str], paths: dict[str, str], iterations: int) -> dict[str, float]:
    from compressor.artifacts import TorchModel
    from compressor.bench import benchmark_feed, interleaved
    from compressor.checkpoint import load_tokenizer
    from compressor.data import load_samples
    from compressor.recipe import DataConfig
    from compressor.runners import OrtRunner, make_runner

    tokenizer = load_tokenizer(Path(paths["torch fp32"]))
    texts = load_samples(DataConfig(dataset="sentiment-test"), "feature-extraction").texts
    feed = benchmark_feed(tokenizer, texts, batch_size=1, seq_len=128)
    runners = []
    for name in names:
        if name == "torch fp32":
            runners.append(make_runner(TorchModel(Path(paths[name]), "feature-extraction"), name, threads=2))
        else:
            runner = OrtRunner(Path(paths[name]), "feature-extraction", name=name, threads=2)
            if scheme == "passive":
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                runner.session = ort.InferenceSession(paths[name], options, providers=["CPUExecutionProvider"])
            runners.append(runner)
    if scheme == "blocks":
        latency = interleaved(runners, feed, warmup=10, iterations=iterations)
    else:
        latency = interleaved(runners, feed, warmup=10, iterations=iterations, block=1, settle=0)
    return {name: round(stats.p50, 2) for name, stats in latency.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["scheme"], spec["names"], spec["paths"], args.iterations)))
        return

    pairs = [["torch fp32", "ORT fp32"], ["ORT fp32", "ORT int8"]]
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp))
        rows = []
        for scheme in ("alone", "alternating", "blocks", "passive"):
            groups = [[n] for n in paths] if scheme == "alone" else pairs
            for names in groups:
                env = dict(os.environ, **({"OMP_WAIT_POLICY": "PASSIVE"} if scheme == "passive" else {}))
                spec = json.dumps({"scheme": scheme, "names": names, "paths": paths})
                out = subprocess.run([sys.executable, __file__, "--iterations", str(args.iterations),
                                      "--child", spec], env=env, capture_output=True, text=True, check=True)
                rows.append((scheme, json.loads(out.stdout.strip().splitlines()[-1])))
    print(f"MiniLM-L6, batch 1 x 128 tokens, 2 threads, p50 ms over {args.iterations} timed calls per runner")
    print(f"{'scheme':12} {'torch fp32':>11} {'ORT fp32':>9} {'ORT int8':>9}")
    for scheme, result in rows:
        cells = [f"{result[n]:.2f}" if n in result else "-" for n in ("torch fp32", "ORT fp32", "ORT int8")]
        print(f"{scheme:12} {cells[0]:>11} {cells[1]:>9} {cells[2]:>9}")


if __name__ == "__main__":
    main()
