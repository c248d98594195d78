"""Quantized torch layers dequantize once while a model is evaluated, give the same outputs, and go back to
dequantizing per call (what the benchmark times) afterwards."""

from __future__ import annotations

import torch

from compressor.checkpoint import load_torch_model
from compressor.weight_reuse import WeightBudget, reused_weights

from .test_embeddings import IDS, quantize, tied_llama  # noqa: F401  (the fixture)


def _count_dequantizations(model) -> dict:
    calls = {}
    for name, layer in model.named_modules():
        method = getattr(type(layer), "dequantized_weight", None)
        if callable(method):
            def counting(self, *args, _name=name, _method=method, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _method(self, *args, **kwargs)
            layer.__class__ = type(type(layer).__name__, (type(layer),), {"dequantized_weight": counting})
    return calls


def test_int4_layers_and_the_tied_head_dequantize_once_with_identical_logits(tied_llama, tmp_path):  # noqa: F811
    result, _ = quantize(tied_llama, {"scheme": "int4-weight-only", "algorithm": "rtn", "block_size": 32}, tmp_path)
    model = load_torch_model(result).eval()
    calls = _count_dequantizations(model)
    with torch.no_grad():
        per_call = model(IDS).logits
        assert calls and all(count == 1 for count in calls.values())
        calls.clear()
        with reused_weights(model) as layers:
            assert layers == len([m for m in model.modules() if hasattr(type(m), "dequantized_weight")])
            first, second = model(IDS).logits, model(IDS).logits
        reused = dict(calls)
        calls.clear()
        after = model(IDS).logits
    assert torch.equal(first, per_call) and torch.equal(second, per_call) and torch.equal(after, per_call)
    # two forward passes, one dequantization per layer; the head tied to the int8 table asks the table
    assert reused and all(count == 1 for count in reused.values()), reused
    assert calls and all(count == 1 for count in calls.values())  # per call again after the block
    assert not any("dequantized_weight" in vars(m) for m in model.modules())


def test_past_the_budget_layers_go_on_dequantizing_per_call(tied_llama, tmp_path):  # noqa: F811
    result, _ = quantize(tied_llama, {"scheme": "int4-weight-only", "algorithm": "rtn", "block_size": 32}, tmp_path)
    model = load_torch_model(result).eval()
    calls = _count_dequantizations(model)
    budget = WeightBudget(limit_bytes=0)
    with torch.no_grad(), reused_weights(model, budget):
        model(IDS)
        model(IDS)
    assert calls and all(count == 2 for count in calls.values()) and budget.used_bytes == 0
