"""AWQ, activation-aware weight quantization (Lin et al., 2023), for decoder blocks of the mainstream layouts.

Input channels that carry large activations matter most to a layer's output, so before rounding,
AWQ scales those weight columns up by s (and the layer's input down by 1/s, folded into the norm or
linear layer that produces it): the same float function, but the important columns get finer steps
on the 4-bit grid. Per group of layers that read the same input, s = mean|x|^r / mean|w|^(1-r) is
searched over r in [0, 1] to minimise the squared error of the enclosing module's output with
round-to-nearest weights on the calibration data.

Groups (layers that share an input, the module whose output is compared, the layer that absorbs 1/s):
  q, k, v projections <- the norm before attention (compared at the attention's output; fused qkv_proj,
                         query_key_value and c_attn, and DeepSeek's q_a / kv_a projections, alike)
  o projection        <- v projection             (only when their widths match: no grouped KV heads)
  gate, up            <- the norm before the MLP  (compared at the MLP's output; Gemma 2 / 3: the
                         pre_feedforward_layernorm, since their post_attention_layernorm norms the
                         attention's output; fc1 / dense_h_to_4h / c_fc where there is no gate)
  down projection     <- up projection            (compared at down_proj's output; OPT's fc2 <- fc1 when
                         ReLU lies between, which commutes with a positive scale)
Parallel blocks (Phi, Falcon), whose one norm feeds attention and MLP, balance all their readers together,
compared at the block's output. Post-norm blocks (OLMo 2) have no norm before attention or MLP: only the
linear -> linear groups apply there. Mixture-of-experts MLPs: _moe_mappings.
A norm's gain (and bias) is divided by s (Gemma's x * (1 + w) as (1 + w) / s - 1, smoothquant.divide_norm).
The walk is block by block, each block calibrated on the outputs of the blocks already quantized, and a
block whose float function moved after balancing (a reader of a scaled input left out) is refused."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Optional

from ...anatomy import MIN_EXPERT_TOKENS, CalibratingExperts, has_submodule, is_linear_experts
from ...errors import StageFailed, UserError
from .int4_gptq import dequantize, rtn_quantize
from .smoothquant import divide_norm
from ..blockwise.activations import BlockInputs, block_inputs_store
from ..blockwise.sequential import block_inputs, find_blocks, hidden_of

log = logging.getLogger(__name__)

GRID = 20  # ratios r = 0, 1/19, ..., 1


@dataclass
class Mapping:
    smooth: str        # module producing the shared input (an RMSNorm or a Linear), relative to the block
    balance: tuple     # Linear layers reading that input
    parent: str        # module whose output is compared while searching
    scaled_only: tuple = ()  # other readers of that input, kept float: multiplied by s so they compute as before


# The groups, per kind of block, as (module producing the input, layers reading it, module compared). For each
# role the first entry whose modules all exist in the block is taken.
# A norm feeding both attention and MLP (Phi, Falcon: parallel blocks), compared at the block's output ("").
PARALLEL_INPUT = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"), ""),
    Mapping("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h"), ""),
)
ATTENTION_INPUT = (
    Mapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    Mapping("input_layernorm", ("self_attn.qkv_proj",), "self_attn"),                                # Phi-3
    Mapping("input_layernorm", ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"), "self_attn"),  # DeepSeek MLA
    Mapping("input_layernorm", ("attention.query_key_value",), "attention"),                         # GPT-NeoX
    Mapping("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),  # OPT
    Mapping("ln_1", ("attn.c_attn",), "attn"),                                                       # GPT-2
)
MLP_INPUT = (  # only in blocks whose attention reads a norm: post-norm blocks (OLMo 2) norm the outputs instead
    Mapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    Mapping("post_attention_layernorm", ("mlp.gate_up_proj",), "mlp"),                               # Phi-3
    Mapping("post_attention_layernorm", ("mlp.dense_h_to_4h",), "mlp"),                              # GPT-NeoX
    Mapping("final_layer_norm", ("fc1",), "fc1"),                                                    # OPT
    Mapping("ln_2", ("mlp.c_fc",), "mlp"),                                                           # GPT-2
)
INNER = (  # a linear layer absorbs 1/s for the one after it
    Mapping("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    Mapping("self_attn.v_proj", ("self_attn.out_proj",), "self_attn.out_proj"),                      # OPT
    Mapping("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),                                     # act(gate) * up
    Mapping("fc1", ("fc2",), "fc2"),  # OPT, only with ReLU between (relu(x / s) = relu(x) / s)
)


def _experts_of(block) -> Optional[str]:
    """The name, in the block, of its linearized routed experts (anatomy.LinearExperts), if it has them."""
    return next((name for name, child in block.named_modules() if is_linear_experts(child)), None)


def _moe_mappings(block, norm: str, experts: str) -> list[Mapping]:
    """A mixture-of-experts MLP: every expert's gate and up projections (and a shared expert's) read the
    norm's output, compared at the MoE block's output; the router reads it too and stays float, so it is
    scaled with them (its logits, and so the routing, unchanged). Then each expert's down projection
    against its own up projection."""
    moe = experts.rpartition(".")[0]
    count = len(block.get_submodule(experts))
    readers = [f"{experts}.{i}.{p}" for i in range(count) for p in ("gate_proj", "up_proj")]
    shared = [f"{moe}.{name}" for name in ("shared_expert", "shared_experts")
              if has_submodule(block, f"{moe}.{name}.up_proj")]
    readers += [f"{s}.{p}" for s in shared for p in ("gate_proj", "up_proj")]
    float_readers = tuple(f"{moe}.{name}" for name in ("gate", "router", "shared_expert_gate")
                          if has_submodule(block, f"{moe}.{name}")
                          and getattr(block.get_submodule(f"{moe}.{name}"), "weight", None) is not None)
    mappings = [Mapping(norm, tuple(readers), moe, float_readers)]
    # GPT-OSS's experts gate with (clamp(up) + 1): not proportional to up, so up cannot absorb 1/s for down
    owners = [f"{experts}.{i}" for i in range(count)] \
        if getattr(block.get_submodule(experts), "layout", "concatenated") == "concatenated" else []
    for owner in owners + shared:
        mappings.append(Mapping(f"{owner}.up_proj", (f"{owner}.down_proj",), f"{owner}.down_proj"))
    return mappings


def _first(block, mappings) -> Optional[Mapping]:
    return next((m for m in mappings if all(has_submodule(block, n) for n in (m.smooth,) + m.balance)), None)


def block_mappings(block) -> list[Mapping]:
    """The groups AWQ can balance in this block (a module docstring lists them); a linear -> linear group only
    when widths match (no grouped KV heads for v -> o). Refused when none applies."""
    experts = _experts_of(block)
    parallel = _first(block, PARALLEL_INPUT)
    attention = None if parallel else _first(block, ATTENTION_INPUT)
    candidates = [m for m in (parallel, attention) if m is not None]
    if attention is not None and experts:
        candidates += _moe_mappings(block, "post_attention_layernorm", experts)
    elif attention is not None:
        mlp = _first(block, MLP_INPUT)
        candidates += [mlp] if mlp is not None else []
    for inner in INNER:
        relu = type(getattr(block, "activation_fn", None)).__name__ == "ReLU"
        if _first(block, (inner,)) is not None and (inner.smooth != "fc1" or relu):
            candidates.append(inner)
    usable = []
    for mapping in candidates:
        if mapping.smooth == "post_attention_layernorm" and has_submodule(block, "pre_feedforward_layernorm"):
            # Gemma 2 / 3 norm the attention's output with post_attention_layernorm and the MLP's input with
            # pre_feedforward_layernorm: the gate and up projections read the latter
            mapping = replace(mapping, smooth="pre_feedforward_layernorm")
        smooth = block.get_submodule(mapping.smooth)
        width = smooth.out_features if hasattr(smooth, "out_features") else smooth.weight.shape[0]
        if all(block.get_submodule(b).in_features == width for b in mapping.balance):
            usable.append(mapping)
    if not usable:
        raise UserError(f"quantize int4 awq: found no group of layers to balance in {type(block).__name__} (it knows "
                        "a norm before attention and before the MLP, v -> o and up -> down, in the layouts of Llama, "
                        "Phi, Phi-3, Falcon, GPT-NeoX, OPT, GPT-2 and DeepSeek); use algorithm gptq")
    return usable


def weight_means(layers, group_size: int):
    """Per input channel: mean over output rows (and layers) of |w| normalised by its group's max."""
    import torch

    total, rows = 0, 0
    for layer in layers:
        w = layer.weight.detach().float().abs()
        n, k = w.shape
        padded = torch.nn.functional.pad(w, (0, -k % group_size)).reshape(n, -1, group_size)
        normalised = (padded / (padded.amax(dim=2, keepdim=True) + 1e-6)).reshape(n, -1)[:, :k]
        total = total + normalised.sum(0)
        rows += n
    return total / rows


