"""The vocabulary matrices in the torch weight-only schemes (int8 and int4): the token embedding table,
and the output head where the scheme itself leaves it float, quantized by default so that a large
vocabulary does not keep most of a small model float; `embeddings: float` keeps both.

A head tied to the table computes with the table's own codes (one tensor, stored once), so the lookup
and the logits always agree. An untied head that a calibrated 4-bit method leaves out of its blocks
(quantize_head) gets the table's scheme, rounded to nearest: int8 per output channel costs the logits
far less than 4-bit would, and a 128k-262k-token head is a large share of the model."""

from __future__ import annotations

import fnmatch
from typing import Optional

from ...anatomy import Anatomy
from ...embeddings import embedding_record, int4_embedding_class, int8_embedding_class, share_table_with_head, unsupported_embedding
from ...torch_transforms import int4_linear_class, int8_linear_class, per_channel_int8, swap_modules
from ..base import StageContext
from .int4_gptq import rtn_quantize


def embedding_scheme(config) -> str:
    """The table's scheme for this config: as asked, else int8 (one scale per token: about 4x smaller
    than float32 and far below the error of the 4- or 8-bit blocks around it)."""
    asked = getattr(config, "embeddings", None)
    return asked if asked is not None else "int8"


def _table_name(module, table) -> Optional[str]:
    return next((name for name, child in module.named_modules() if child is table), None)


def quantize_embedding_table(module, parts: Anatomy, config, ctx: StageContext, what: str,
                             float_head: Optional[str] = None, head_tied: Optional[bool] = None) -> Optional[dict]:
    """Replace the token table, and the head (tied to it, or `float_head`: an untied head the scheme left
    float and the recipe did not exclude), by quantized modules, in place. Returns the record the transform
    keeps for loading (None: the table stays float) and puts what was done in the stage's record; a table
    that cannot be quantized is left float with a note saying why. `head_tied` overrides the anatomy's answer
    (a layer-by-layer skeleton knows it from the config, not from shared tensors)."""
    import torch

    scheme = embedding_scheme(config)
    table = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    name = _table_name(module, table) if table is not None else None
    if scheme == "float" or name is None:
        ctx.details["embeddings"] = "float"
        return None
    problem = unsupported_embedding(table)
    if problem:
        ctx.details["embeddings"] = "float"
        ctx.notes.append(f"{what}: the embedding table {name} stays float: {problem}")
        return None
    tied = parts.head_tied if head_tied is None else head_tied
    if tied and _excluded(parts.head, config.exclude):
        ctx.details["embeddings"] = "float"
        ctx.notes.append(f"{what}: the embedding table {name} stays float: {parts.head}, which computes with it, is "
                         "in `exclude`")
        return None
    weight = table.weight.detach().float()
    group = config.block_size if scheme == "int4" else None
    with torch.no_grad():
        if scheme == "int8":
            codes, scales = per_channel_int8(weight.numpy(), axis=0)
            new_table = int8_embedding_class().from_codes(table, torch.from_numpy(codes), torch.from_numpy(scales))
        else:
            new_table = int4_embedding_class().from_codes(table, *rtn_quantize(weight, group, config.grid()), group)
        head = parts.head if tied else float_head
        if head is not None:
            head_class = int8_linear_class() if scheme == "int8" else int4_linear_class()
            # the scheme may have quantized a tied head already (the classes come from factories: by name)
            if type(module.get_submodule(head)).__name__ != head_class.__name__:
                swap_modules(module, [head], lambda old: _quantized_head(head_class, old, group, tied, config))
            if tied:
                share_table_with_head(new_table, module.get_submodule(head))
    swap_modules(module, [name], lambda old: new_table)
    ctx.details.update({"embeddings": scheme, "embedding_parameters": int(weight.numel())})
    if head is not None and not tied:
        ctx.details["head"] = f"{scheme}, rounded to nearest"
    return embedding_record(name, table, scheme, head, tied, group)


def _excluded(name: str, patterns: list[str]) -> bool:
    """`exclude`'s matching (anatomy.select): the full name or its last part."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name.rsplit(".", 1)[-1], p) for p in patterns)


def _quantized_head(head_class, old, group: Optional[int], tied: bool, config):
    """The head as a weight-only layer of the table's scheme: a tied one empty (its codes and scales will be
    the table's), an untied one rounded to nearest from its own weight."""
    import torch

    if not tied and group is None:
        return head_class.from_linear(old)
    if not tied:
        return head_class.from_codes(old, *rtn_quantize(old.weight, group, config.grid()), group)
    extra = () if group is None else (group,)
    head = head_class(old.in_features, old.out_features, old.bias is not None, *extra)
    if old.bias is not None:
        with torch.no_grad():
            head.bias.copy_(old.bias.detach().float())
    return head


def float_parameter_share(module, total_parameters: int) -> float:
    """The share of the model's parameters still stored as float after quantization: every floating tensor
    of its state (shared ones once) except the scales of quantized layers, over the float model's count."""
    seen, floats = set(), 0
    for name, tensor in module.state_dict(keep_vars=True).items():
        if tensor.is_floating_point() and not name.endswith(".weight_scale") and id(tensor) not in seen:
            seen.add(id(tensor))
            floats += tensor.numel()
    return round(floats / max(total_parameters, 1), 4)
