"""Reusing quantized layers' float weights while a model is evaluated (not while it is timed).

compress's quantized torch layers (int4 / int8 weight-only, FP8 and W8A8 simulation, quantized embedding
tables and the heads tied to them) store codes and dequantize them on every call: that is what they cost
when deployed, and what the benchmark times. An evaluation calls them thousands of times on unchanged
weights (greedy decoding one token per call, lm-eval's requests), and on a CPU the dequantization then
dominates: three quarters of SmolLM2 int4 GPTQ's generation-fidelity time. Inside `reused_weights` each
layer dequantizes once, keeps the float tensor and returns it again: the same function of the same codes,
so every score is identical, only sooner. A memory budget bounds what is kept; past it, layers go on
dequantizing per call.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

# The float weights of a 1B-parameter model; beyond that the evaluation is slower, never larger.
DEFAULT_BUDGET_BYTES = 4 << 30


class WeightBudget:
    """The bytes of float weights all the models reusing weights at once may keep, shared between them."""

    def __init__(self, limit_bytes: int = DEFAULT_BUDGET_BYTES):
        self.limit_bytes, self.used_bytes = limit_bytes, 0
        self._counted = set()  # a tied head keeps its table's tensor: counted once

    def take(self, weight) -> bool:
        if weight.data_ptr() in self._counted:
            return True
        nbytes = weight.numel() * weight.element_size()
        if self.used_bytes + nbytes > self.limit_bytes:
            return False
        self.used_bytes += nbytes
        self._counted.add(weight.data_ptr())
        return True


def _remembering(method, budget: WeightBudget):
    kept = {}

    def dequantized_weight(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items())))
        if key in kept:
            return kept[key]
        weight = method(*args, **kwargs)
        if budget.take(weight):
            kept[key] = weight
        return weight

    return dequantized_weight


@contextmanager
def reused_weights(module, budget: WeightBudget | None = None) -> Iterator[int]:
    """Within the block, every submodule of `module` with a `dequantized_weight` method computes it once
    per dtype (up to the budget). Yields the number of layers that do. The instance attribute shadows the
    class's method, and is removed again on exit."""
    import torch

    budget = budget or WeightBudget()
    patched = [m for m in (module.modules() if isinstance(module, torch.nn.Module) else [])
               if callable(getattr(type(m), "dequantized_weight", None)) and "dequantized_weight" not in vars(m)]
    for layer in patched:
        layer.__dict__["dequantized_weight"] = _remembering(layer.dequantized_weight, budget)
    try:
        yield len(patched)
    finally:
        for layer in patched:
            layer.__dict__.pop("dequantized_weight", None)
