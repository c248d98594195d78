"""int8-static and int8-weight-only really quantize, stay close to fp32, and fall back when asked."""

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_tokenizer, load_torch_model
from compressor.data import CalibrationConfig, DataConfig, calibration_batches, encode
from compressor.errors import UserError
from compressor.onnx_graph import complete_feed
from compressor.runners import make_runner
from compressor.stages import REGISTRY
from compressor.stages.quantize import onnx_static
from compressor.stages.quantize.onnx_static import _count_quantized, _session, smooth_activations
from compressor.stages.export.optimize_onnx import OptimizeOnnxConfig
from compressor.stages.quantize.onnx_static_config import Int8StaticConfig
from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig

from .test_stages import TEXTS, exported_classifier, exported_encoder, run_stage, sqnr_db  # noqa: F401


@pytest.fixture(scope="module")
def calibration(sentences_jsonl):
    return {"data": {"path": str(sentences_jsonl)}, "samples": 32, "batch_size": 4}


def static(calibration, **extra):
    return Int8StaticConfig(type="quantize", scheme="int8-static", calibration=calibration, **extra)


def outputs(artifact):
    feed = encode(load_tokenizer(artifact.folder), TEXTS, max_length=32)
    return make_runner(artifact, "x", threads=2)(feed)


def weight_matmuls(path):
    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


def test_static_quantizes_weight_matmuls_and_keeps_outputs_close(exported_encoder, calibration, tmp_path):
    onnx_model, _ = exported_encoder
    result, details = run_stage(static(calibration), onnx_model, tmp_path / "q", "feature-extraction")
    ops = Counter(n.op_type for n in onnx.load(str(result.path)).graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    # every weight MatMul, plus the two activation x activation MatMuls of each attention layer
    assert details["quantized_nodes"]["MatMul"] == len(weight_matmuls(onnx_model.path)) + 2 * 2
    assert sqnr_db(outputs(onnx_model), outputs(result)) > 25


def test_matmul_outputs_stay_float_unless_asked(exported_encoder, calibration, tmp_path):
    onnx_model, _ = exported_encoder

    def quantized_outputs(path):
        model = onnx.load(str(path))
        matmul_out = {n.output[0] for n in model.graph.node if n.op_type == "MatMul"}
        return sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in matmul_out)

    plain, _ = run_stage(static(calibration), onnx_model, tmp_path / "a", "feature-extraction")
    both, _ = run_stage(static(calibration, quantize_outputs=True), onnx_model, tmp_path / "b", "feature-extraction")
    assert quantized_outputs(plain.path) == 0 and quantized_outputs(both.path) > 0


def test_static_on_a_fused_graph_types_every_tensor(exported_encoder, calibration, tmp_path):
    """Fused graphs hold com.microsoft ops that ONNX shape inference cannot type; without the
    preprocessing the quantizer skips the tensors after them."""
    onnx_model, _ = exported_encoder
    fused, _ = run_stage(OptimizeOnnxConfig(type="optimize_onnx"), onnx_model, tmp_path / "f", "feature-extraction")
    assert any(n.domain == "com.microsoft" for n in onnx.load(str(fused.path)).graph.node)
    typed, details = run_stage(static(calibration), fused, tmp_path / "q", "feature-extraction")
    assert details["preprocess"] == "symbolic shape inference"
    assert details["quantized_nodes"]["MatMul"] == len(weight_matmuls(fused.path))
    with pytest.raises(UserError, match="no node was quantized"):  # what the preprocessing prevents
        run_stage(static(calibration, preprocess=False), fused, tmp_path / "u", "feature-extraction")
    assert sqnr_db(outputs(fused), outputs(typed)) > 25