def _calls(module, name: str, runs) -> list:
    """Record what the module `name` is called with during `runs()`."""
    recorded = []
    handle = module.get_submodule(name).register_forward_pre_hook(
        lambda _m, args, kwargs: recorded.append((args, kwargs)), with_kwargs=True)
    try:
        runs()
    finally:
        handle.remove()
    return recorded


def _search_scales(block, mapping: Mapping, calls: list, x_mean, group_size: int, grid: str):
    """The scales of the best ratio, and the relative output error with and without them."""
    parent = block.get_submodule(mapping.parent)
    layers = [block.get_submodule(b) for b in mapping.balance]
    originals = [layer.weight.detach().clone() for layer in layers]
    reference = [hidden_of(parent(*args, **kwargs)) for args, kwargs in calls]
    w_mean = weight_means(layers, group_size)
    best, best_error, plain_error = None, float("inf"), None
    try:
        for step in range(GRID):
            ratio = step / (GRID - 1)
            scales = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for layer, weight in zip(layers, originals):
                scaled = weight * scales[None, :]
                layer.weight.copy_(dequantize(*rtn_quantize(scaled, group_size, grid), group_size) /
                                   scales[None, :])
            error = sum(float(((hidden_of(parent(*args, **kwargs)) - ref) ** 2).sum())
                        for (args, kwargs), ref in zip(calls, reference))
            if error < best_error and math.isfinite(error):
                best, best_error = scales.clone(), error
        for layer, weight in zip(layers, originals):
            layer.weight.copy_(dequantize(*rtn_quantize(weight, group_size, grid), group_size))
        plain_error = sum(float(((hidden_of(parent(*args, **kwargs)) - ref) ** 2).sum())
                          for (args, kwargs), ref in zip(calls, reference))
    finally:
        for layer, weight in zip(layers, originals):
            layer.weight.copy_(weight)
    if best is None:
        raise UserError(f"quantize int4 awq: no finite output error for {mapping.parent}; the calibration "
                        "outputs hold NaN or inf")
    if plain_error <= best_error:  # rounding the unscaled weights is at least as good: keep them
        return None, best_error, plain_error
    return best, best_error, plain_error


