"""Static int8 (QDQ) quantization of ONNX models with calibration data, optional activation
smoothing, and an accuracy-aware fallback that leaves the most harmful nodes in float."""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from onnxruntime.quantization import CalibrationDataReader

from ...artifacts import OnnxModel
from ...checkpoint import load_tokenizer
from ...data import calibration_batches
from ...errors import StageFailed, UserError
from ...onnx_graph import complete_feed, graph_float_type, match_nodes
from ...runners import MAIN_OUTPUT
from ..base import StageContext
from ..export.export_onnx import copy_tokenizer_files

log = logging.getLogger(__name__)

METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


# ---------------------------------------------------------------------------------------------
# Graph helpers


def _session(model, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model if isinstance(model, (str, Path)) else model.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                providers=["CPUExecutionProvider"])


def _with_outputs(model_path: Path, names: list[str]):
    """The model with extra graph outputs, so intermediate tensors can be read back."""
    import onnx

    model = onnx.load(str(model_path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))  # type filled in by ONNX Runtime
    return model


def _preprocess(source: Path, target: Path, ctx: StageContext) -> Path:
    """Give every tensor a type before quantizing. Fused graphs hold com.microsoft operators
    (Attention, SkipLayerNormalization) that ONNX's own shape inference cannot type, and the
    quantizer silently skips untyped tensors; ONNX Runtime's symbolic shape inference knows them.
    Plain exports sometimes defeat symbolic inference; ONNX shape inference is enough for those."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, target = source.resolve(), target.resolve()
    # On failure symbolic inference saves a debug copy of the model into the working directory.
    with _working_directory(target.parent):
        try:
            quant_pre_process(str(source), str(target), skip_optimization=True, auto_merge=True)
            ctx.details["preprocess"] = "symbolic shape inference"
        except Exception as exc:  # symbolic inference raises bare Exception on graphs it cannot follow
            log.info("symbolic shape inference failed (%s); using ONNX shape inference", exc)
            quant_pre_process(str(source), str(target), skip_optimization=True, skip_symbolic_shape=True)
            ctx.details["preprocess"] = "onnx shape inference"
    return target


@contextmanager
def _working_directory(folder: Path):
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _weight_matmuls(model) -> dict[str, list]:
    """MatMul nodes with a constant 2-D weight, grouped by the activation they read."""
    inits = {i.name: i for i in model.graph.initializer}
    groups = defaultdict(list)
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2 \
                and node.input[0] not in inits:
            groups[node.input[0]].append(node)
    return groups


def smooth_activations(source: Path, target: Path, feeds: list[dict], alpha: float, threads: int) -> int:
    """SmoothQuant: divide each MatMul activation by a per-channel factor and multiply the weight's
    rows by it, so outlier channels move into the (per-channel quantized) weights. The function the
    graph computes is unchanged up to float rounding. Returns how many activations were smoothed."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    groups = _weight_matmuls(model)
    probe = _session(_with_outputs(source, list(groups)), threads)
    names = list(groups)
    amax: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, probe.run(names, feed)):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(0)
            amax[name] = peak if name not in amax else np.maximum(amax[name], peak)
    inits = {i.name: i for i in model.graph.initializer}
    for index, (activation, nodes) in enumerate(groups.items()):
        weights = [numpy_helper.to_array(inits[n.input[1]]) for n in nodes]
        weight_peak = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        factor = (np.maximum(amax[activation], 1e-5) ** alpha / np.maximum(weight_peak, 1e-5) ** (1 - alpha))
        factor = np.clip(factor, 1e-4, 1e4).astype(np.float32)
        for node, weight in zip(nodes, weights):
            scaled = (weight * factor[:, None]).astype(weight.dtype)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(scaled, node.input[1]))
        inverse, smoothed = f"compress_smooth_{index}_inverse", f"{activation}_smoothed"
        model.graph.initializer.append(numpy_helper.from_array((1 / factor).astype(np.float32), inverse))
        mul = helper.make_node("Mul", [activation, inverse], [smoothed], name=f"compress_smooth_{index}")
        position = next(i for i, n in enumerate(model.graph.node) if n.name == nodes[0].name)
        model.graph.node.insert(position, mul)
        for node in nodes:
            node.input[0] = smoothed
    onnx.save(model, str(target))
    return len(groups)


# ---------------------------------------------------------------------------------------------
# Fidelity on calibration data


def output_cosines(reference: list[np.ndarray], candidate: list[np.ndarray], feeds: list[dict]) -> np.ndarray:
    """Cosine between reference and candidate outputs, one value per sample, over its real tokens."""
    values = []
    for ref, out, feed in zip(reference, candidate, feeds):
        mask = feed.get("attention_mask")
        for row in range(ref.shape[0]):
            a, b = ref[row], out[row]
            if mask is not None and a.ndim >= 2 and a.shape[0] == mask.shape[1]:
                keep = mask[row].astype(bool)
                a, b = a[keep], b[keep]
            a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
            values.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return np.asarray(values)


