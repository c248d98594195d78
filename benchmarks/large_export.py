"""ONNX export past protobuf's 2 GB limit: a synthetic Llama-shaped checkpoint of ~1B parameters (random
bfloat16 weights, 18 blocks of TinyLlama's width with SmolLM2's vocabulary) through export_onnx (float32, so
~4 GB of weights go to model.onnx.data) and then quantize int8-dynamic on that external-data graph. Each
stage runs in a child process that reports its time and peak resident set (VmHWM); export_onnx itself
checks ONNX Runtime's logits against torch's (atol), and this script reloads both graphs in ONNX Runtime.

Random weights: size, memory and time only; quality is not measured.

Usage: python benchmarks/large_export.py [--layers 18] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASK = "text-generation"


def _memory_scaling():
    """benchmarks/memory_scaling.py, for its checkpoint writer and VmHWM reader."""
    spec = importlib.util.spec_from_file_location("memory_scaling", HERE / "memory_scaling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(stage: str, source: Path, workdir: Path) -> None:
    from compressor.artifacts import OnnxModel, TorchModel
    from compressor.onnx_graph import tidy_external_data
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.export.export_onnx import ExportOnnxConfig
    from compressor.stages.quantize.quantize import Int8DynamicConfig

    workdir.mkdir(parents=True)
    ctx = StageContext(workdir, TASK, 2)
    started = time.perf_counter()
    if stage == "export":
        config = ExportOnnxConfig(type="export_onnx")
        result = REGISTRY["export_onnx"].run(config, TorchModel(source, TASK), ctx)
    else:
        config = Int8DynamicConfig(type="quantize", scheme="int8-dynamic")
        result = REGISTRY["quantize"].run(config, OnnxModel(source, TASK), ctx)
    tidied = tidy_external_data(result.path)  # as `compress run` does after every stage
    seconds = time.perf_counter() - started
    files = {p.name: round(p.stat().st_size / 1e9, 3) for p in result.path.parent.iterdir() if p.is_file()
             and p.name.startswith("model.onnx")}
    print(json.dumps({"seconds": round(seconds, 1), "peak_mb": round(_memory_scaling().peak_resident_mb()),
                      "out": str(result.path), "files_gb": files, "tidied": tidied,
                      **{k: v for k, v in ctx.details.items() if k in ("max_abs_diff", "atol", "exporter")}}))


def run_child(stage: str, source: Path, workdir: Path) -> dict:
    return _memory_scaling().json_child(__file__, ["--child", stage, str(source), str(workdir)], stage)


def reload_check(path: Path) -> dict:
    """A fresh ONNX Runtime session on the graph, and one forward pass of 16 tokens."""
    import numpy as np
    import onnxruntime as ort

    started = time.perf_counter()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = np.arange(1, 17, dtype=np.int64)[None, :]
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    logits = session.run(["logits"], {k: v for k, v in feed.items()
                                      if k in {i.name for i in session.get_inputs()}})[0]
    return {"reload_and_run_s": round(time.perf_counter() - started, 1), "logits_shape": list(logits.shape),
            "finite": bool(np.isfinite(logits).all())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--keep", help="work in this folder and keep what is written")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stage, source, workdir = args.child
        child(stage, Path(source), Path(workdir))
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="large-export-"))
    try:
        checkpoint = root / "checkpoint"
        started = time.perf_counter()
        size_gb = _memory_scaling().make_checkpoint(checkpoint, 2048, args.layers)
        print(json.dumps({"checkpoint_gb_bf16": round(size_gb, 2), "params_b": round(size_gb / 2, 3),
                          "write_s": round(time.perf_counter() - started, 1)}), flush=True)
        exported = run_child("export", checkpoint, root / "export")
        print(json.dumps({"export_onnx": exported}), flush=True)
        print(json.dumps({"export_reload": reload_check(Path(exported["out"]))}), flush=True)
        quantized = run_child("int8", Path(exported["out"]), root / "int8")
        print(json.dumps({"int8_dynamic": quantized}), flush=True)
        print(json.dumps({"int8_reload": reload_check(Path(quantized["out"]))}), flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
