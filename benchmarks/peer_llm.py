"""compress against llm-compressor on SmolLM2-135M: the same calibration tokens, the same evaluation
windows, the same evaluator, one run.

Both tools start from the fp32 SmolLM2 fixture. compress cuts the calibration windows (lee-test, the
shipped LLM recipes' calibration text; 16 x 256 tokens by default) and saves them; llm-compressor is
fed exactly those token ids, in that order. Each tool runs in its own process (compress in this
virtualenv, llm-compressor in the one `make peer-llm` creates), one method after the other, compress
first, so that both see the same machine load; the process's peak resident memory and the
compression's wall time are recorded by each. Every result is then evaluated here by compress's
perplexity code on the shipped recipes' evaluation windows (lee-background, 32 x 256 tokens, BOS
first: docs/RECIPES.md "Perplexity"), against the same fp32 baseline.

Methods (4-bit ones symmetric int4 in groups of g inputs; lm_head and embeddings left alone by both):
  sparsegpt-50, sparsegpt-2:4, wanda-50   compress `prune` (torch) / SparseGPTModifier, WandaPruningModifier
  rtn-g64                                 compress `quantize int4-weight-only` rtn (torch) / QuantizationModifier
  gptq-g64, gptq-g32                      compress int4 gptq (torch, block by block) / GPTQModifier, both
                                          quantizing columns in order (the peer's actorder off)
  gptq-act-g64, gptq-act-g32              the same with activation order and static groups on both sides
                                          (compress act_order: true; the peer's default, actorder static)
  awq-g64                                 compress int4 awq (torch) / AWQModifier
  rtn-onnx-g32                            ONNX Runtime's round to nearest on the exported model (signed-max
                                          grid), for the record: no peer row
  rtn-smax-g64, gptq-act-smax-g64, ...    compress with `symmetric_grid: signed-max` (its default, ONNX
                                          Runtime's grid, which compressed-tensors does not fit): no peer row;
                                          every other symmetric row uses absmax, the peer's grid
  rtn-asym-g32, gptq-act-asym-g32, ...    compress with asymmetric grids (the shipped ONNX recipes'): no peer row
  fp8-dynamic                             compress `quantize fp8` (E4M3 weights per output channel, activations
                                          per token at run time; no data) / QuantizationModifier FP8_DYNAMIC
  w8a8-int8                               compress `quantize w8a8-int8` (SmoothQuant alpha 0.8, then gptq int8
                                          weights per output channel, int8 activations per token) /
                                          SmoothQuantModifier(0.8) + GPTQModifier W8A8
The two 8-bit-activation methods are evaluated with their activations quantized on both sides: compress's
result is its own W8A8Linear folder (activations quantized and dequantized per call); llm-compressor's is
saved in the compressed-tensors format and loaded here through transformers' compressed-tensors loader,
which quantizes each Linear's input per token on the fly. Fake-quantized float weights (the other methods'
peer folders) would drop the activation half of the scheme. The reload is checked: every quantized Linear
must carry a compressed-tensors scheme with dynamic input activations, its logits must match the peer's own
model, and switching the activation quantization off must change them.
Groups of 64, not 128: SmolLM2's hidden size is 576 = 4.5 x 128, and llm-compressor refuses groups
that do not divide a layer's input size (compress quantizes the last, shorter group as it comes).

Usage: make peer-llm && python benchmarks/peer_llm.py [--methods sparsegpt-50,gptq-g128]
       [--samples 16] [--calibration lee-test] [--tools compress,llm-compressor]
Calibration-size curve (compress only): --tools compress --methods sparsegpt-2:4,gptq-g128
       --calibration enwiki-sample --samples 16,64,256,1024
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer-llm" / "bin" / "python"
TASK = "text-generation"
METHODS = "sparsegpt-50,sparsegpt-2:4,wanda-50,rtn-g64,gptq-g64,gptq-act-g64,gptq-g32,gptq-act-g32,awq-g64"
EVALUATION = {"data": {"dataset": "lee-background"}, "max_length": 256, "max_samples": 32, "batch_size": 4}
# ONNX Runtime's rtn, for the record (the peer has no ONNX output); compress's signed-max and asymmetric grids
COMPRESS_ONLY = {"rtn-onnx", "rtn-smax", "gptq-smax", "gptq-act-smax", "awq-smax", "rtn-asym", "gptq-asym",
                 "gptq-act-asym", "awq-asym", "rtn-onnx-asym"}
# 8-bit weights and 8-bit activations: the peer saves these compressed (compressed-tensors), not as float weights
ACTIVATION_METHODS = ("fp8-dynamic", "w8a8-int8")


def calibration(dataset: str, samples: int) -> dict:
    return {"data": {"dataset": dataset, "segment": "window"}, "samples": samples, "max_length": 256,
            "batch_size": 4}


def compress_stage(method: str, calib: dict):
    """The compress stage config of a method, and whether it starts from the ONNX export."""
    from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
    from compressor.stages.prune.prune import PruneConfig
    from compressor.stages.quantize.w8a8 import Fp8Config, W8A8Int8Config

    if method == "fp8-dynamic":  # llm-compressor's FP8_DYNAMIC: round to nearest, no calibration data
        return Fp8Config(type="quantize", scheme="fp8", weights="channel", activations="dynamic"), False
    if method == "w8a8-int8":  # llm-compressor's W8A8 example: SmoothQuant 0.8, then GPTQ on the same windows
        return W8A8Int8Config(type="quantize", scheme="w8a8-int8", algorithm="gptq", smoothing_strength=0.8,
                              activations="dynamic", calibration=calib), False
    kind, _, variant = method.rpartition("-")
    if kind in ("sparsegpt", "wanda"):
        pattern = "2:4" if variant == "2:4" else "unstructured"
        extra = {} if pattern == "2:4" else {"sparsity": 0.5}
        return PruneConfig(type="prune", method=kind, pattern=pattern, calibration=calib, **extra), False
    signed_max, asymmetric = kind.endswith("-smax"), kind.endswith("-asym")
    kind = kind.removesuffix("-smax").removesuffix("-asym")
    algorithm = kind.removesuffix("-onnx").removesuffix("-act")
    extra = {"calibration": calib} if algorithm in ("gptq", "awq") else {}
    if kind.endswith("-act"):
        extra["act_order"] = True
    if not asymmetric and not kind.endswith("-onnx"):  # ONNX Runtime's rtn fits its own grid (signed-max)
        # the peer's grid (compressed-tensors fits absmax), unless -smax asks for compress's default
        extra["symmetric_grid"] = "signed-max" if signed_max else "absmax"
    config = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm=algorithm,
                                  block_size=int(variant.removeprefix("g")), symmetric=not asymmetric, **extra)
    return config, kind.endswith("-onnx")


def compress_worker(args) -> None:
    """One compress stage in this process; writes compress.json beside the result."""
    import torch

    from compressor.artifacts import OnnxModel, TorchModel
    from compressor.stages import REGISTRY, StageContext

    torch.set_num_threads(2)
    config, from_onnx = compress_stage(args.worker, calibration(args.calibration, int(args.samples)))
    source = OnnxModel(Path(args.onnx), TASK) if from_onnx else TorchModel(Path(args.model), TASK)
    out = Path(args.out)
    ctx = StageContext(out, TASK, threads=2)
    started = time.perf_counter()
    result = REGISTRY[config.type].run(config, source, ctx)
    seconds = time.perf_counter() - started
    record = {"tool": "compress", "method": args.worker, "seconds": seconds,
              "peak_rss_mb": peak_rss_mb(),
              "artifact": str(result.path), "kind": result.kind}
    if args.worker in ACTIVATION_METHODS:  # how the stage says it evaluates, smoothing's record among them
        record["stage_details"] = ctx.details
    (out / "compress.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def cell(side, key: str, spec: str, scale: float = 1.0) -> str:
    return "-" if side is None else format(side[key] / scale, spec)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not getrusage's ru_maxrss: a child started from a
    large parent inherits the parent's high-water mark there, which would credit it with the parent's
    memory."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def cross_check(artifact, probe, out: Path, record: dict) -> dict:
    """The largest logit difference between llm-compressor's model in its own process and its saved
    folder as this process loads it (another transformers); a model read differently fails here. For the
    8-bit-activation methods also how the folder was loaded: it must come back through compressed-tensors
    with every quantized Linear quantizing its input per token (activation_path)."""
    import numpy as np
    import torch

    from compressor.checkpoint import load_torch_model

    module = load_torch_model(artifact)
    checks = {}
    with torch.no_grad():
        here = module(input_ids=torch.from_numpy(probe)).logits.numpy()
        if record.get("saved_as") == "compressed-tensors":
            checks = activation_path(module, torch.from_numpy(probe), here, record["quantized_layers"], out)
    artifact.module = None
    difference = float(np.abs(here - np.load(out / "probe_logits.npy")).max())
    if difference > 1e-3:
        raise SystemExit(f"{out}: reloads with logits {difference:.3g} away from llm-compressor's own model")
    return {"cross_reload_max_abs_logit_diff": difference, **checks}


def simulated_layers(artifact, out: Path) -> str:
    """That compress's 8-bit-activation folder loads as its own W8A8Linear layers (each quantizing its input
    per call), kept loaded for the evaluation."""
    from compressor.checkpoint import load_torch_model
    from compressor.w8a8_layers import is_w8a8_linear

    layers = [m for m in load_torch_model(artifact).modules() if is_w8a8_linear(m)]
    if not layers or any(m.activations != "token" for m in layers):
        raise SystemExit(f"{out}: {len(layers)} W8A8Linear layers, not all with per-token activations")
    return f"compress W8A8Linear, {len(layers)} layers, {layers[0].fmt} weights per {layers[0].weights}, " \
           f"{layers[0].fmt} inputs per {layers[0].activations} (simulated: quantize-dequantize, float32 matmul)"


def activation_path(module, probe, logits, expected_layers: int, out: Path) -> dict:
    """That a compressed-tensors folder evaluates with its activations quantized: the Linear layers carry
    compressed-tensors' scheme with dynamic per-token input activations, as many as the peer quantized, and
    turning only the input quantization off moves the logits (so the forward really applies it)."""
    import numpy as np
    from compressed_tensors.quantization import disable_quantization, enable_quantization

    layers = [(name, m) for name, m in module.named_modules()
              if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.input_activations]
    dynamic = [name for name, m in layers if m.quantization_scheme.input_activations.dynamic is True
               and m.quantization_scheme.input_activations.strategy == "token"]
    if len(layers) != expected_layers or len(dynamic) != expected_layers:
        raise SystemExit(f"{out}: {len(layers)} Linear layers reload with quantized inputs ({len(dynamic)} per "
                         f"token, dynamic); llm-compressor quantized {expected_layers}")
    args = layers[0][1].quantization_scheme.input_activations
    # compressed-tensors' switch covers weights and inputs together, but after the first forward the weights
    # are decompressed (float values on the 8-bit grid, status `decompressed`) and no longer fake-quantized,
    # so what the switch changes is the input quantization alone
    module.apply(disable_quantization)
    try:
        unquantized = module(input_ids=probe).logits.numpy()
    finally:
        module.apply(enable_quantization)
    moved = float(np.abs(logits - unquantized).max())
    if not moved > 0:
        raise SystemExit(f"{out}: turning the activation quantization off changes nothing; it is not applied")
    return {"reload_path": f"transformers + compressed-tensors, {len(layers)} Linear layers with input_activations "
                           f"{args.type}{args.num_bits} {args.strategy} dynamic",
            "logit_change_without_activation_quantization": moved}


def run_child(command: list[str], log: Path) -> None:
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = log.read_text().splitlines()[-15:]
        raise SystemExit(f"{command[0]} {command[1]} failed ({done.returncode}):\n" + "\n".join(tail))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--samples", default="16", help="calibration windows of 256 tokens; a comma list "
                                                        "measures each size (the calibration-size curve)")
    parser.add_argument("--calibration", default="lee-test", help="dataset card of the calibration text")
    parser.add_argument("--tools", default="compress,llm-compressor")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return compress_worker(args)
    tools = args.tools.split(",")
    if "llm-compressor" in tools and not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: run `make peer-llm` first")

    import numpy as np
    import torch

    from compressor import fixtures
    from compressor.artifacts import OnnxModel, TorchModel
    from compressor.checkpoint import load_tokenizer
    from compressor.data import CalibrationConfig, calibration_batches, load_samples
    from compressor.evaluate import evaluate
    from compressor.machine import describe, package_versions
    from compressor.recipe import EvaluationConfig
    from compressor.runners import make_runner
    from compressor.stages import REGISTRY, StageContext
    from compressor.stages.export.export_onnx import ExportOnnxConfig

    torch.set_num_threads(2)
    checkpoint = fixtures.ensure("smollm2")
    tokenizer = load_tokenizer(checkpoint)
    evaluation = EvaluationConfig.model_validate(EVALUATION)
    samples = load_samples(evaluation.data, TASK)
    methods = args.methods.split(",")
    work = Path(tempfile.mkdtemp(prefix="peer-llm-"))
    print(f"work folder {work}", flush=True)

    base_artifact = TorchModel(checkpoint, TASK)
    base = evaluate(TASK, make_runner(base_artifact, "fp32", threads=2), tokenizer, samples, evaluation)
    onnx_path = None
    if any("-onnx-" in m for m in methods):
        exported = REGISTRY["export_onnx"].run(ExportOnnxConfig(type="export_onnx", atol=1e-3), base_artifact,
                                               StageContext(work / "onnx-fp32", TASK, threads=2))
        onnx_path = exported.path

    rows = []
    for size in [int(n) for n in args.samples.split(",")]:
        calib = calibration(args.calibration, size)
        windows = np.concatenate([b["input_ids"] for b in calibration_batches(CalibrationConfig(**calib),
                                                                               tokenizer)])
        np.save(work / f"calibration-{size}.npy", windows)
        print(f"calibration: {windows.shape[0]} x {windows.shape[1]} tokens of {args.calibration}, BOS first",
              flush=True)
        for method in methods:
            row = {"method": method, "samples": size}
            for tool in tools:
                if tool == "llm-compressor" and method.rpartition("-")[0] in COMPRESS_ONLY:
                    continue
                out = work / f"{tool}-{method.replace(':', '-')}-{size}"
                out.mkdir()
                if tool == "compress":
                    command = [sys.executable, __file__, "--worker", method, "--model", str(checkpoint), "--out",
                               str(out), "--samples", str(size), "--calibration", args.calibration]
                    if onnx_path:
                        command += ["--onnx", str(onnx_path)]
                    run_child(command, out / "log.txt")
                    record = json.loads((out / "compress.json").read_text())
                    artifact = (OnnxModel(Path(record["artifact"]), TASK) if record["kind"] == "onnx"
                                else TorchModel(Path(record["artifact"]), TASK))
                    if method in ACTIVATION_METHODS:
                        record["reload_path"] = simulated_layers(artifact, out)
                else:
                    run_child([str(PEER_PYTHON), str(ROOT / "benchmarks" / "peer_llm_worker.py"), "--model",
                               str(checkpoint), "--windows", str(work / f"calibration-{size}.npy"), "--method",
                               method, "--out", str(out)], out / "log.txt")
                    record = json.loads((out / "peer.json").read_text())
                    artifact = TorchModel(out, TASK)
                    record.update(cross_check(artifact, windows[:2], out, record))
                metrics = evaluate(TASK, make_runner(artifact, f"{tool} {method}", threads=2), tokenizer, samples,
                                   evaluation, reference=base).metrics
                row[tool] = {**record, **metrics}
                print(f"  {method} x{size} {tool}: perplexity {metrics['perplexity']:.3f}, top-1 "
                      f"{metrics['top1_agreement']:.3f}, {record['seconds']:.0f} s, {record['peak_rss_mb']:.0f} MB",
                      flush=True)
            rows.append(row)

    dense = base.metrics["perplexity"]
    print(f"\nSmolLM2-135M fp32, perplexity {dense:.3f} on {base.samples} x 256 tokens of lee-background (BOS "
          f"first); calibration on {args.calibration}, windows of 256 tokens")
    print(f"{'method':15} {'tokens':>7} {'compress /dense':>15} {'peer /dense':>11} {'c / p':>6} {'top-1 c/p':>11} "
          f"{'seconds c/p':>12} {'peak MB c/p':>12}")
    for row in rows:
        mine, peer = row.get("compress"), row.get("llm-compressor")
        ratio = f"{mine['perplexity'] / peer['perplexity']:.3f}" if mine and peer else "-"
        print(f"{row['method']:15} {row['samples'] * 256:>7} {cell(mine, 'perplexity', '.3f', dense):>15} "
              f"{cell(peer, 'perplexity', '.3f', dense):>11} {ratio:>6} "
              f"{cell(mine, 'top1_agreement', '.3f'):>5}/{cell(peer, 'top1_agreement', '.3f'):<5} "
              f"{cell(mine, 'seconds', '.0f'):>5}/{cell(peer, 'seconds', '.0f'):<6} "
              f"{cell(mine, 'peak_rss_mb', '.0f'):>5}/{cell(peer, 'peak_rss_mb', '.0f'):<6}")
    for row in rows:  # the 8-bit-activation rows: how each side's result was loaded and evaluated
        for tool in tools:
            if row["method"] in ACTIVATION_METHODS and tool in row:
                print(f"{row['method']} {tool} evaluated as: {row[tool]['reload_path']}")
    versions = package_versions()
    print(f"machine: {describe()}")
    line = f"compress: torch {versions['torch']}, transformers {versions['transformers']}"
    if "llm-compressor" in tools:
        peer_versions = subprocess.run([str(PEER_PYTHON), "-c", "import llmcompressor, transformers; "
                                        "print(llmcompressor.__version__, transformers.__version__)"],
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1].split()
        line += f"; llm-compressor {' / transformers '.join(peer_versions)}"
    print(line)
    (work / "peer_llm.json").write_text(json.dumps({"dense": dense, "rows": rows}, indent=2, default=str) + "\n")
    print(f"raw figures: {work / 'peer_llm.json'}")


if __name__ == "__main__":
    main()