def test_calibration_methods_give_different_ranges(exported_encoder, calibration, tmp_path, monkeypatch):
    onnx_model, _ = exported_encoder
    # ONNX Runtime searches the entropy threshold with a Python loop over every candidate bin, 0.6 s per
    # tensor at the shipped 2048 bins; 512 bins (still 4x the quantized bins, so a real search) take 0.05 s
    monkeypatch.setattr(onnx_static, "HISTOGRAM_BINS", 512)
    fixed = dict(calibration, padding="max_length", max_length=32)

    def scales(path):
        model = onnx.load(str(path))
        inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
        return np.concatenate([inits[n.input[1]].ravel() for n in model.graph.node
                               if n.op_type == "QuantizeLinear" and n.input[1] in inits])

    results = {m: run_stage(static(fixed, method=m), onnx_model, tmp_path / m, "feature-extraction")[0]
               for m in ("minmax", "entropy", "percentile")}
    minmax = scales(results["minmax"].path)
    assert not np.allclose(minmax, scales(results["entropy"].path))
    assert np.all(scales(results["percentile"].path) <= minmax + 1e-9)  # a percentile clips, never widens
    for result in results.values():
        assert sqnr_db(outputs(onnx_model), outputs(result)) > 15


def test_smoothing_keeps_the_function_and_moves_scale_into_weights(exported_encoder, sentences_jsonl, tmp_path):
    onnx_model, _ = exported_encoder
    tokenizer = load_tokenizer(onnx_model.folder)
    session = _session(onnx_model.path, 2)
    feeds = [complete_feed(session.get_inputs(), f) for f in calibration_batches(
        CalibrationConfig(data=DataConfig(path=str(sentences_jsonl)), samples=8), tokenizer)]
    smoothed = tmp_path / "smoothed.onnx"
    count = smooth_activations(onnx_model.path, smoothed, feeds, alpha=0.8, threads=2)
    assert count == 2 * 4  # per layer: QKV input, attention output, FFN input, FFN down input
    after = _session(smoothed, 2)
    for feed in feeds[:3]:
        np.testing.assert_allclose(after.run(None, feed)[0], session.run(None, feed)[0], rtol=1e-4, atol=1e-4)
    before_w = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(onnx_model.path)).graph.initializer}
    after_w = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(smoothed)).graph.initializer}
    changed = [n for n in before_w if before_w[n].ndim == 2 and not np.allclose(before_w[n], after_w[n])]
    assert len(changed) >= len(weight_matmuls(onnx_model.path))


def test_fallback_leaves_measured_nodes_in_float(exported_encoder, calibration, tmp_path):
    onnx_model, _ = exported_encoder
    config = static(calibration, fallback={"max_nodes": 2, "min_cosine": 1.0})  # unreachable on purpose
    ctx_dir = tmp_path / "q"
    ctx_dir.mkdir()
    from compressor.stages import StageContext

    ctx = StageContext(ctx_dir, "feature-extraction", threads=2)
    result = REGISTRY["quantize"].run(config, onnx_model, ctx)
    record = ctx.details["fallback"]
    floated = [entry["node"] for entry in record["float_nodes"]]
    assert 1 <= len(floated) <= 2 and record["target_met"] is False
    assert all(entry["gain_alone"] > 0 for entry in record["float_nodes"]), record
    assert record["min_cosine_after"] >= record["min_cosine_before"]
    model = onnx.load(str(result.path))
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    for node in model.graph.node:
        if node.name in floated:
            assert not any(i in dequantized for i in node.input), node.name
    assert _count_quantized(result.path)["MatMul"] == ctx.details["quantized_nodes"]["MatMul"] - len(floated)
    assert any("still below the target" in note for note in ctx.notes)


@pytest.mark.parametrize("extra, message", [
    ({}, "needs `calibration:`"),
    ({"method": "entropy", "calibration": {"data": {"path": "x.jsonl"}}}, "padding: max_length"),
])
def test_static_config_errors(extra, message):
    config = Int8StaticConfig(type="quantize", scheme="int8-static", **extra)
    assert message in REGISTRY["quantize"].check(config, "onnx", "feature-extraction")


def test_static_needs_onnx():
    stage = REGISTRY["quantize"]
    config = Int8StaticConfig(type="quantize", scheme="int8-static", calibration={"data": {"path": "x.jsonl"}})
    assert "add an export_onnx stage" in stage.check(config, "torch", "feature-extraction")