def _run_all(session, feeds: list[dict], output: str) -> list[np.ndarray]:
    return [session.run([output], feed)[0] for feed in feeds]


def _relative_errors(reference: dict[str, list], candidate: dict[str, list]) -> dict[str, float]:
    errors = {}
    for name, refs in reference.items():
        num = sum(float(np.sum((c.astype(np.float64) - r) ** 2)) for r, c in zip(refs, candidate[name]))
        den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in refs)
        errors[name] = (num / max(den, 1e-30)) ** 0.5
    return errors


def rank_harm(float_path: Path, quantized_path: Path, feeds: list[dict], threads: int) -> list[tuple[str, float]]:
    """How much error each quantized MatMul adds: relative error of its output against fp32 minus the
    error already present in its float inputs, both measured on calibration data. Largest first."""
    import onnx

    model = onnx.load(str(quantized_path), load_external_data=False)
    producer = {out: node for node in model.graph.node for out in node.output}
    float_inputs: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        sources = []
        for name in node.input:
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                sources.append(q.input[0])  # the float activation before quantization
        if sources:
            float_inputs[node.name] = sources
    if not float_inputs:
        return []
    nodes = {n.name: n for n in model.graph.node}
    tensors = sorted({t for srcs in float_inputs.values() for t in srcs} |
                     {nodes[n].output[0] for n in float_inputs})
    reference, candidate = defaultdict(list), defaultdict(list)
    for path, store in ((float_path, reference), (quantized_path, candidate)):
        session = _session(_with_outputs(path, tensors), threads)
        for feed in feeds:
            for name, value in zip(tensors, session.run(tensors, feed)):
                store[name].append(value)
    errors = _relative_errors(reference, candidate)
    harm = {name: errors[nodes[name].output[0]] - max(errors[t] for t in srcs)
            for name, srcs in float_inputs.items()}
    return sorted(harm.items(), key=lambda item: -item[1])


# ---------------------------------------------------------------------------------------------
# The stage


class _Reader(CalibrationDataReader):
    """Prepared feeds, one batch per call, as ONNX Runtime's calibrators read them."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


def quantize_static_onnx(config, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as _quantize_static

    if artifact.needs_external_data():
        raise UserError("quantize int8-static: models above 2 GB (external data) are not supported yet")
    work = ctx.workdir / "calibration"
    work.mkdir()
    source = _preprocess(artifact.path, work / "typed.onnx", ctx) if config.preprocess else artifact.path
    float_session = _session(source, ctx.threads)
    tokenizer = load_tokenizer(artifact.folder)
    feeds = [complete_feed(float_session.get_inputs(), feed)
             for feed in calibration_batches(config.calibration, tokenizer)]
    if config.smooth_alpha is not None:
        smoothed = smooth_activations(source, work / "smoothed.onnx", feeds, config.smooth_alpha, ctx.threads)
        source = work / "smoothed.onnx"
        ctx.details["smoothed_activations"] = smoothed

    graph = onnx.load(str(source), load_external_data=False)
    names = [node.name for node in graph.graph.node]
    include = match_nodes(names, config.include, "include")
    exclude = match_nodes(names, config.exclude, "exclude")
    float_type = graph_float_type(graph)
    op_types = config.op_types or ["MatMul"]
    extra = {"ActivationSymmetric": config.activation_symmetric, "WeightSymmetric": True,
             "DefaultTensorType": float_type}
    if not config.quantize_outputs:
        # A quantized MatMul output is requantized per tensor before the bias and the residual add,
        # where transformer activations carry their largest outliers; float outputs keep them intact
        # and let ONNX Runtime run DQ-MatMul as one integer kernel with a float result.
        extra["OpTypesToExcludeOutputQuantization"] = list(op_types)
    if config.method == "percentile":
        extra["CalibPercentile"] = config.percentile
    activation = QuantType.QInt8 if config.activation_type == "int8" else QuantType.QUInt8
    cache = work / "ranges.json"
    out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)

    def quantize(excluded: list[str], target: Path) -> None:
        _quantize_static(source, target, _Reader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=op_types, per_channel=config.per_channel,
                        reduce_range=config.reduce_range, activation_type=activation,
                        weight_type=QuantType.QInt8, nodes_to_quantize=include, nodes_to_exclude=excluded,
                        calibrate_method=getattr(CalibrationMethod, METHODS[config.method]),
                        extra_options=dict(extra), calibration_cache_path=cache)
        if excluded:
            keep_float(target, excluded)

    try:
        _calibrate(source, feeds, op_types, config, work, cache)
        quantize(exclude, out.path)
    except (ValueError, RuntimeError) as exc:
        raise StageFailed(f"quantize int8-static: ONNX Runtime's quantizer failed: {exc}") from None
    counted = _count_quantized(out.path)
    if not counted:
        raise UserError("quantize int8-static: no node was quantized; check op_types, include and exclude")
    ctx.details.update({"backend": "onnxruntime", "format": "QDQ", "method": config.method,
                        "calibration_samples": config.calibration.samples, "quantized_nodes": counted})
    if config.fallback is not None:
        _fallback(config, artifact.task, source, out.path, feeds, exclude, quantize, ctx,
                  MAIN_OUTPUT[artifact.task])
    copy_tokenizer_files(artifact.folder, ctx.workdir)
    ctx.details.update({"size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(out.size_mb(), 3)})
    return out


def keep_float(path: Path, names: list[str]) -> None:
    """Make excluded nodes read float inputs. ONNX Runtime's QDQ quantizer puts one Q/DQ pair on a
    tensor shared by several consumers, so a node excluded from quantization (say the key projection,
    which shares its input with query and value) would still read the dequantized activation."""
    import onnx

    model = onnx.load(str(path))
    producer = {out: node for node in model.graph.node for out in node.output}
    wanted = set(names)
    for node in model.graph.node:
        if node.name not in wanted:
            continue
        for index, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[index] = q.input[0]
    _drop_unused_qdq(model)
    onnx.save(model, str(path))


def _drop_unused_qdq(model) -> None:
    while True:
        used = {i for node in model.graph.node for i in node.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            return
        for node in dead:
            model.graph.node.remove(node)


# Histogram methods need many fine bins to search a threshold in: with ONNX Runtime's default for
# entropy (128 bins into 128 quantized bins) the only candidate is the full range, i.e. MinMax, and
# quantize_static offers no way to change it. 2048 into 128 is the classic setting for int8 entropy.
HISTOGRAM_BINS = 2048
QUANTIZED_BINS = 128


def _calibrate(source: Path, feeds: list[dict], op_types: list[str], config, work: Path, cache: Path) -> None:
    """Measure activation ranges once and store them where quantize_static reads its cache, so the
    fallback can requantize without recalibrating."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    options = {"num_bins": HISTOGRAM_BINS, "num_quantized_bins": QUANTIZED_BINS}
    if config.method == "percentile":
        options["percentile"] = config.percentile
    calibrator = create_calibrator(source, op_types, augmented_model_path=str(work / "augmented.onnx"),
                                   calibrate_method=getattr(CalibrationMethod, METHODS[config.method]),
                                   extra_options=options)
    calibrator.collect_data(_Reader(feeds))
    save_tensors_data(calibrator.compute_data(), cache)
    del calibrator


