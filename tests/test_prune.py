"""Unstructured pruning: the zeros are where the method says, survive saving and export, and the
reported sparsity is what the files hold."""

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_torch_model
from compressor.stages import REGISTRY
from compressor.stages.prune.prune import PruneConfig
from compressor.stages.prune.prune_calibrated import _sparsegpt, _wanda
from compressor.stages.blockwise.sequential import LayerInputs

from .test_stages import run_stage


def prune(model, task, tmp_path, **options):
    return run_stage(PruneConfig(type="prune", **options), TorchModel(model, task), tmp_path, task)


def zero_share(tensor) -> float:
    return float((tensor == 0).float().mean())


@pytest.fixture(scope="module")
def calibration(text_file):
    return {"data": {"path": str(text_file), "segment": "window"}, "samples": 8, "max_length": 32, "batch_size": 4}


def test_magnitude_per_layer_reloads_with_its_zeros(tiny_llama, tmp_path):
    result, details = prune(tiny_llama, "text-generation", tmp_path, method="magnitude", sparsity=0.5)
    assert details["pruned_layers"] == 2 * 7
    assert all(abs(s - 0.5) < 0.01 for s in details["sparsity_by_layer"].values())
    reloaded = load_torch_model(TorchModel(result.path, "text-generation"))  # from the saved files
    for name, module in reloaded.named_modules():
        if name in details["sparsity_by_layer"]:
            assert zero_share(module.weight) == pytest.approx(details["sparsity_by_layer"][name], abs=1e-4)
    original = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    # embeddings and lm_head (tied) are ignored by default
    assert torch.equal(reloaded.model.embed_tokens.weight, original.model.embed_tokens.weight)
    ids = torch.tensor([[2, 40, 41, 42, 43]])
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, result.module(ids).logits)
    kept = result.module.model.layers[0].mlp.up_proj.weight
    assert kept.abs().min() == 0
    smallest_kept = kept[kept != 0].abs().min()
    dropped = original.model.layers[0].mlp.up_proj.weight[kept == 0].abs().max()
    assert dropped <= smallest_kept  # magnitude: every dropped weight was no larger than any kept one


def test_global_magnitude_hits_the_overall_target_not_each_layer(tiny_llama, tmp_path):
    _, details = prune(tiny_llama, "text-generation", tmp_path, method="magnitude", sparsity=0.5, scope="global")
    assert details["sparsity_pruned_layers"] == pytest.approx(0.5, abs=0.005)
    assert max(details["sparsity_by_layer"].values()) - min(details["sparsity_by_layer"].values()) > 0.02


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_patterns(tiny_llama, calibration, tmp_path, pattern, n, m):
    result, details = prune(tiny_llama, "text-generation", tmp_path, method="wanda", pattern=pattern,
                            calibration=calibration)
    assert details["target_sparsity"] == 0.5 and details["calibration_samples"] == 8
    for name, module in result.module.named_modules():
        if name in details["sparsity_by_layer"]:
            groups = module.weight.reshape(module.weight.shape[0], -1, m)
            assert torch.all((groups == 0).sum(-1) >= m - n), name


def test_wanda_uses_activations(tiny_llama, calibration, tmp_path):
    magnitude, _ = prune(tiny_llama, "text-generation", tmp_path / "m", method="magnitude", sparsity=0.5)
    wanda, details = prune(tiny_llama, "text-generation", tmp_path / "w", method="wanda", sparsity=0.5,
                           calibration=calibration)
    assert all(abs(s - 0.5) < 0.01 for s in details["sparsity_by_layer"].values())
    a = magnitude.module.model.layers[1].self_attn.q_proj.weight == 0
    b = wanda.module.model.layers[1].self_attn.q_proj.weight == 0
    assert (a != b).float().mean() > 0.05  # a different mask, chosen by activation norms


