"""Each stage really transforms a tiny model, and the transformation is measured."""

from collections import Counter

import numpy as np
import onnx
import pytest

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_tokenizer
from compressor.data import encode
from compressor.errors import StageFailed, UserError
from compressor.runners import OrtRunner, make_runner
from compressor.stages import REGISTRY, StageContext
from compressor.stages.export.export_onnx import ExportOnnxConfig
from compressor.stages.export.optimize_onnx import OptimizeOnnxConfig
from compressor.stages.quantize.quantize import Int8DynamicConfig

TEXTS = ["the film was good and funny", "a dull boring mess", "this story is not very sad but the cast is great"]


def run_stage(config, artifact, workdir, task):
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext(workdir, task, threads=2)
    return REGISTRY[config.type].run(config, artifact, ctx), ctx.details


def outputs(artifact, folder):
    tokenizer = load_tokenizer(folder)
    feed = encode(tokenizer, TEXTS, max_length=32)
    return make_runner(artifact, "x", threads=2)(feed), feed


def sqnr_db(reference, candidate):
    noise = np.mean((reference - candidate) ** 2)
    return 10 * np.log10(np.mean(reference ** 2) / max(noise, 1e-30))


@pytest.fixture(scope="module")
def exported_classifier(tiny_classifier, tmp_path_factory):
    config = ExportOnnxConfig(type="export_onnx")
    return run_stage(config, TorchModel(tiny_classifier, "text-classification"),
                     tmp_path_factory.mktemp("export"), "text-classification")


@pytest.fixture(scope="module")
def exported_encoder(tiny_encoder, tmp_path_factory):
    config = ExportOnnxConfig(type="export_onnx")
    return run_stage(config, TorchModel(tiny_encoder, "feature-extraction"),
                     tmp_path_factory.mktemp("export"), "feature-extraction")


def test_export_matches_torch(exported_classifier, tiny_classifier):
    onnx_model, details = exported_classifier
    assert onnx_model.path.is_file() and onnx.load(str(onnx_model.path)).graph.node
    assert details["max_abs_diff"] <= 1e-4
    expected, _ = outputs(TorchModel(tiny_classifier, "text-classification"), tiny_classifier)
    actual, _ = outputs(onnx_model, onnx_model.folder)
    np.testing.assert_allclose(actual, expected, atol=1e-4)


def test_export_fails_beyond_atol(tiny_classifier, tmp_path):
    config = ExportOnnxConfig(type="export_onnx", atol=1e-12)
    with pytest.raises(StageFailed, match=r"differs from torch by .* \(atol 1e-12\)"):
        run_stage(config, TorchModel(tiny_classifier, "text-classification"), tmp_path, "text-classification")


def test_export_static_axes(tiny_classifier, tmp_path):
    config = ExportOnnxConfig(type="export_onnx", static_axes={"batch_size": 1, "sequence_length": 16})
    model, _ = run_stage(config, TorchModel(tiny_classifier, "text-classification"), tmp_path, "text-classification")
    assert OrtRunner(model.path, "text-classification").fixed_shape == (1, 16)


@pytest.mark.parametrize("with_past", [False, True])
def test_export_causal_lm(tiny_llama, tmp_path, with_past):
    config = ExportOnnxConfig(type="export_onnx", with_past=with_past, atol=1e-3)
    model, details = run_stage(config, TorchModel(tiny_llama, "text-generation"), tmp_path, "text-generation")
    inputs = [i.name for i in onnx.load(str(model.path)).graph.input]
    assert any(name.startswith("past_key_values") for name in inputs) == with_past
    assert details["max_abs_diff"] <= 1e-3


