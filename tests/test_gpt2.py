"""GPT-2's Conv1D layers (weight inputs x outputs) go through every weight stage as nn.Linear layers
do: pruned, quantized and merged, saved in the layout GPT-2 loads, on a tiny GPT-2 built from a
config (none ships on PyPI)."""

import numpy as np
import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.linear_layers import conv1d_names
from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
from compressor.stages.prune.prune import PruneConfig
from compressor.stages.quantize.quantize import Int8DynamicConfig
from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig

from .test_int4 import calibration_for
from .test_merge_lora import make_adapter, merge
from .test_stages import outputs, run_stage, sqnr_db

TASK = "text-generation"
CONV1D_PER_BLOCK = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def gpt2(folder):
    return TorchModel(folder, TASK)


def logits(artifact, folder):
    return outputs(artifact, folder)[0]


def reload_from_disk(artifact):
    """The saved folder loaded afresh, as a user (or the evaluation) would."""
    return TorchModel(artifact.path, TASK, transforms=[])


def test_tiny_gpt2_has_conv1d_layers(tiny_gpt2):
    names = conv1d_names(load_torch_model(gpt2(tiny_gpt2)))
    assert len(names) == 2 * len(CONV1D_PER_BLOCK)


@pytest.mark.parametrize("method, pattern", [("magnitude", "unstructured"), ("wanda", "unstructured"),
                                             ("sparsegpt", "2:4")])
def test_unstructured_pruning_zeroes_conv1d_weights_and_saves_gpt2_layout(tiny_gpt2, text_file, tmp_path, method,
                                                                          pattern):
    from transformers import GPT2LMHeadModel

    extra = {} if method == "magnitude" else {"calibration": calibration_for(text_file)}
    pruned, details = run_stage(PruneConfig(type="prune", method=method, pattern=pattern, **extra), gpt2(tiny_gpt2),
                                tmp_path, TASK)
    assert details["pruned_layers"] == 8 and details["sparsity_pruned_layers"] == pytest.approx(0.5, abs=0.01)
    reloaded = GPT2LMHeadModel.from_pretrained(pruned.path).eval()  # GPT-2's own class: Conv1D layout on disk
    for block in range(2):
        for name in CONV1D_PER_BLOCK:
            weight = reloaded.get_submodule(f"transformer.h.{block}.{name}").weight  # inputs x outputs
            if pattern == "2:4":  # groups of 4 consecutive inputs of each output: at most 2 non-zero
                groups = (weight.T.reshape(weight.shape[1], -1, 4) != 0).sum(-1)
                assert int(groups.max()) <= 2
            assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    np.testing.assert_allclose(logits(reload_from_disk(pruned), pruned.path), logits(pruned, pruned.path), atol=1e-5)
    assert not np.allclose(logits(pruned, pruned.path), logits(gpt2(tiny_gpt2), tiny_gpt2), atol=1e-3)
    if pattern == "2:4":  # compressed-tensors records the pattern along each output's inputs
        from compressor.stages.export.compressed_tensors import ExportCompressedTensorsConfig

        _, written = run_stage(ExportCompressedTensorsConfig(type="export_compressed_tensors"), pruned,
                               tmp_path / "ct", TASK)
        assert written["sparsity"]["sparsity_structure"] == "2:4" and written["reload_max_abs_diff"] == 0.0


def test_structured_pruning_removes_gpt2_channels(tiny_gpt2, tmp_path):
    pruned, details = run_stage(PruneConfig(type="prune", kind="structured", channels=0.5),
                                gpt2(tiny_gpt2), tmp_path, TASK)
    assert details["family"] == "gpt2" and details["reload_max_abs_diff"] <= 1e-4
    assert details["channels_after"] == details["channels_before"] // 2 == 256
    assert details["params_ratio"] < 0.9 and details["macs_ratio"] < 0.85
    reloaded = load_torch_model(reload_from_disk(pruned))
    assert tuple(reloaded.transformer.h[0].mlp.c_fc.weight.shape) == (64, 128)
    assert reloaded.config.n_inner == 128