def test_sparsegpt_reconstructs_better_than_wanda():
    """On one layer with correlated inputs, SparseGPT's weight update must beat Wanda's mask alone."""
    torch.manual_seed(0)
    mixing = torch.randn(64, 64) * 0.3 + torch.eye(64)
    inputs = torch.randn(512, 64) @ mixing
    layer = torch.nn.Linear(64, 32, bias=False)
    reference = inputs @ layer.weight.T
    errors = {}
    for method in ("wanda", "sparsegpt"):
        copy = torch.nn.Linear(64, 32, bias=False)
        copy.weight.data = layer.weight.data.clone()
        stats = LayerInputs(64, "norms" if method == "wanda" else "hessian")
        stats.add(inputs)
        with torch.no_grad():
            if method == "wanda":
                _wanda(copy, stats, 0.5, None)
            else:
                _sparsegpt(copy, stats, 0.5, None, block_size=16, dampening=0.01)
        assert zero_share(copy.weight) == pytest.approx(0.5, abs=0.02)
        errors[method] = float(((inputs @ copy.weight.T - reference) ** 2).mean() / (reference ** 2).mean())
    assert errors["sparsegpt"] < 0.8 * errors["wanda"], errors


def _sharing_layers(columns=64, rows=(64, 32, 32)):
    """Layers reading one input (as q, k and v do) and that input's statistics."""
    torch.manual_seed(1)
    inputs = torch.randn(512, columns) @ (torch.randn(columns, columns) * 0.3 + torch.eye(columns))
    stats = LayerInputs(columns, "hessian")
    stats.add(inputs)
    return [torch.nn.Linear(columns, n, bias=False) for n in rows], stats


def test_sparsegpt_2_4_of_layers_sharing_an_input_prunes_each_as_it_would_alone():
    from compressor.stages.prune.prune_calibrated import calibrated_layers_pruner

    layers, stats = _sharing_layers()
    alone = [torch.nn.Linear(64, layer.out_features, bias=False) for layer in layers]
    config = PruneConfig(type="prune", method="sparsegpt", pattern="2:4", block_size=16,
                         calibration={"data": {"path": "x"}})
    with torch.no_grad():
        for copy, layer in zip(alone, layers):
            copy.weight.copy_(layer.weight)
            _sparsegpt(copy, stats, 0.5, (2, 4), block_size=16, dampening=config.dampening)
        calibrated_layers_pruner(config)([(str(i), layer) for i, layer in enumerate(layers)], stats)
    for copy, layer in zip(alone, layers):
        assert torch.equal(layer.weight, copy.weight) and zero_share(layer.weight) == 0.5
    # unstructured SparseGPT picks its mask over each layer's columns, Wanda has no loop: one layer at a time
    assert calibrated_layers_pruner(config.model_copy(update={"pattern": "unstructured"})) is None
    assert calibrated_layers_pruner(config.model_copy(update={"method": "wanda"})) is None


def test_sparsegpt_2_4_on_a_model(tiny_llama, calibration, tmp_path):
    result, details = prune(tiny_llama, "text-generation", tmp_path, method="sparsegpt", pattern="2:4",
                            calibration=calibration, block_size=16)
    for name, module in result.module.named_modules():
        if name in details["sparsity_by_layer"]:
            assert torch.all((module.weight.reshape(module.weight.shape[0], -1, 4) == 0).sum(-1) >= 2), name


def test_zeros_survive_onnx_export(tiny_classifier, tmp_path):
    import onnx
    from onnx import numpy_helper

    from compressor.stages.export.export_onnx import ExportOnnxConfig

    pruned, details = prune(tiny_classifier, "text-classification", tmp_path / "p", method="magnitude", sparsity=0.5)
    exported, _ = run_stage(ExportOnnxConfig(type="export_onnx"), pruned, tmp_path / "e", "text-classification")
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(exported.path)).graph.initializer
               if len(i.dims) == 2 and i.dims[0] == i.dims[1] == 64]  # q, k, v, o and the (ignored) pooler
    halved = [w for w in weights if abs(np.mean(w == 0) - 0.5) < 0.01]
    assert len(halved) == 2 * 4 and len(weights) == 2 * 4 + 1


def test_prune_config_errors():
    stage = REGISTRY["prune"]
    assert "needs `calibration:`" in stage.check(PruneConfig(type="prune", method="wanda"), "torch", "text-generation")
    global_wanda = PruneConfig(type="prune", method="wanda", scope="global", calibration={"data": {"path": "x"}})
    assert "scope: global applies to method magnitude" in stage.check(global_wanda, "torch", "text-generation")
    with pytest.raises(ValidationError, match="pattern 2:4 means sparsity 0.5"):
        PruneConfig(type="prune", method="magnitude", pattern="2:4", sparsity=0.6)
    assert stage.accepts == ("torch",)
