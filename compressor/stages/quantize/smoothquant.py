"""SmoothQuant (Xiao et al., 2023) on a torch decoder, before its weights and activations go to 8 bits.

Activations of language models carry a few input channels with outliers far larger than the rest, which a
per-token int8 scale cannot hold without crushing the other channels to zero. SmoothQuant moves part of that
range into the weights: for a norm whose output feeds linear layers, per input channel j,

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

(max|X_j| over the calibration tokens, max|W_j| over the column j of every layer reading the norm), the
norm's gain is divided by s and those columns multiplied by it. The float function is unchanged; the
activations' channels become flatter and the weights' a little less so. alpha is `smoothing_strength`.

Groups are found, not assumed: one calibration batch runs with hooks on every norm inside the blocks and every
linear layer, and a norm's group is the linear layers that read its output tensor itself (Llama's q, k, v
from input_layernorm and gate, up from post_attention_layernorm; GPT-2's c_attn from ln_1; Phi's q, k, v and
fc1 from its one shared norm; Falcon's fused query_key_value). A norm whose output feeds a mixture-of-experts
MLP (its router and each expert read copies of it) is left unsmoothed, and the record says so; a norm computing
x * (1 + w) (Gemma's) has its gain divided as (1 + w) / s - 1. After smoothing the same batch runs again and the last block's output is
compared with what it was before: a norm whose output also goes somewhere the groups do not see would change
the model, and the stage refuses instead of quantizing it.
"""

from __future__ import annotations

import logging

from ...anatomy import Anatomy, is_linear_experts
from ...data import torch_inputs
from ...errors import StageFailed, UserError

log = logging.getLogger(__name__)

MIN_SCALE = 1e-5
# Smoothing is exact in real arithmetic; float32 rounding moves the hidden states by far less than this share of
# their range.
FUNCTION_TOLERANCE = 1e-3


def _is_norm(module) -> bool:
    weight = getattr(module, "weight", None)
    return "Norm" in type(module).__name__ and weight is not None and weight.ndim == 1


