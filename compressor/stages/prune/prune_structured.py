"""Structured pruning: remove whole attention heads and FFN intermediate channels, so tensors
physically shrink, and update the config so that `from_pretrained` rebuilds the smaller model.

Three block layouts are understood, found by module names rather than by class:
- BERT family (`attention.self.{query,key,value}`, `attention.output.dense`, `intermediate.dense`,
  `output.dense`): FFN channels;
- GPT-2 family (`attn.c_attn`, `attn.c_proj`, `mlp.c_fc`, `mlp.c_proj`, all transformers Conv1D
  layers, weights inputs x outputs): FFN channels, by cutting `c_fc`'s outputs and `c_proj`'s
  inputs, the config's `n_inner` set to the new width;
- Llama family (`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`): heads and FFN channels. With
  grouped-query attention a key/value head and the query heads that read it are removed together,
  so every remaining query head still has its KV head; the config's head counts change and
  `head_dim` is written explicitly, because it no longer equals hidden_size / num_attention_heads.

- two-layer FFN families (OPT's `fc1` / `fc2`, Phi's `mlp.fc1` / `mlp.fc2`, GPT-NeoX's and Falcon's
  `mlp.dense_h_to_4h` / `mlp.dense_4h_to_h`, FFN_PAIRS): FFN channels, the config's width field set.

Heads of BERT, GPT-2 and the two-layer FFN families are refused: transformers 5 dropped
`config.pruned_heads` and derives their head size from hidden_size / num_attention_heads, so a model
with fewer heads cannot be reloaded. A config holds one FFN width (and for Llama one head count) for
all layers, so those are pruned by the same amount in every layer.

Importance of a unit (a head, a KV group or an FFN channel) is measured at the projection that
reads it back into the residual stream (`attention.output.dense` / `o_proj`, `output.dense` /
`down_proj`):
- magnitude: ||W_out[:, unit]||_F x ||W_in[unit, :]||_F, with W_in the value rows for heads and
  the up (and gate) rows for channels. The product is unchanged when one side is scaled up and
  the other down, which leaves the function the same;
- activations: sum over the unit's input columns c of ||W_out[:, c]||_2 x ||x_c||_2 on calibration
  data, Wanda's score gathered per unit."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from ...anatomy import architecture_of, blocks_of, experts_in, has_submodule
from ...checkpoint import model_class
from ...data import torch_inputs
from ...errors import StageFailed, UserError
from ...linear_layers import is_conv1d, out_in_weight, shape_of

log = logging.getLogger(__name__)

MAC_SEQUENCE = 128  # tokens in the input on which MACs are counted and reported


@dataclass
class Units:
    """One prunable group in one block: `count` units of `width` consecutive columns of `output`
    (and rows of each of `inputs`; `value_inputs` with their own width for GQA value heads)."""

    kind: str  # "heads" or "channels"
    block: int
    count: int
    width: int
    output: str  # module path of the projection that reads the units
    inputs: list[str]  # module paths whose output rows are the units
    value: Optional[tuple[str, int]] = None  # (path, width): rows that weigh a head's magnitude
    value_offset: int = 0  # first of those rows (GPT-2's c_attn holds query, key and value rows in turn)
    kv: list[str] = field(default_factory=list)  # Llama KV groups: key and value rows, `value` width each
    scores: object = None
    keep: list[int] = field(default_factory=list)


# Blocks whose FFN is one layer up and one down with an activation between: (layer whose output rows are the
# channels, layer that reads them back, the config field holding their count). Their heads are not pruned.
FFN_PAIRS = {
    "opt": ("fc1", "fc2", "ffn_dim"),
    "phi": ("mlp.fc1", "mlp.fc2", "intermediate_size"),
    "gpt_neox": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "intermediate_size"),
    "falcon": ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h", "ffn_hidden_size"),
}


ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def family(block, architecture: str = "") -> str:
    pair = FFN_PAIRS.get(architecture)
    if pair and all(has_submodule(block, path) for path in pair[:2]):
        return architecture
    moe = bool(experts_in(block))
    if hasattr(block, "self_attn") and hasattr(block, "mlp") and (moe or hasattr(block.mlp, "down_proj")):
        if not all(hasattr(block.self_attn, name) for name in ATTENTION_PROJECTIONS) or \
                not (moe or all(hasattr(block.mlp, name) for name in ("gate_proj", "up_proj"))):
            raise UserError(f"prune structured: {type(block).__name__} has no separate q/k/v/o projections, or no "
                            "gate/up projections (Phi-3 fuses qkv_proj and gate_up_proj; DeepSeek's latent "
                            "attention projects keys and values together); heads and channels are removed from "
                            "separate q/k/v/o and gate/up/down layers; use unstructured pruning")
        return "llama"
    if hasattr(block, "attention") and hasattr(block, "intermediate") and hasattr(block.attention, "self"):
        return "bert"
    if hasattr(block, "attn") and hasattr(block.attn, "c_attn") and hasattr(getattr(block, "mlp", None), "c_fc"):
        return "gpt2"
    raise UserError(f"prune structured: blocks of type {type(block).__name__} are neither BERT-like "
                    "(attention.self, intermediate, output), Llama-like (self_attn, mlp.down_proj), GPT-2-like "
                    "(attn.c_attn, mlp.c_fc) nor a two-layer FFN of OPT, Phi, GPT-NeoX or Falcon")


def find_blocks(module):
    """The base model's repeated transformer blocks and the path prefix they live under (the anatomy's)."""
    prefix, blocks = blocks_of(module)
    if blocks is None or not len(blocks):
        raise UserError("prune structured: found no transformer blocks (an nn.ModuleList of blocks holding the "
                        "model's linear layers)")
    return prefix, blocks


def _refuse_expert_channels(module, prefix: str, blocks, channels: Optional[float]) -> None:
    """Mixture-of-experts blocks: heads can go, the experts' channels cannot (yet)."""
    experts = experts_in(blocks[0])
    if experts and channels:
        raise UserError(f"prune structured: the feed-forward of {architecture_of(module)}'s blocks is a mixture of "
                        f"experts ({prefix}.0.{experts[0]}); their channels are not removed (each expert would need "
                        "its own cut of the fused tensors under one width in the config); remove attention heads "
                        "(heads:), or prune the experts unstructured (kind: unstructured)")


