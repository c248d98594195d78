"""export_compressed_tensors: the folder transformers loads (through the compressed-tensors package)
computes exactly what compress's int4 / int8 / pruned model computed, its tensors hold the same
codes in the documented layout, and what has no such form is refused before anything runs."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from compressor.artifacts import TorchModel
from compressor.errors import UserError
from compressor.planning import plan
from compressor.recipe import parse_recipe
from compressor.stages.export.compressed_tensors import ExportCompressedTensorsConfig, pack_int32
from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
from compressor.stages.prune.prune import PruneConfig
from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig

from .test_stages import outputs, run_stage

TASK = "text-generation"


def export(source, tmp_path):
    return run_stage(ExportCompressedTensorsConfig(type="export_compressed_tensors"), source, tmp_path / "ct", TASK)


def unpack(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The inverse of the layout: `32 / bits` values per int32 word, the first in the lowest bits."""
    per_word = 32 // bits
    raw = words.view(np.uint32)[..., None] >> (np.arange(per_word, dtype=np.uint32) * bits)
    return (raw & ((1 << bits) - 1)).reshape(words.shape[0], -1)[:, :count]


def tensors_of(folder) -> dict:
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_pack_int32_puts_the_first_value_in_the_lowest_bits():
    row = np.array([[-8, -7, 0, 1, 2, 3, 4, 7]]) + 8
    assert pack_int32(row.astype(np.uint32), 4).view(np.uint32)[0, 0] == 0xFCBA9810
    assert np.array_equal(unpack(pack_int32(row.astype(np.uint32), 4), 4, 8), row)


def test_int4_folder_reloads_with_transformers_to_the_same_logits(tiny_llama, tmp_path):
    quantized, _ = run_stage(Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", block_size=32,
                                                  symmetric=True), TorchModel(tiny_llama, TASK), tmp_path / "q", TASK)
    result, details = export(quantized, tmp_path)
    assert details["format"] == "pack-quantized" and details["quantized_linear_layers"] == 14
    assert details["reload_max_abs_diff"] == 0.0  # the same numbers: (q - zp) * scale = (code - 8) * scale
    config = json.loads((result.path / "config.json").read_text())["quantization_config"]
    weights = config["config_groups"]["group_0"]["weights"]
    assert config["quant_method"] == "compressed-tensors" and config["ignore"] == ["lm_head"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (4, "group", 32,
                                                                                                      True)
    assert not (result.path / "compress_transforms.json").exists()
    stored = tensors_of(result.path)
    layer = quantized.module.model.layers[0].self_attn.q_proj
    packed = stored["model.layers.0.self_attn.q_proj.weight_packed"]
    assert packed.dtype == torch.int32 and tuple(packed.shape) == (64, 64 * 4 // 32)
    assert np.array_equal(unpack(packed.numpy(), 4, 64), layer.codes().numpy())
    assert torch.equal(stored["model.layers.0.self_attn.q_proj.weight_shape"], torch.tensor([64, 64]))
    assert "model.layers.0.self_attn.q_proj.weight_zero_point" not in stored  # symmetric: none stored
    # What compress evaluates afterwards is the reloaded folder, through transformers.
    reloaded_logits, _ = outputs(TorchModel(result.path, TASK), result.path)
    original_logits, _ = outputs(quantized, tiny_llama)
    np.testing.assert_array_equal(reloaded_logits, original_logits)
    assert result.size_mb() < 0.5 * TorchModel(tiny_llama, TASK).size_mb()


def test_int8_weight_only_folder_reloads_to_the_same_logits(tiny_llama, tmp_path):
    quantized, _ = run_stage(Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only"),
                             TorchModel(tiny_llama, TASK), tmp_path / "q", TASK)
    result, details = export(quantized, tmp_path)
    assert details["reload_max_abs_diff"] == 0.0
    weights = json.loads((result.path / "config.json").read_text())["quantization_config"]["config_groups"][
        "group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"]) == (8, "channel")
    stored = tensors_of(result.path)
    layer = quantized.module.model.layers[1].mlp.down_proj
    packed = stored["model.layers.1.mlp.down_proj.weight_packed"].numpy()
    assert np.array_equal(unpack(packed, 8, 128).astype(np.int16) - 128, layer.weight_int8.numpy())
    assert tuple(stored["model.layers.1.mlp.down_proj.weight_scale"].shape) == (64, 1)


def test_pruned_float_model_records_its_2_4_sparsity(tiny_llama, tmp_path):
    pruned, _ = run_stage(PruneConfig(type="prune", method="magnitude", pattern="2:4"), TorchModel(tiny_llama, TASK),
                          tmp_path / "p", TASK)
    result, details = export(pruned, tmp_path)
    sparsity = json.loads((result.path / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert sparsity["sparsity_structure"] == "2:4" and sparsity["global_sparsity"] == pytest.approx(0.5)
    assert details["format"] == "dense" and details["reload_max_abs_diff"] == 0.0


@pytest.mark.parametrize("stages, message", [
    ("  - type: quantize\n    scheme: int4-weight-only\n", "asymmetric int4 .* set symmetric: true in stages\\[0\\]"),
    ("  - type: quantize\n    scheme: int8-dynamic\n", "stages\\[0\\] quantizes to int8-dynamic"),
    ("  - type: export_onnx\n", "stages\\[1\\] \\(export_compressed_tensors\\) needs a torch model"),
    ("", "stages\\[1\\] \\(export_onnx\\): stages\\[0\\] \\(export_compressed_tensors\\) writes a serving format "
         "that no stage reads; it must be the last stage"),
])
def test_what_has_no_compressed_tensors_form_is_refused_when_planning(stages, message):
    last = "  - type: export_compressed_tensors\n" + ("" if stages else "  - type: export_onnx\n")
    text = ("name: r\ntask: text-generation\nstages:\n" + stages + last +
            "evaluation:\n  data: {dataset: lee-background}\ngoals:\n  size: {max_ratio: 0.5}\n")
    with pytest.raises(UserError, match=message):
        plan(parse_recipe(text, "r.yaml"))


def test_a_stored_file_missing_a_quantized_tensor_is_refused_and_asymmetric_is_not_written(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from compressor.checkpoint import load_torch_model

    quantized, _ = run_stage(Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", block_size=32),
                             TorchModel(tiny_llama, TASK), tmp_path / "q", TASK)  # asymmetric
    with pytest.raises(UserError, match="asymmetric int4 has no loader here"):
        export(quantized, tmp_path)
    weights = quantized.path / "model.safetensors"
    tensors = load_file(str(weights))
    del tensors["model.layers.0.mlp.up_proj.weight_scale"]
    save_file(tensors, str(weights))
    with pytest.raises(UserError, match=r"weights do not match the int4-weight-only layout \(missing "
                                        r"\['model.layers.0.mlp.up_proj.weight_scale'\]"):
        load_torch_model(TorchModel(quantized.path, TASK))
