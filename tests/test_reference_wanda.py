"""Wanda against an independent reference of the paper's rule (Sun et al., 2023): score_ij = |W_ij| * ||X_j||_2,
the L2 norm of input feature j over every calibration token, and each output row keeps its top (1 - sparsity)
share of scores. The reference below recomputes the norms in float64 from raw recorded inputs; compress
accumulates squared norms per batch in float32, so masks may differ only where two scores of a row are equal
to rounding (ties at the row's threshold)."""

import pytest
import torch

from compressor.artifacts import TorchModel
from compressor.checkpoint import load_tokenizer, load_torch_model
from compressor.data import CalibrationConfig, calibration_batches, torch_inputs
from compressor.stages.prune.prune_calibrated import _wanda
from compressor.stages.blockwise.sequential import LayerInputs

from .test_prune import prune

SPARSITY = 0.5
TIE_RTOL = 1e-5  # float32 accumulation of the norms against float64: scores this close may swap places


def reference_wanda_mask(weight, inputs, sparsity):
    """True where the paper's Wanda prunes: per output row, the `sparsity` share of lowest |W| * ||X_j||_2."""
    tokens = inputs.reshape(-1, inputs.shape[-1]).double()
    norms = tokens.pow(2).sum(0).sqrt()  # over all calibration tokens, one per input feature
    scores = weight.double().abs() * norms[None, :]
    pruned_per_row = int(weight.shape[1] * sparsity)
    order = scores.argsort(dim=1)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order[:, :pruned_per_row], True)
    # the score at the boundary of each row: the largest pruned and the smallest kept
    boundary = (scores.gather(1, order[:, pruned_per_row - 1:pruned_per_row]),
                scores.gather(1, order[:, pruned_per_row:pruned_per_row + 1]))
    return mask, scores, boundary


def assert_masks_agree(name, actual, weight, inputs, sparsity):
    expected, scores, (last_pruned, first_kept) = reference_wanda_mask(weight, inputs, sparsity)
    tolerance = TIE_RTOL * last_pruned
    # a disagreement is allowed only in a row whose boundary is a tie, and only for the tied scores
    tied_row = first_kept - last_pruned <= tolerance
    tied_entry = tied_row & ((scores - last_pruned).abs() <= 2 * tolerance)
    differ = actual != expected
    wrong = int((differ & ~tied_entry).sum())
    assert wrong == 0, f"{name}: {wrong} of {differ.numel()} mask entries differ from the reference"
    per_row = actual.sum(1)
    assert bool((per_row == int(weight.shape[1] * sparsity)).all()), f"{name}: rows prune {per_row.unique().tolist()}"


def test_wanda_kernel_matches_reference_on_one_layer():
    """Input features whose norms span three orders of magnitude make Wanda's mask far from magnitude's,
    so the norm's exponent (L2 vs L1, norm vs squared norm) and the comparison group both show."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False)
    feature_scale = torch.logspace(-1.5, 1.5, 32)[torch.randperm(32)]
    inputs = torch.randn(3, 40, 32) * feature_scale  # three calibration batches of 40 tokens
    stats = LayerInputs(32, "norms")
    for batch in inputs:
        stats.add(batch)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        _wanda(layer, stats, SPARSITY, None)
    actual = layer.weight == 0
    assert_masks_agree("linear", actual, original, inputs, SPARSITY)
    assert torch.equal(layer.weight[~actual], original[~actual])  # the kept weights are untouched
    magnitude, _, _ = reference_wanda_mask(original, torch.ones(1, 32), SPARSITY)
    assert (actual != magnitude).float().mean() > 0.2  # the activations really moved the mask


@pytest.fixture(scope="module")
def calibration(text_file):
    return {"data": {"path": str(text_file), "segment": "window"}, "samples": 8, "max_length": 32, "batch_size": 4}


def _record_inputs(module, layers, feeds):
    """name -> every token each layer saw (inputs concatenated over the batches), from forward hooks."""
    seen = {name: [] for name in layers}
    handles = [layer.register_forward_hook(lambda _m, args, _o, n=name: seen[n].append(args[0].detach().clone()))
               for name, layer in layers.items()]
    try:
        with torch.inference_mode():
            for feed in feeds:
                module(**torch_inputs(feed), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]) for name, xs in seen.items()}


def test_wanda_on_a_model_matches_reference_block_by_block(tiny_llama, calibration, tmp_path):
    """Every linear of both blocks of a tiny Llama against the reference, in the paper's sequential setting:
    block 1's calibration inputs are what the model gives with block 0 already pruned (and block 1 not yet)."""
    result, _ = prune(tiny_llama, "text-generation", tmp_path, method="wanda", sparsity=SPARSITY,
                      calibration=calibration)
    pruned = result.module
    original = load_torch_model(TorchModel(tiny_llama, "text-generation"))
    feeds = calibration_batches(CalibrationConfig(**calibration), load_tokenizer(tiny_llama))
    names = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    for index in range(len(original.model.layers)):
        # the original model with compress's pruned blocks before `index`: what block `index` saw
        staged = load_torch_model(TorchModel(tiny_llama, "text-generation"))
        for earlier in range(index):
            staged.model.layers[earlier].load_state_dict(pruned.model.layers[earlier].state_dict())
        layers = {name: staged.model.layers[index].get_submodule(name) for name in names}
        inputs = _record_inputs(staged, layers, feeds)
        for name in names:
            weight = original.model.layers[index].get_submodule(name).weight.detach()
            actual = pruned.model.layers[index].get_submodule(name).weight.detach() == 0
            assert_masks_agree(f"layers.{index}.{name}", actual, weight, inputs[name], SPARSITY)
