"""export_onnx through PyTorch's exporters: the folder keeps Optimum's layout (names, axes, files), both
exporters match torch, the dynamo graph fuses and quantizes like the TorchScript one, and large weights
go to an external data file."""

from collections import Counter

import numpy as np
import onnx
import pytest

from compressor.artifacts import TorchModel
from compressor.generation import OrtGenerator, TorchGenerator
from compressor.onnx_graph import tidy_external_data
from compressor.runners import OrtRunner, make_runner
from compressor.stages.export.export_onnx import ExportOnnxConfig
from compressor.stages.export.onnx_exporter import exporter_of
from compressor.stages.export.optimize_onnx import OptimizeOnnxConfig
from compressor.stages.quantize.quantize import Int8DynamicConfig

from .test_stages import outputs, run_stage, sqnr_db

CLS = "text-classification"
LM = "text-generation"


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def dynamo_classifier(tiny_classifier, tmp_path_factory):
    return run_stage(ExportOnnxConfig(type="export_onnx", exporter="dynamo"), TorchModel(tiny_classifier, CLS),
                     tmp_path_factory.mktemp("dynamo"), CLS)


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_the_folder_keeps_optimums_layout(exporter, tiny_classifier, dynamo_classifier, tmp_path):
    if exporter == "dynamo":
        model, details = dynamo_classifier
    else:
        model, details = run_stage(ExportOnnxConfig(type="export_onnx"), TorchModel(tiny_classifier, CLS), tmp_path,
                                   CLS)
    graph = onnx.load(str(model.path))
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(dims(i) == ["batch_size", "sequence_length"] for i in graph.graph.input)
    assert [o.name for o in graph.graph.output] == ["logits"] and dims(graph.graph.output[0])[0] == "batch_size"
    assert exporter_of(graph) == exporter == details["exporter"]
    assert details["opset"] == 18 and details["max_abs_diff"] <= 1e-4
    files = {p.name for p in model.folder.iterdir()}
    assert {"config.json", "tokenizer.json"} <= files and not any(f.endswith(".safetensors") for f in files)
    if exporter == "torchscript":  # traced as the model itself: weight names as in the checkpoint
        assert any(t.name == "bert.embeddings.word_embeddings.weight" for t in graph.graph.initializer)


def test_dynamo_graph_fuses_and_quantizes(tiny_encoder, tmp_path):
    task = "feature-extraction"
    source, _ = run_stage(ExportOnnxConfig(type="export_onnx", exporter="dynamo"), TorchModel(tiny_encoder, task),
                          tmp_path / "e", task)
    fused, details = run_stage(OptimizeOnnxConfig(type="optimize_onnx"), source, tmp_path / "f", task)
    ops = Counter(n.op_type for n in onnx.load(str(fused.path)).graph.node)
    assert ops["Attention"] == 2 and ops["SkipLayerNormalization"] >= 2  # onnxscript's ORT rules, then ORT's
    assert details["fused_operators"]["Attention"] == 2
    np.testing.assert_allclose(outputs(fused, fused.folder)[0], outputs(source, source.folder)[0], atol=1e-4)
    quantized, details = run_stage(Int8DynamicConfig(type="quantize", scheme="int8-dynamic"), fused, tmp_path / "q",
                                   task)
    # ORT's quantizer leaves onnxscript's Attention float (it carries qkv_hidden_sizes and an attention_bias,
    # which QAttention has no input for); the projections outside attention are quantized, 3 per layer
    assert details["quantized_nodes"] == {"MatMulInteger": 2 * 3} and ops["Attention"] == 2
    assert sqnr_db(outputs(source, source.folder)[0], outputs(quantized, quantized.folder)[0]) > 20


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_causal_lm_with_past_decodes_what_torch_decodes(exporter, tiny_llama, tmp_path):
    config = ExportOnnxConfig(type="export_onnx", with_past=True, exporter=exporter, atol=1e-3)
    model, details = run_stage(config, TorchModel(tiny_llama, LM), tmp_path, LM)
    graph = onnx.load(str(model.path)).graph
    inputs = {i.name: dims(i) for i in graph.input}
    assert inputs["input_ids"] == ["batch_size", "sequence_length"]
    assert inputs["past_key_values.0.key"][:3] == ["batch_size", 2, "past_sequence_length"]  # 2 KV heads
    assert "present.1.value" in [o.name for o in graph.output] and details["max_abs_diff"] <= 1e-3
    prompt = np.array([[2, 40, 41, 42, 43]], dtype=np.int64)
    decoded = []
    for generator in (TorchGenerator(make_runner(TorchModel(tiny_llama, LM), "t", threads=2)),
                      OrtGenerator(OrtRunner(model.path, LM, name="o", threads=2))):
        state, token = generator.first(prompt)
        tokens = [token]
        for _ in range(6):
            state, token = generator.next(state)
            tokens.append(token)
        decoded.append(tokens)
    assert decoded[0] == decoded[1]


def test_weights_above_the_limit_go_to_an_external_file(tiny_classifier, tmp_path, monkeypatch):
    from compressor.stages.export import onnx_exporter

    monkeypatch.setattr(onnx_exporter, "EXTERNAL_DATA_BYTES", 0)  # as a model over 1.8 GB would
    model, details = run_stage(ExportOnnxConfig(type="export_onnx"), TorchModel(tiny_classifier, CLS), tmp_path, CLS)
    data = model.folder / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > model.path.stat().st_size
    assert data in model.files() and details["max_abs_diff"] <= 1e-4
    assert data.stat().st_mode & 0o777 == model.path.stat().st_mode & 0o777  # not onnx's owner-only 0600
    # bytes nothing references (ONNX Runtime's quantizer leaves them: onnx_graph.tidy_external_data) are cut
    size = data.stat().st_size
    with open(data, "ab") as handle:
        handle.write(b"\0" * 4096)
    assert tidy_external_data(model.path) and data.stat().st_size == size
    assert tidy_external_data(model.path) == []
    import onnxruntime as ort
    ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])  # still whole after the cut