def _count_quantized(path: Path) -> dict[str, int]:
    """Nodes that compute in int8 (every input dequantized), by operator type. A node whose weight is
    dequantized but whose activation is not (an untyped tensor the quantizer skipped) is not counted."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts: dict[str, int] = defaultdict(int)
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and node.input \
                and all(i in dequantized for i in node.input if i):
            counts[node.op_type] += 1
    return dict(counts)


def _fallback(config, task, source: Path, quantized: Path, feeds, exclude, quantize, ctx, output: str) -> None:
    """Leave the most harmful nodes in float until the worst calibration sample's output cosine
    against fp32 reaches the target or the node budget is spent.

    Candidates are the nodes that add the most error locally (twice the budget); each is then left
    in float on its own and the gain in worst-sample cosine is measured, because local error does
    not always predict what reaches the output. Nodes are taken in order of measured gain."""
    target, budget = config.fallback.min_cosine, config.fallback.max_nodes
    reference = _run_all(_session(source, ctx.threads), feeds, output)
    trial = quantized.with_name("fallback-trial.onnx")

    def worst_with(excluded: list[str]) -> float:
        quantize(excluded, trial)
        candidate = _run_all(_session(trial, ctx.threads), feeds, output)
        return float(output_cosines(reference, candidate, feeds).min())

    before = float(output_cosines(reference, _run_all(_session(quantized, ctx.threads), feeds, output), feeds).min())
    record = {"target_min_cosine": target, "min_cosine_before": round(before, 6), "float_nodes": []}
    current, excluded = before, list(exclude)
    if before < target:
        ranked = [(n, h) for n, h in rank_harm(source, quantized, feeds, ctx.threads) if n not in excluded]
        measured = [(name, harm, worst_with(excluded + [name]) - before) for name, harm in ranked[: 2 * budget]]
        measured.sort(key=lambda item: -item[2])
        chosen = []
        for name, harm, gain in measured[:budget]:
            if gain <= 0:
                break  # leaving the rest in float would cost speed for nothing
            chosen.append(name)
            current = worst_with(excluded + chosen)
            record["float_nodes"].append({"node": name, "added_error": float(f"{harm:.3g}"),
                                          "gain_alone": float(f"{gain:.3g}"), "min_cosine_after": round(current, 6)})
            if current >= target:
                break
        if chosen:
            excluded += chosen
            trial.replace(quantized)
    record.update({"min_cosine_after": round(current, 6), "target_met": current >= target})
    ctx.details["fallback"] = record
    if current < target:
        ctx.notes.append(f"quantize fallback: {len(record['float_nodes'])} node(s) left in float, worst "
                         f"calibration cosine {current:.4f} still below the target {target}")