# ---------------------------------------------------------------------------------------------
# int8-weight-only


def test_onnx_weight_only_stores_int8_and_stays_close(exported_classifier, tmp_path):
    onnx_model, _ = exported_classifier
    config = Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only")
    result, details = run_stage(config, onnx_model, tmp_path / "w", "text-classification")
    model = onnx.load(str(result.path))
    onnx.checker.check_model(model)
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert len(int8) == details["quantized_weights"] == len(weight_matmuls(onnx_model.path))
    assert not weight_matmuls(result.path)  # no MatMul reads a float weight any more
    float_bytes = 4 * details["quantized_parameters"]
    assert details["size_mb_before"] - details["size_mb_after"] > 0.7 * float_bytes / 1e6
    assert sqnr_db(outputs(onnx_model), outputs(result)) > 30


def test_torch_weight_only_saves_int8_and_reloads(tiny_llama, tmp_path):
    import torch
    from safetensors import safe_open

    source = TorchModel(tiny_llama, "text-generation")
    config = Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only", exclude=["lm_head"])
    result, details = run_stage(config, source, tmp_path / "w", "text-generation")
    assert details["quantized_linear_layers"] == 2 * 7  # q k v o gate up down per layer
    with safe_open(str(result.path / "model.safetensors"), framework="pt") as handle:
        dtypes = {k: handle.get_slice(k).get_dtype() for k in handle.keys()}
    assert sum(1 for k, d in dtypes.items() if k.endswith("weight_int8") and d == "I8") == 14
    assert details["size_mb_after"] < details["size_mb_before"]

    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45, 46]])
    reloaded = load_torch_model(TorchModel(result.path, "text-generation"))  # fresh, from the files
    float_model = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    with torch.inference_mode():
        in_memory, from_disk = result.module(ids).logits, reloaded(ids).logits
        reference = float_model(ids).logits
    assert torch.equal(in_memory, from_disk)
    assert type(reloaded.model.layers[0].mlp.down_proj).__name__ == "Int8WeightOnlyLinear"
    assert type(reloaded.lm_head).__name__ == "Linear"  # excluded, still tied to the embeddings
    assert type(reloaded.get_input_embeddings()).__name__ == "Embedding" and details["embeddings"] == "float"
    assert sqnr_db(reference.numpy(), from_disk.numpy()) > 30


def test_weight_only_refuses_a_quantized_model(tiny_llama, tmp_path):
    source = TorchModel(tiny_llama, "text-generation", transforms=[{"name": "int8-dynamic"}])
    with pytest.raises(UserError, match="already quantized"):
        run_stage(Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only"), source, tmp_path, "text-generation")


def test_static_leaves_nothing_in_the_working_directory(exported_encoder, calibration, tmp_path, monkeypatch):
    """When ONNX Runtime's symbolic shape inference cannot follow a graph it saves
    sym_shape_infer_temp.onnx into the current directory and raises (onnxruntime 1.31,
    tools/symbolic_shape_infer.py); the stage falls back to ONNX shape inference, and the debug
    file must land in the stage's folder, not wherever the user ran compress."""
    import onnxruntime.quantization.shape_inference as shape_inference

    real = shape_inference.quant_pre_process

    def failing_symbolic(source, target, **options):
        if not options.get("skip_symbolic_shape"):
            Path("sym_shape_infer_temp.onnx").write_bytes(b"debug copy")
            raise Exception("Incomplete symbolic shape inference")
        return real(source, target, **options)

    monkeypatch.setattr(shape_inference, "quant_pre_process", failing_symbolic)
    onnx_model, _ = exported_encoder
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _, details = run_stage(static(calibration), onnx_model, tmp_path / "q", "feature-extraction")
    assert details["preprocess"] == "onnx shape inference" and details["quantized_nodes"]["MatMul"] > 0
    assert list(cwd.iterdir()) == []
