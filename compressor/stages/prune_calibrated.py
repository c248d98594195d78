"""Wanda and SparseGPT: pruning guided by calibration activations, one transformer block at a time,
so memory stays near one block's activations. Each block sees the outputs of the already pruned
blocks before it, as in both papers' sequential setting.

Wanda (Sun et al., 2023): score = |w_ij| * ||x_j||_2, compared within each output row.
SparseGPT (Frantar & Alistarh, 2023): prune column blocks using the inverse Hessian of the layer's
reconstruction loss (H = X^T X), and update the not-yet-pruned weights to compensate."""

from __future__ import annotations

import logging

from ..checkpoint import load_tokenizer
from ..data import calibration_batches, torch_inputs
from ..errors import UserError
from ..sparsity import PATTERNS, nm_mask, row_mask

log = logging.getLogger(__name__)


class _Captured(Exception):
    """Raised by the hook on the first block once it has recorded that block's inputs."""


def _blocks(module, layers: dict):
    """The repeated transformer blocks: the largest nn.ModuleList that holds targeted layers."""
    import torch

    lists = [(name, child) for name, child in module.named_modules() if isinstance(child, torch.nn.ModuleList)]
    holding = [(name, child) for name, child in lists if any(key.startswith(name + ".") for key in layers)]
    if not holding:
        raise UserError("prune: found no repeated transformer blocks (an nn.ModuleList) holding the targeted layers")
    name, blocks = max(holding, key=lambda item: len(item[1]))
    outside = [key for key in layers if not key.startswith(name + ".")]
    if outside:
        raise UserError(f"prune: {outside[:3]} lie outside the transformer blocks; add them to `ignore` or use "
                        "method magnitude")
    return name, blocks


def _block_inputs(module, blocks, feeds: list[dict], task: str):
    """Run the model up to the first block and keep, per batch, what that block was called with."""
    recorded = []

    def hook(_module, args, kwargs):
        recorded.append((args, kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for feed in feeds:
            inputs = torch_inputs(feed)
            try:
                if task == "text-generation":
                    module(**inputs, use_cache=False)
                else:
                    module(**inputs)
            except _Captured:
                pass
    finally:
        handle.remove()
    return recorded


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(args: tuple, kwargs: dict, hidden) -> tuple[tuple, dict]:
    """The same call with new hidden states, whether they were passed by position or by name."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def prune_with_calibration(module, layers: dict, config, artifact, ctx) -> None:
    tokenizer = load_tokenizer(artifact.path)
    feeds = calibration_batches(config.calibration, tokenizer)
    prefix, blocks = _blocks(module, layers)
    recorded = _block_inputs(module, blocks, feeds, artifact.task)
    group = PATTERNS[config.pattern]
    for index, block in enumerate(blocks):
        in_block = {name: layer for name, layer in layers.items() if name.startswith(f"{prefix}.{index}.")}
        stats = {name: _Statistics(layer.in_features, config.method) for name, layer in in_block.items()}
        handles = [layer.register_forward_hook(lambda _m, args, _o, s=stats[name]: s.add(args[0]))
                   for name, layer in in_block.items()]
        try:
            for args, kwargs in recorded:
                block(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for name, layer in in_block.items():
            if config.method == "wanda":
                _wanda(layer, stats[name], config.target_sparsity, group)
            else:
                _sparsegpt(layer, stats[name], config.target_sparsity, group, config.block_size, config.dampening)
        # the next block sees this block's outputs with its weights pruned
        recorded = [_with_hidden(args, kwargs, _hidden(block(*args, **kwargs))) for args, kwargs in recorded]
        log.info("pruned block %d/%d", index + 1, len(blocks))
    ctx.details["calibration_samples"] = config.calibration.samples


class _Statistics:
    """What a method needs from a layer's inputs: squared column norms (Wanda) or X^T X (SparseGPT)."""

    def __init__(self, columns: int, method: str):
        import torch

        self.method, self.rows = method, 0
        self.value = torch.zeros(columns, dtype=torch.float64) if method == "wanda" else \
            torch.zeros(columns, columns, dtype=torch.float64)

    def add(self, x) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.rows += x.shape[0]
        if self.method == "wanda":
            self.value += (x * x).sum(0)
        else:
            self.value += x.T @ x


def _wanda(layer, stats: _Statistics, sparsity: float, group) -> None:
    scores = layer.weight.abs().double() * stats.value.sqrt()[None, :]
    mask = nm_mask(scores, *group) if group else row_mask(scores, sparsity)
    layer.weight[mask] = 0


def _sparsegpt(layer, stats: _Statistics, sparsity: float, group, block_size: int, dampening: float) -> None:
    import torch

    # statistics are summed in float64; the pruning loop runs in float32, as the reference
    # implementation does: several times faster than float64; on SmolLM2 perplexity moved by -0.3%
    # at 50% and +5% at 2:4 (the greedy column order amplifies rounding; docs/BENCHMARKS.md)
    weight = layer.weight.detach().float().clone()
    hessian = (stats.value / max(stats.rows, 1)).float()
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
    layer.weight.copy_(weight.to(layer.weight.dtype))
