"""Wanda and SparseGPT: pruning guided by calibration activations, one transformer block at a time,
so memory stays near one block's activations. Each block sees the outputs of the already pruned
blocks before it, as in both papers' sequential setting.

Wanda (Sun et al., 2023): score = |w_ij| * ||x_j||_2, compared within each output row.
SparseGPT (Frantar & Alistarh, 2023): prune column blocks using the inverse Hessian of the layer's
reconstruction loss (H = X^T X), and update the not-yet-pruned weights to compensate."""

from __future__ import annotations

import logging
from typing import Optional

from ...checkpoint import load_tokenizer
from ...data import calibration_batches
from ...errors import UserError
from ...sparsity import PATTERNS, nm_mask, row_mask
from ..blockwise.sequential import LayerInputs, compress_sequentially, split_by_blocks, stacked_rows

log = logging.getLogger(__name__)


def calibrated_layer_pruner(config):
    """(statistic the method needs, function pruning one layer from it) for Wanda or SparseGPT."""
    group = PATTERNS[config.pattern]

    def prune_layer(_name, layer, stats: Optional[LayerInputs]) -> None:
        if stats is None:  # no calibration token reached this layer (an expert never routed to): magnitude
            scores = layer.weight.abs()
            layer.weight[nm_mask(scores, *group) if group else row_mask(scores, config.target_sparsity)] = 0
        elif config.method == "wanda":
            _wanda(layer, stats, config.target_sparsity, group)
        else:
            _sparsegpt(layer, stats, config.target_sparsity, group, config.block_size, config.dampening)

    return ("norms" if config.method == "wanda" else "hessian"), prune_layer


def calibrated_layers_pruner(config):
    """For SparseGPT with an N:M pattern, `prune_together(named, stats)`: layers reading one input pruned in
    one column loop, their rows stacked (each row's mask and updates depend only on the row and the shared
    Hessian). None otherwise: Wanda has no loop to share, and unstructured SparseGPT chooses its mask over
    each layer's whole block of columns, which stacking would change."""
    group = PATTERNS[config.pattern]
    if config.method != "sparsegpt" or not group:
        return None

    def prune_together(named: list, stats: LayerInputs) -> None:
        stacked, bounds = stacked_rows(named)
        pruned = sparsegpt_weights(stacked, stats, config.target_sparsity, group, config.block_size,
                                   config.dampening)
        for (_, layer), rows in zip(named, bounds):
            layer.weight.copy_(pruned[rows].to(layer.weight.dtype))
    return prune_together


def prune_with_calibration(module, layers: dict, config, artifact, ctx) -> None:
    """Prune the layers inside the transformer blocks from their calibration inputs, block by block; a
    layer outside them (the head, when `ignore` lets it in) by magnitude, as no block's inputs reach it."""
    feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path))
    kind, prune_layer = calibrated_layer_pruner(config)
    inside, outside = split_by_blocks(module, layers)
    compress_sequentially(module, inside, feeds, artifact.task, kind, "prune", prune_layer,
                          spill_dir=ctx.workdir / "activations", details=ctx.details,
                          all_experts=config.calibration.all_experts,
                          compress_together=calibrated_layers_pruner(config))
    for name, layer in outside.items():
        prune_layer(name, layer, None)
    if outside:
        ctx.details["pruned_by_magnitude_outside_blocks"] = list(outside)
    ctx.details["calibration_samples"] = config.calibration.samples


def _wanda(layer, stats: LayerInputs, sparsity: float, group) -> None:
    scores = layer.weight.abs().double() * stats.value.sqrt()[None, :]
    mask = nm_mask(scores, *group) if group else row_mask(scores, sparsity)
    layer.weight[mask] = 0


def _sparsegpt(layer, stats: LayerInputs, sparsity: float, group, block_size: int, dampening: float) -> None:
    pruned = sparsegpt_weights(layer.weight.detach().float(), stats, sparsity, group, block_size, dampening)
    layer.weight.copy_(pruned.to(layer.weight.dtype))


def sparsegpt_weights(weight, stats: LayerInputs, sparsity: float, group, block_size: int, dampening: float):
    """SparseGPT (Frantar and Alistarh, 2023) of one weight (rows = outputs): the pruned weight."""
    import torch

    # statistics are summed in float64; the pruning loop runs in float32, as the reference
    # implementation does: several times faster than float64; on SmolLM2 perplexity moved by -0.3%
    # at 50% and +5% at 2:4 (the greedy column order amplifies rounding; docs/BENCHMARKS.md)
    weight = weight.clone()
    hessian = stats.hessian()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hessian += torch.eye(len(hessian), dtype=hessian.dtype) * dampening * torch.mean(torch.diag(hessian))
    try:
        inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    except RuntimeError as exc:  # not positive definite even after dampening
        raise UserError(f"prune sparsegpt: the Hessian of a layer is singular ({exc}); raise `dampening`") from None
    columns = weight.shape[1]
    n, m = group if group else (None, None)
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = weight[:, start:end].clone()
        inv = inverse[start:end, start:end]
        errors = torch.zeros_like(block)
        if group is None:
            scores = block ** 2 / torch.diag(inv)[None, :] ** 2
            mask = scores <= torch.sort(scores.flatten()).values[int(scores.numel() * sparsity)] \
                if int(scores.numel() * sparsity) < scores.numel() else torch.ones_like(block, dtype=torch.bool)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(end - start):
            if group is not None and i % m == 0:
                scores = block[:, i:i + m] ** 2 / torch.diag(inv)[i:i + m][None, :] ** 2
                lowest = torch.topk(scores, m - n, dim=1, largest=False).indices
                mask[:, i:i + m].scatter_(1, lowest, True)
            column = block[:, i]
            kept = column.clone()
            kept[mask[:, i]] = 0
            error = (column - kept) / inv[i, i]
            block[:, i:] -= error[:, None] @ inv[i, i:][None, :]
            block[:, i] = kept
            errors[:, i] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ inverse[start:end, end:]
    return weight