def test_optimize_fuses_and_keeps_outputs(exported_classifier, tmp_path):
    source, _ = exported_classifier
    optimized, details = run_stage(OptimizeOnnxConfig(type="optimize_onnx"), source, tmp_path, "text-classification")
    ops = Counter(n.op_type for n in onnx.load(str(optimized.path)).graph.node)
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] >= 2  # one attention per layer, fused
    assert details["fused_operators"]["Attention"] == 2
    before, _ = outputs(source, source.folder)
    after, _ = outputs(optimized, optimized.folder)
    np.testing.assert_allclose(after, before, atol=1e-4)


def test_quantize_onnx_int8_dynamic(exported_encoder, tmp_path):
    source, _ = exported_encoder
    quantized, details = run_stage(Int8DynamicConfig(type="quantize", scheme="int8-dynamic"), source, tmp_path,
                                   "feature-extraction")
    ops = Counter(n.op_type for n in onnx.load(str(quantized.path)).graph.node)
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] >= 12  # 6 weight MatMuls per layer, 2 layers
    int8_weights = [t for t in onnx.load(str(quantized.path)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 12
    assert details["size_mb_after"] < details["size_mb_before"]
    reference, _ = outputs(source, source.folder)
    candidate, _ = outputs(quantized, quantized.folder)
    assert sqnr_db(reference, candidate) > 20  # int8 close to float, but not bit-identical
    assert not np.array_equal(reference, candidate)


def test_quantize_fused_graph(exported_encoder, tmp_path):
    """The fused graph's com.microsoft ops defeat ONNX type inference; the stage must still work."""
    source, _ = exported_encoder
    fused, _ = run_stage(OptimizeOnnxConfig(type="optimize_onnx"), source, tmp_path / "f", "feature-extraction")
    quantized, details = run_stage(Int8DynamicConfig(type="quantize", scheme="int8-dynamic"), fused, tmp_path / "q",
                                   "feature-extraction")
    assert details["quantized_nodes"].get("QAttention") == 2
    reference, _ = outputs(source, source.folder)
    candidate, _ = outputs(quantized, quantized.folder)
    assert sqnr_db(reference, candidate) > 20


def test_quantize_exclude_keeps_nodes_float(exported_classifier, tmp_path):
    source, _ = exported_classifier
    config = Int8DynamicConfig(type="quantize", scheme="int8-dynamic", exclude=["*/output/dense/MatMul"])
    quantized, details = run_stage(config, source, tmp_path, "text-classification")
    names = {n.name for n in onnx.load(str(quantized.path)).graph.node if n.op_type == "MatMul"}
    assert details["excluded_nodes"] >= 2 and any("/output/dense/MatMul" in n for n in names)
    with pytest.raises(UserError, match="no node matches"):
        run_stage(Int8DynamicConfig(type="quantize", scheme="int8-dynamic", exclude=["nothing*"]), source,
                  tmp_path / "x", "text-classification")


def test_quantize_torch_int8_dynamic_and_reload(tiny_encoder, tmp_path):
    import torch

    from compressor.checkpoint import load_torch_model

    source = TorchModel(tiny_encoder, "feature-extraction")
    quantized, details = run_stage(Int8DynamicConfig(type="quantize", scheme="int8-dynamic", exclude=["pooler.*"]),
                                   source, tmp_path, "feature-extraction")
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    int8_layers = [m for m in quantized.module.modules() if isinstance(m, dynamic_linear)]
    assert details["quantized_linear_layers"] == len(int8_layers) == 12  # 6 Linear per layer, 2 layers
    assert not isinstance(quantized.module.pooler.dense, dynamic_linear)  # excluded by name
    reference, _ = outputs(TorchModel(tiny_encoder, "feature-extraction"), tiny_encoder)
    candidate, _ = outputs(quantized, tiny_encoder)
    assert sqnr_db(reference, candidate) > 20 and not np.array_equal(reference, candidate)
    reloaded = load_torch_model(TorchModel(quantized.path, "feature-extraction"))  # replays the transform
    again, _ = outputs(TorchModel(quantized.path, "feature-extraction", module=reloaded), tiny_encoder)
    np.testing.assert_allclose(again, candidate, atol=1e-6)
