"""Layer by layer beyond dense Llamas. Mixture-of-experts models: the skeleton opens its fused experts one
nn.Linear each and reads them from the checkpoint's per-expert tensors (Mixtral's under their own names), so
every layer-by-layer stage compresses the experts block by block and writes what the whole-model path writes,
bit for bit; a checkpoint storing its experts fused (GPT-OSS) is refused with the reason. GPT-2: its Conv1D
layers (weights stored inputs x outputs) are opened as nn.Linear and transposed on reading and writing."""

import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.errors import UserError
from compressor.shards import read_state
from compressor.stages.cast.cast import CastConfig
from compressor.stages.lora.merge_lora import MergeLoraConfig
from compressor.stages.prune.prune import PruneConfig
from compressor.stages.quantize.int4_onnx import Int4WeightOnlyConfig
from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig
from compressor.streamed import LayerwiseModel

from .architectures import build_architecture
from .test_layerwise import IDS, TASK, sharded_copy
from .test_merge_lora import make_adapter
from .test_stages import run_stage


@pytest.fixture(scope="module")
def sharded_moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {kind: sharded_copy(build_architecture(root / "built" / kind, kind), root / "sharded" / kind)
            for kind in ("qwen3_moe", "mixtral")}


def _both(config, checkpoint, workdir):
    """(whole result, whole record, layer-by-layer result, its record), after checking the files are equal."""
    whole, whole_details = run_stage(config.model_copy(update={"execution": "whole"}), TorchModel(checkpoint, TASK),
                                     workdir / "whole", TASK)
    streamed, details = run_stage(config.model_copy(update={"execution": "layerwise"}), TorchModel(checkpoint, TASK),
                                  workdir / "layerwise", TASK)
    assert details["execution"] == "layerwise"
    expected, written = read_state(whole.path), read_state(streamed.path)
    assert set(written) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor), name
    with torch.no_grad():
        assert torch.equal(load_torch_model(TorchModel(streamed.path, TASK))(IDS).logits,
                           load_torch_model(TorchModel(whole.path, TASK))(IDS).logits)
    return whole, whole_details, streamed, details


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_calibrated_stages_compress_every_expert_block_by_block(kind, sharded_moe, text_file, tmp_path):
    """SparseGPT 2:4 and GPTQ, every expert calibrated on every token: the whole path's files exactly."""
    calibration = {"data": {"path": str(text_file), "segment": "window"}, "samples": 8, "max_length": 32,
                   "batch_size": 4}
    sparse = PruneConfig(type="prune", method="sparsegpt", pattern="2:4", calibration=calibration)
    _, whole, _, details = _both(sparse, sharded_moe[kind], tmp_path / "sparsegpt")
    assert details["experts_changed_share"] == whole["experts_changed_share"] == 1.0
    assert details["sparsity_pruned_layers"] == pytest.approx(0.5, abs=0.01)
    counts = details["routed_tokens_per_expert"]
    assert counts == whole["routed_tokens_per_expert"] and len(counts) == 2 and all(sum(c) > 0 for c in counts.values())
    gptq = Int4WeightOnlyConfig(type="quantize", scheme="int4-weight-only", algorithm="gptq", block_size=16,
                                symmetric=True, calibration=calibration)
    _, whole, streamed, details = _both(gptq, sharded_moe[kind], tmp_path / "gptq")
    assert details["quantized_linear_layers"] == whole["quantized_linear_layers"] >= 2 * 3 * 4
    assert details["experts_changed_share"] == 1.0
    packed = [name for name in read_state(streamed.path) if ".experts." in name and name.endswith("weight_packed")]
    assert len(packed) == 2 * 3 * 4  # two blocks of four experts of three layers


def test_mixtral_under_its_checkpoint_names_through_every_streaming_stage(sharded_moe, tmp_path):
    """Mixtral's checkpoints name the router and experts block_sparse_moe.gate / experts.N.w1-w3; the skeleton
    reads them under its own names, and a float result is written back under the checkpoint's (transformers
    loads it); int8, cast and merge_lora match the whole path too."""
    checkpoint = sharded_moe["mixtral"]
    stored = set(read_state(checkpoint))
    assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in stored
    model = LayerwiseModel(checkpoint, TASK)
    assert model.stored_name("model.layers.0.mlp.experts.3.up_proj.weight") in stored
    assert model.stored_name("model.layers.0.mlp.gate.weight") == "model.layers.0.block_sparse_moe.gate.weight"
    magnitude = PruneConfig(type="prune", method="magnitude", sparsity=0.5)
    _, _, pruned, details = _both(magnitude, checkpoint, tmp_path / "magnitude")
    assert "model.layers.1.block_sparse_moe.experts.0.w2.weight" in read_state(pruned.path)
    assert details["experts_changed_share"] == 1.0 and details["sparsity_pruned_layers"] == pytest.approx(0.5, 0.01)
    _, _, _, details = _both(Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only"), checkpoint,
                             tmp_path / "int8")
    assert details["experts_changed_share"] == 1.0
    _both(CastConfig(type="cast", dtype="bfloat16", rtol=0.2), checkpoint, tmp_path / "cast")
    make_adapter(checkpoint, TASK, tmp_path / "adapter", ["q_proj", "k_proj"])
    _both(MergeLoraConfig(type="merge_lora", adapters=[{"path": str(tmp_path / "adapter")}]), checkpoint,
          tmp_path / "merge")


def test_experts_stored_fused_are_refused_layer_by_layer(tmp_path):
    gpt_oss = sharded_copy(build_architecture(tmp_path / "built", "gpt_oss"), tmp_path / "sharded")
    with pytest.raises(UserError, match="stores them fused .*gate and up interleaved.*execution: whole"):
        LayerwiseModel(gpt_oss, TASK)


def test_gpt2_conv1d_layers_layer_by_layer(tiny_gpt2, tmp_path):
    """Magnitude pruning writes Conv1D's inputs x outputs back (transformers loads it), int8 the whole path's
    nn.Linear layout, and merge_lora adds the update transposed: c_attn (64 -> 192) would not even fit
    otherwise, and the square attn.c_proj would be silently wrong."""
    checkpoint = sharded_copy(tiny_gpt2, tmp_path / "sharded")
    _, _, pruned, details = _both(PruneConfig(type="prune", method="magnitude", sparsity=0.5), checkpoint,
                                  tmp_path / "magnitude")
    assert read_state(pruned.path)["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D's layout
    assert details["sparsity_pruned_layers"] == pytest.approx(0.5, abs=0.01)
    _both(Int8WeightOnlyConfig(type="quantize", scheme="int8-weight-only"), checkpoint, tmp_path / "int8")
    make_adapter(checkpoint, TASK, tmp_path / "adapter", ["c_attn", "c_proj"])
    _, _, _, details = _both(MergeLoraConfig(type="merge_lora", adapters=[{"path": str(tmp_path / "adapter")}]),
                             checkpoint, tmp_path / "merge")
    assert details["max_abs_diff"] <= 1e-4 and details["adapter_effect_max_abs"] > 0.01
