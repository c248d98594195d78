"""Layer by layer beyond dense Llamas. Mixture-of-experts models: the skeleton opens its fused experts one
nn.Linear each and reads them from the checkpoint's per-expert tensors (Mixtral's under their own names), so
every layer-by-layer stage compresses the experts block by block and writes what the whole-model path writes,
bit for bit; a checkpoint storing its experts fused (GPT-OSS) is split on reading and fused back on
writing. GPT-2: its Conv1D
layers (weights stored inputs x outputs) are opened as nn.Linear and transposed on reading and writing."""

import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.shards import read_state
from compressor.stages.cast.cast import CastConfig
from compressor.stages.lora.merge_lora import MergeLoraConfig
from compressor.stages.prune.prune import PruneConfig
from compressor.stages.quantize.weight_only import Int8WeightOnlyConfig
from compressor.streamed import LayerwiseModel

from .architectures import build_architecture
from .test_layerwise import IDS, TASK, sharded_copy
from .test_merge_lora import make_adapter
from .test_stages import run_stage


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


def test_mixtral_under_its_checkpoint_names_through_every_streaming_stage(tmp_path):
    """Mixtral's checkpoints name the router and experts block_sparse_moe.gate / experts.N.w1-w3; the skeleton
    reads them under its own names, and a float result is written back under the checkpoint's (transformers
    loads it); int8, cast and merge_lora match the whole path too."""
    checkpoint = sharded_copy(build_architecture(tmp_path / "built", "mixtral"), tmp_path / "sharded")
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


def test_experts_stored_fused_are_split_on_reading_and_fused_on_writing(tmp_path):
    """GPT-OSS stores each block's experts fused (gate and up interleaved, biases): the skeleton splits them
    into experts when a block is read, and a float result (pruning, cast) fuses them back; equal to the whole
    path's files. (The support matrix runs GPTQ and SparseGPT layer by layer on it against the whole path.)"""
    gpt_oss = sharded_copy(build_architecture(tmp_path / "built", "gpt_oss"), tmp_path / "sharded")
    assert LayerwiseModel(gpt_oss, TASK).fused_storage == {f"model.layers.{i}.mlp.experts": "interleaved"
                                                           for i in range(2)}
    _, _, pruned, details = _both(PruneConfig(type="prune", method="magnitude", sparsity=0.5), gpt_oss,
                                  tmp_path / "magnitude")
    assert "model.layers.0.mlp.experts.gate_up_proj" in read_state(pruned.path)  # fused, as stored
    assert details["experts_changed_share"] == 1.0 and details["sparsity_pruned_layers"] == pytest.approx(0.5, 0.01)
    _both(CastConfig(type="cast", dtype="bfloat16", rtol=0.2), gpt_oss, tmp_path / "cast")


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