def _apply(block, mapping: Mapping, scales) -> None:
    smooth = block.get_submodule(mapping.smooth)
    for name in mapping.balance + mapping.scaled_only:
        layer = block.get_submodule(name)
        layer.weight.mul_(scales[None, :].to(layer.weight.dtype))
    if smooth.weight.ndim == 1:  # a norm's per-channel gain (Gemma's (1 + w) included)
        divide_norm(smooth, scales)
        return
    smooth.weight.div_(scales[:, None].to(smooth.weight.dtype))  # a Linear producing the input: its output rows
    if getattr(smooth, "bias", None) is not None:
        smooth.bias.div_(scales.to(smooth.bias.dtype))


def awq_smooth(module, layers: dict, feeds: list[dict], task: str, group_size: int, grid: str,
               quantize_block, progress=None, block_loaded=None, block_done=None, spill_dir=None,
               details=None, all_experts: bool = True) -> dict:
    """Balance every block's groups in place, then call `quantize_block(name_prefix)` to round that
    block's layers before the next block is calibrated on its outputs. Returns, per compared module,
    the output error with the chosen scales as a share of plain round-to-nearest's. Layer by layer,
    `block_loaded` / `block_done` read and write each block as in sequential.compress_sequentially;
    the blocks' inputs may go to `spill_dir` (activations.py), while the inputs of the module a group
    is compared at stay in memory for the scale search."""
    import torch

    prefix, blocks = find_blocks(module, layers, "quantize int4 awq")
    hidden_size = getattr(getattr(module, "config", None), "hidden_size", None)
    recorded = block_inputs_store(feeds, hidden_size, spill_dir, "quantize int4 awq", details)
    experts = CalibratingExperts(module, all_experts)  # every expert searched on every token, routing kept
    reductions = {}
    try:
        with torch.no_grad(), experts:
            block_inputs(module, blocks, feeds, task, recorded)
            indices = range(len(blocks))
            for index in (progress.track(indices, len(blocks), "quantize int4 awq: block by block") if progress
                          else indices):
                block = blocks[index]
                if block_loaded:
                    block_loaded(index, block)
                if experts.groups:  # the tokens the router chose per expert, over one pass of the data
                    experts.counting(True)
                    for args, kwargs in recorded.calls():
                        block(*args, **kwargs)
                    experts.counting(False)
                args, kwargs = next(iter(recorded.calls()))
                before = hidden_of(block(*args, **kwargs))
                for mapping in block_mappings(block):
                    key = f"{prefix}.{index}.{mapping.parent}"
                    reductions[key] = _balance(block, mapping, recorded, group_size, grid)
                _check_function(before, hidden_of(block(*args, **kwargs)), f"{prefix}.{index}")
                quantize_block(f"{prefix}.{index}.")
                recorded.advance(block)
                if block_done:
                    block_done(index, block)
    finally:
        recorded.close()
    if details is not None:
        details.update(experts.record(MIN_EXPERT_TOKENS))
    return reductions