def test_int8_dynamic_and_weight_only_quantize_conv1d(tiny_gpt2, tmp_path):
    float_logits = logits(gpt2(tiny_gpt2), tiny_gpt2)
    dynamic, details = run_stage(Int8DynamicConfig(type="quantize", scheme="int8-dynamic"), gpt2(tiny_gpt2),
                                 tmp_path / "d", TASK)
    assert details["quantized_linear_layers"] == 8 + 1  # every Conv1D and lm_head
    replayed = logits(reload_from_disk(dynamic), dynamic.path)  # the transform replayed on a fresh load
    np.testing.assert_allclose(replayed, logits(dynamic, dynamic.path), atol=1e-5)
    assert 20 < sqnr_db(float_logits, replayed) < 200
    weight_only, details = run_stage(Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only"),
                                     gpt2(tiny_gpt2), tmp_path / "w", TASK)
    assert details["quantized_linear_layers"] == 8 + 1
    reloaded = logits(reload_from_disk(weight_only), weight_only.path)
    np.testing.assert_array_equal(reloaded, logits(weight_only, weight_only.path))
    assert 30 < sqnr_db(float_logits, reloaded) < 200


def test_int4_gptq_quantizes_conv1d_block_by_block(tiny_gpt2, text_file, tmp_path):
    quantized, details = run_stage(Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm="gptq",
                                                        block_size=32, calibration=calibration_for(text_file)),
                                   gpt2(tiny_gpt2), tmp_path, TASK)
    # the tied head computes with the int8 embedding table's codes
    assert details["quantized_linear_layers"] == 8 and details["kept_in_float"] == []
    assert details["embeddings"] == "int8"
    np.testing.assert_array_equal(logits(reload_from_disk(quantized), quantized.path),
                                  logits(quantized, quantized.path))
    assert sqnr_db(logits(gpt2(tiny_gpt2), tiny_gpt2), logits(quantized, quantized.path)) > 10


def test_nf4_quantizes_conv1d(tiny_gpt2, tmp_path):
    from compressor.stages.quantize.bnb_4bit import Bnb4bitConfig

    quantized, details = run_stage(Bnb4bitConfig(type="quantize", scheme="nf4"), gpt2(tiny_gpt2), tmp_path, TASK)
    assert details["quantized_linear_layers"] == 8 and details["kept_in_float"] == ["lm_head"]
    assert sqnr_db(logits(gpt2(tiny_gpt2), tiny_gpt2), logits(quantized, quantized.path)) > 10


def test_merge_lora_into_conv1d_equals_the_unmerged_adapter(tiny_gpt2, tmp_path):
    adapter = make_adapter(tiny_gpt2, TASK, tmp_path / "adapter", ["c_attn", "c_fc"], seed=3, task_type="CAUSAL_LM")
    merged, details = run_stage(merge((adapter, 1.0)), gpt2(tiny_gpt2), tmp_path / "merged", TASK)
    assert details["max_abs_diff"] <= 1e-4 and details["adapter_effect_max_abs"] > 0.01
    reloaded = load_torch_model(reload_from_disk(merged))
    assert sorted(conv1d_names(reloaded)) == sorted(conv1d_names(load_torch_model(gpt2(tiny_gpt2))))
    assert not torch.equal(reloaded.transformer.h[0].attn.c_attn.weight,
                           load_torch_model(gpt2(tiny_gpt2)).transformer.h[0].attn.c_attn.weight)


def test_int4_gpt2_exports_its_codes_to_onnx_and_is_refused_by_compressed_tensors(tiny_gpt2, tmp_path):
    """The exporter writes a Conv1D as a Gemm or MatMul reading (inputs, outputs): each becomes MatMulNBits with
    the torch codes. compressed-tensors' groups target Linear: it says so instead of failing halfway."""
    import onnx

    from compressor.errors import UserError
    from compressor.stages.export.compressed_tensors import ExportCompressedTensorsConfig
    from compressor.stages.export.export_onnx import ExportOnnxConfig

    quantized, _ = run_stage(Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", symmetric=True),
                             gpt2(tiny_gpt2), tmp_path / "q", TASK)
    exported, details = run_stage(ExportOnnxConfig(type="export_onnx"), quantized, tmp_path / "e", TASK)
    ops = [node.op_type for node in onnx.load(str(exported.path)).graph.node]
    assert ops.count("MatMulNBits") == details["int4_matmuls"] == 8  # the block layers; the tied head stays float
    assert details["max_abs_diff"] <= 1e-3
    with pytest.raises(UserError, match="quantized GPT-2-style Conv1D models are not written in compressed-tensors"):
        run_stage(ExportCompressedTensorsConfig(type="export_compressed_tensors"), quantized, tmp_path / "c", TASK)