def smoothing_groups(module, parts: Anatomy, feed: dict, task: str, what: str) -> tuple[list, list[str]]:
    """[(norm, [linears reading its output])] by full module name, found on one batch; and the norms left
    unsmoothed because a mixture of experts reads them. Refused when no norm inside the blocks feeds a linear."""
    import torch

    if parts.blocks is None:
        raise UserError(f"{what}: smoothing needs repeated transformer blocks, and this {parts.architecture} model "
                        "has none; set smoothing_strength: null")
    prefix = parts.blocks_name + "."
    norms = {name: m for name, m in module.named_modules() if name.startswith(prefix) and _is_norm(m)}
    moe = {name: m for name, m in module.named_modules()
           if name.startswith(prefix) and any(is_linear_experts(child) for child in m.children())}
    produced: dict[int, tuple[str, object]] = {}  # id(output) -> (norm, the tensor, kept alive for the id)
    readers: dict[str, list[str]] = {name: [] for name in norms}
    fed_experts: set[str] = set()

    def norm_hook(name):
        def hook(_m, _args, output):
            produced[id(output)] = (name, output)
        return hook

    def reader_hook(name, experts: bool):
        def hook(_m, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            seen = produced.get(id(x))
            if seen is not None and seen[1] is x:
                (fed_experts.add(seen[0]) if experts else readers[seen[0]].append(name))
        return hook
    handles = [m.register_forward_hook(norm_hook(n)) for n, m in norms.items()]
    handles += [parts.linears[n].register_forward_pre_hook(reader_hook(n, False), with_kwargs=True)
                for n in parts.linears if n.startswith(prefix)]
    handles += [m.register_forward_pre_hook(reader_hook(n, True), with_kwargs=True) for n, m in moe.items()]
    try:
        with torch.no_grad():
            _last_hidden(module, parts, feed, task)
    finally:
        for handle in handles:
            handle.remove()
    groups = [(norm, sorted(set(names))) for norm, names in readers.items() if names and norm not in fed_experts]
    if not groups:
        raise UserError(f"{what}: smoothing found no norm inside {parts.architecture}'s blocks whose output feeds "
                        "linear layers directly (its norms follow attention and the MLP, or it has none); set "
                        "smoothing_strength: null to quantize unsmoothed")
    return groups, sorted(fed_experts)


def _offset_gain(norm) -> bool:
    """Gemma's RMSNorm multiplies by (1 + weight), not weight."""
    return type(norm).__name__.startswith("Gemma") and getattr(norm, "weight", None) is not None


def divide_norm(norm, scales) -> None:
    """Divide a norm's output channels by `scales` in place: its gain (and bias), Gemma's (1 + w) gain as
    (1 + w) / s - 1. SmoothQuant and AWQ multiply the layers reading it by the same scales."""
    if _offset_gain(norm):
        norm.weight.copy_(((1 + norm.weight.float()) / scales - 1).to(norm.weight.dtype))
    else:
        norm.weight.div_(scales.to(norm.weight.dtype))
    if getattr(norm, "bias", None) is not None:
        norm.bias.div_(scales.to(norm.bias.dtype))


class _Reached(Exception):
    """Raised by the hook on the last block: what smoothing compares ends there."""


def _last_hidden(module, parts: Anatomy, feed, task: str):
    """The last transformer block's output on one batch. The run stops there: the head (a 49k-262k-word
    vocabulary) would cost a large share of the time and a logit tensor of hundreds of MB, and smoothing
    changes nothing after the blocks."""
    seen = []

    def hook(_module, _args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().float())
        raise _Reached
    handle = parts.blocks[len(parts.blocks) - 1].register_forward_hook(hook)
    try:
        inputs = torch_inputs(feed)
        module(**inputs, use_cache=False) if task == "text-generation" else module(**inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    return seen[0]


def smooth(module, parts: Anatomy, feeds: list[dict], task: str, alpha: float, what: str, progress=None) -> dict:
    """Smooth every group in place; returns the record (groups smoothed, MLPs left, largest scale)."""
    import torch

    groups, unsmoothed = smoothing_groups(module, parts, feeds[0], task, what)
    peaks = {norm: None for norm, _ in groups}

    def record(name):
        def hook(_module, _args, output):
            x = output[0] if isinstance(output, tuple) else output
            peak = x.detach().reshape(-1, x.shape[-1]).abs().amax(dim=0).float()
            peaks[name] = peak if peaks[name] is None else torch.maximum(peaks[name], peak)
        return hook
    handles = [module.get_submodule(norm).register_forward_hook(record(norm)) for norm, _ in groups]
    try:
        with torch.no_grad():
            for feed in (progress.track(feeds, len(feeds), f"{what}: smoothing statistics") if progress else feeds):
                inputs = torch_inputs(feed)
                module(**inputs, use_cache=False) if task == "text-generation" else module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        before = _last_hidden(module, parts, feeds[0], task)
        largest = 0.0
        for norm_name, balance in groups:
            if peaks[norm_name] is None:
                raise StageFailed(f"{what}: no calibration token reached {norm_name}")
            layers = [module.get_submodule(b) for b in balance]
            weight_peak = torch.stack([layer.weight.detach().abs().amax(dim=0).float() for layer in layers]).amax(0)
            scales = (peaks[norm_name].clamp(min=MIN_SCALE).pow(alpha)
                      / weight_peak.clamp(min=MIN_SCALE).pow(1 - alpha)).clamp(min=MIN_SCALE)
            divide_norm(module.get_submodule(norm_name), scales)
            for layer in layers:
                layer.weight.mul_(scales[None, :].to(layer.weight.dtype))
            largest = max(largest, float(scales.max()))
        after = _last_hidden(module, parts, feeds[0], task)
    change = float((after - before).abs().max()) / max(float(before.abs().max()), 1e-12)
    if not change <= FUNCTION_TOLERANCE:
        raise StageFailed(f"{what}: smoothing changed the float model's hidden states by {change:.2%} of their "
                          "range (it "
                          f"should change nothing): {parts.architecture}'s blocks are not laid out as the smoothing "
                          "groups assume; set smoothing_strength: null")
    return {"smoothing_strength": alpha, "smoothed_groups": len(groups), "largest_smoothing_scale": round(largest, 4),
            "smoothing_output_change": round(change, 8),
            **({"unsmoothed_expert_inputs": len(unsmoothed)} if unsmoothed else {})}