FUNCTION_TOLERANCE = 1e-3  # of the block output's range: scaling alone is exact up to float rounding


def _check_function(before, after, block: str) -> None:
    """Balancing multiplies weights by s and divides what feeds them by s: the block's float function must not
    move. A block laid out otherwise than the mappings assume (a reader of the scaled input left out) would."""
    change = float((after - before).abs().max()) / max(float(before.abs().max()), 1e-12)
    if not change <= FUNCTION_TOLERANCE:
        raise StageFailed(f"quantize int4 awq: balancing changed {block}'s float output by {change:.2%} of its range "
                          "(it should change nothing): its layout is not the one the AWQ groups assume; use "
                          "algorithm gptq")


def _balance(block, mapping: Mapping, recorded: BlockInputs, group_size: int, grid: str) -> float:
    """Search and apply one group's scales; returns the output error with them over plain rounding's."""
    import torch

    first = block.get_submodule(mapping.balance[0])
    sums = torch.zeros(first.in_features, dtype=torch.float64)
    count = [0]

    def add(x):
        x = x.detach().reshape(-1, x.shape[-1]).double()
        sums.add_(x.abs().sum(0))
        count[0] += x.shape[0]
    smooth = block.get_submodule(mapping.smooth)
    if smooth.weight.ndim == 1:  # a norm: its output, which every reader sees (routed experts included)
        handle = smooth.register_forward_hook(lambda _m, _args, output: add(hidden_of(output)))
    else:
        handle = first.register_forward_pre_hook(lambda _m, args: add(args[0]))

    def runs():
        for args, kwargs in recorded.calls():
            block(*args, **kwargs)
    try:
        calls = _calls(block, mapping.parent, runs)
    finally:
        handle.remove()
    x_mean = (sums / max(count[0], 1)).float()
    scales, best, plain = _search_scales(block, mapping, calls, x_mean, group_size, grid)
    if scales is not None:
        _apply(block, mapping, scales)
    return round(best / plain, 4) if plain else 1.0