def plan_units(module, heads: Optional[float], channels: Optional[float]) -> list[Units]:
    prefix, blocks = find_blocks(module)
    kind = family(blocks[0], architecture_of(module))
    units = []
    for index, block in enumerate(blocks):
        at = f"{prefix}.{index}"
        if kind in FFN_PAIRS:
            up, down, _ = FFN_PAIRS[kind]
            if channels:
                units.append(Units("channels", index, shape_of(block.get_submodule(up))[1], 1, f"{at}.{down}",
                                   [f"{at}.{up}"]))
        elif kind == "bert":
            attention = block.attention.self
            if heads:
                units.append(Units("heads", index, attention.num_attention_heads, attention.attention_head_size,
                                   f"{at}.attention.output.dense",
                                   [f"{at}.attention.self.{n}" for n in ("query", "key", "value")],
                                   value=(f"{at}.attention.self.value", attention.attention_head_size)))
            if channels:
                units.append(Units("channels", index, block.intermediate.dense.out_features, 1,
                                   f"{at}.output.dense", [f"{at}.intermediate.dense"]))
        elif kind == "gpt2":
            attention = block.attn
            if heads:
                units.append(Units("heads", index, attention.num_heads, attention.head_dim, f"{at}.attn.c_proj",
                                   [f"{at}.attn.c_attn"], value=(f"{at}.attn.c_attn", attention.head_dim),
                                   value_offset=2 * attention.split_size))
            if channels:
                units.append(Units("channels", index, shape_of(block.mlp.c_fc)[1], 1, f"{at}.mlp.c_proj",
                                   [f"{at}.mlp.c_fc"]))
        else:
            head_dim = block.self_attn.head_dim
            groups = block.self_attn.k_proj.out_features // head_dim
            per_group = block.self_attn.q_proj.out_features // head_dim // groups
            if heads:
                # one unit = one KV group: per_group query heads, and the key and value head they share
                units.append(Units("heads", index, groups, per_group * head_dim, f"{at}.self_attn.o_proj",
                                   [f"{at}.self_attn.q_proj"], value=(f"{at}.self_attn.v_proj", head_dim),
                                   kv=[f"{at}.self_attn.k_proj", f"{at}.self_attn.v_proj"]))
            if channels:  # (a mixture-of-experts block was refused before)
                units.append(Units("channels", index, block.mlp.down_proj.in_features, 1, f"{at}.mlp.down_proj",
                                   [f"{at}.mlp.gate_proj", f"{at}.mlp.up_proj"]))
    return units


def magnitude_scores(module, unit: Units):
    import torch

    out = out_in_weight(module.get_submodule(unit.output)).detach().float()
    column_norms = out.reshape(out.shape[0], unit.count, unit.width).pow(2).sum(dim=(0, 2))
    if unit.value:
        path, width = unit.value
        rows = out_in_weight(module.get_submodule(path)).detach().float()
        rows = rows[unit.value_offset:unit.value_offset + unit.count * width]
        row_norms = rows.reshape(unit.count, width, -1).pow(2).sum(dim=(1, 2))
    else:
        row_norms = sum(out_in_weight(module.get_submodule(p)).detach().float().pow(2).sum(dim=1)
                        for p in unit.inputs)
    return torch.sqrt(column_norms) * torch.sqrt(row_norms)


