"""N:M and per-row sparsity masks: which weights a pruning score sends to zero.

A leaf: magnitude pruning, Wanda and SparseGPT all build on it, and it imports nothing of the pipeline."""

from __future__ import annotations

from .errors import UserError

# pattern -> (n kept, m per group), None for unstructured
PATTERNS = {"unstructured": None, "2:4": (2, 4), "4:8": (4, 8)}


def nm_mask(scores, n: int, m: int):
    """True where a weight is pruned: in each group of m consecutive inputs of a row, the m - n
    lowest scores."""
    import torch

    rows, cols = scores.shape
    if cols % m:
        raise UserError(f"prune: a layer with {cols} inputs cannot take a {n}:{m} pattern")
    groups = scores.reshape(rows, cols // m, m)
    lowest = torch.topk(groups, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def row_mask(scores, sparsity: float):
    """True for the `sparsity` share of lowest scores in each output row."""
    import torch

    count = int(scores.shape[1] * sparsity)
    lowest = torch.topk(scores, count, dim=1, largest=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, lowest, True)