def activation_scores(module, units: list[Units], feeds: list[dict], task: str) -> None:
    """Run the calibration batches once, gathering the squared input of every output projection."""
    import torch

    sums = {unit.output: torch.zeros(shape_of(module.get_submodule(unit.output))[0], dtype=torch.float64)
            for unit in units}

    def hook(path):
        def add(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[path] += (x * x).sum(0)
        return add

    handles = [module.get_submodule(path).register_forward_pre_hook(hook(path)) for path in sums]
    try:
        with torch.no_grad():
            for feed in feeds:
                module(**torch_inputs(feed), **({"use_cache": False} if task == "text-generation" else {}))
    finally:
        for handle in handles:
            handle.remove()
    for unit in units:
        out = out_in_weight(module.get_submodule(unit.output)).detach().double()
        per_column = out.pow(2).sum(0).sqrt() * sums[unit.output].sqrt()
        unit.scores = per_column.reshape(unit.count, unit.width).sum(1).float()


def kept_count(count: int, ratio: float, multiple: int, kind: str) -> int:
    if kind == "heads":
        keep = count - round(count * ratio)
    else:
        keep = multiple * round(count * (1 - ratio) / multiple) if multiple > 1 else round(count * (1 - ratio))
    keep = min(count, max(keep, min(multiple, count) if kind == "channels" else 1))
    return keep


def choose(units: list[Units], heads: Optional[float], channels: Optional[float], multiple: int) -> None:
    """Fill each unit's `keep` with the indices of its highest-scoring units, in order."""
    import torch

    for kind, ratio in (("heads", heads), ("channels", channels)):
        group = [u for u in units if u.kind == kind]
        if not group:
            continue
        for unit in group:
            keep = kept_count(unit.count, ratio, multiple, kind)
            unit.keep = sorted(torch.topk(unit.scores, keep).indices.tolist())


def _rows(count: int, width: int, keep: list[int]):
    import torch

    return torch.tensor([i * width + j for i in keep for j in range(width)], dtype=torch.long)


def _replace(module, path: str, index, dim: int) -> None:
    """Keep `index` along `dim` of the layer's (outputs x inputs) weight: 0 cuts outputs, 1 inputs.
    Written here rather than taken from transformers.pytorch_utils, whose Conv1D version is gone
    from transformers 5."""
    import torch

    parent_path, _, name = path.rpartition(".")
    parent = module.get_submodule(parent_path)
    layer = getattr(parent, name)
    index = index.to(layer.weight.device)
    weight = out_in_weight(layer).detach().index_select(dim, index).clone()
    bias = None if layer.bias is None else layer.bias.detach()
    if bias is not None and dim == 0:
        bias = bias.index_select(0, index)
    outputs, inputs = weight.shape
    if is_conv1d(layer):  # Conv1D(outputs, inputs) holds its weight as inputs x outputs
        new = type(layer)(outputs, inputs)
        new.weight = torch.nn.Parameter(weight.T.contiguous())
        new.bias = torch.nn.Parameter(bias.clone())
    else:
        new = torch.nn.Linear(inputs, outputs, bias=bias is not None, dtype=weight.dtype, device=weight.device)
        new.weight = torch.nn.Parameter(weight)
        if bias is not None:
            new.bias = torch.nn.Parameter(bias.clone())
    setattr(parent, name, new.train(layer.training))


def apply(module, units: list[Units], kind: str) -> None:
    config = module.config
    for unit in units:
        index = _rows(unit.count, unit.width, unit.keep)
        _replace(module, unit.output, index, dim=1)
        for path in unit.inputs:
            _replace(module, path, index, dim=0)
        if kind == "llama" and unit.kind == "heads":
            head_dim = unit.value[1]
            for path in unit.kv:
                _replace(module, path, _rows(unit.count, head_dim, unit.keep), dim=0)
            _cut_per_head_parameters(module, unit, head_dim)
    channel_units = [u for u in units if u.kind == "channels"]
    if channel_units and kind in FFN_PAIRS:
        setattr(config, FFN_PAIRS[kind][2], len(channel_units[0].keep))
    elif channel_units and kind == "gpt2":
        config.n_inner = len(channel_units[0].keep)
    elif channel_units:
        config.intermediate_size = len(channel_units[0].keep)
    head_units = [u for u in units if u.kind == "heads"]
    if kind == "llama" and head_units:
        unit, head_dim = head_units[0], head_units[0].value[1]
        config.head_dim = head_dim
        config.num_key_value_heads = len(unit.keep)
        config.num_attention_heads = len(unit.keep) * (unit.width // head_dim)
        log.info("kept %d of %d KV groups per layer", len(unit.keep), unit.count)


def _cut_per_head_parameters(module, unit: Units, head_dim: int) -> None:
    """Vectors the attention module holds per head beside its projections, cut to the kept heads so that
    none keeps the old head count: one value per query head (GPT-OSS's `sinks`), or one per query or
    key row (OLMo 2 normalises the whole q and k projections: q_norm over heads x head_dim, k_norm over
    KV heads x head_dim). Per-head_dim vectors (Qwen3's q_norm) are shared by all heads and stay."""
    import torch

    attention = module.get_submodule(unit.output.rpartition(".")[0])
    per_group = unit.width // head_dim
    query_heads = _rows(unit.count, per_group, unit.keep)
    cuts = {module.config.num_attention_heads: query_heads,
            unit.count * unit.width: _rows(unit.count, unit.width, unit.keep),
            unit.count * head_dim: _rows(unit.count, head_dim, unit.keep)}
    for name, parameter in list(attention.named_parameters()):
        owner_path, _, key = name.rpartition(".")
        if owner_path.split(".")[0] in ATTENTION_PROJECTIONS or parameter.ndim != 1 or parameter.shape[0] not in cuts:
            continue
        index = cuts[parameter.shape[0]]
        if owner_path.startswith("k") and parameter.shape[0] == unit.count * head_dim:
            index = _rows(unit.count, head_dim, unit.keep)  # a key norm: KV rows even when they equal query rows
        owner = attention.get_submodule(owner_path) if owner_path else attention
        kept = parameter.detach().index_select(0, index.to(parameter.device)).clone()
        setattr(owner, key, torch.nn.Parameter(kept, requires_grad=parameter.requires_grad))


def prune_structured(module, config, task: str, feeds: Optional[list[dict]]) -> dict:
    """Prune `module` in place (`feeds`: the calibration batches, for activation importance);
    return what the report shows about it."""
    import torch

    prefix, blocks = find_blocks(module)
    _refuse_expert_channels(module, prefix, blocks, config.channels)
    kind = family(blocks[0], architecture_of(module))
    if config.heads and (kind in ("bert", "gpt2") or kind in FFN_PAIRS):
        raise UserError(f"prune structured: heads of {kind.upper()}-family models cannot be removed: transformers 5 "
                        "dropped config.pruned_heads and derives their head size from hidden_size / "
                        "num_attention_heads, so the smaller model could not be reloaded; remove FFN channels "
                        "(channels:), or heads of a model with its own head_dim (Llama, Qwen2, Mistral)")
    units = plan_units(module, config.heads, config.channels)
    if config.importance == "activations":
        activation_scores(module, units, feeds, task)
    else:
        for unit in units:
            unit.scores = magnitude_scores(module, unit)
    choose(units, config.heads, config.channels, config.round_to)
    with torch.no_grad():
        apply(module, units, kind)
    summary = {"family": kind, "importance": config.importance}
    for what in ("heads", "channels"):
        chosen = [u for u in units if u.kind == what]
        if chosen:
            label = "kv_groups" if what == "heads" and kind == "llama" else what
            summary[f"{label}_kept_by_layer"] = [len(u.keep) for u in chosen]
            summary[f"{label}_before"] = sum(u.count for u in chosen)
            summary[f"{label}_after"] = sum(len(u.keep) for u in chosen)
    return summary


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def size_and_macs(module, vocab_size: int) -> tuple[int, int]:
    """Parameter count, and multiply-accumulates of one forward pass on 1 x MAC_SEQUENCE tokens
    (matrix products, attention included, counted by torch's FLOP counter: MACs = FLOPs / 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    params = sum(p.numel() for p in module.parameters())
    ids = torch.randint(0, vocab_size, (1, MAC_SEQUENCE), generator=torch.Generator().manual_seed(0))
    # torch's counter knows the CUDA attention kernels but not the CPU one SDPA dispatches to here;
    # without this the two attention products of every layer would count as free
    counter = FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops})
    with torch.no_grad(), counter:
        module(input_ids=ids, attention_mask=torch.ones_like(ids))
    return params, counter.get_total_flops() // 2


def check_reload(module, folder, task: str, vocab_size: int) -> float:
    """Load the saved folder with from_pretrained and return the largest output difference from the
    in-memory pruned model; a wrong config or shape fails here rather than for the user."""
    import torch

    try:
        reloaded = model_class(task).from_pretrained(folder)
    except Exception as exc:  # a shape mismatch surfaces as one of several error types
        raise StageFailed(f"prune structured: the pruned model does not reload with from_pretrained: {exc}") from None
    reloaded.eval()
    ids = torch.randint(0, vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = module(input_ids=ids), reloaded(input_ids=ids)
    key = "logits" if hasattr(ours, "logits") else "last_hidden_state"
    return float((getattr(ours, key) - getattr(theirs, key)).abs().max())
