"""The vocabulary matrices in the torch weight-only schemes (int8 and int4): the token embedding table,
and the output head where the scheme itself leaves it float, quantized by default so that a large
vocabulary does not keep most of a small model float; `embeddings: float` keeps both.

A head tied to the table computes with the table's own codes (one tensor, stored once), so the lookup
and the logits always agree. An untied head that a calibrated 4-bit method leaves out of its blocks
(quantize_head) gets the table's scheme, rounded to nearest: int8 per output channel costs the logits
far less than 4-bit would, and a 128k-262k-token head is a large share of the model."""

from __future__ import annotations

from typing import Optional

from ...anatomy import Anatomy, matches_any
from ...embeddings import (embedding_record, int4_embedding_class, int8_embedding_class, tie_head_to_table,
                            unsupported_embedding)
from ...torch_transforms import int4_linear_class, int8_linear_class, per_channel_int8, swap_modules
from ..base import StageContext
from .int4_gptq import rtn_quantize


def embedding_scheme(config) -> str:
    """The table's scheme for this config: as asked, else int8 (one scale per token: about 4x smaller
    than float32 and far below the error of the 4- or 8-bit blocks around it)."""
    asked = getattr(config, "embeddings", None)
    return asked if asked is not None else "int8"


def _input_table(module):
    """(name, module) of the token embedding table, or (None, None) when the model does not say."""
    try:
        table = module.get_input_embeddings() if hasattr(module, "get_input_embeddings") else None
    except NotImplementedError:  # transformers' answer for a model it cannot find the table of
        return None, None
    name = next((n for n, child in module.named_modules() if child is table), None) if table is not None else None
    return name, table


def _keep_float(ctx: StageContext, what: str, name: str, why: str) -> None:
    ctx.details["embeddings"] = "float"
    ctx.notes.append(f"{what}: the embedding table {name} stays float: {why}")


def quantize_embedding_table(module, parts: Anatomy, config, ctx: StageContext, what: str,
                             float_head: Optional[str] = None, head_tied: Optional[bool] = None) -> Optional[dict]:
    """Replace the token table, and the head (tied to it, or `float_head`: an untied head the scheme left
    float and the recipe did not exclude), by quantized modules, in place. Returns the record the transform
    keeps for loading (None: the table stays float) and puts what was done in the stage's record; a table
    that cannot be quantized is left float with a note saying why. `head_tied` overrides the anatomy's answer
    (a layer-by-layer skeleton knows it from the config, not from shared tensors)."""
    import torch

    scheme = embedding_scheme(config)
    name, table = _input_table(module)
    if scheme == "float" or name is None:
        ctx.details["embeddings"] = "float"
        return None
    problem = unsupported_embedding(table)
    tied = parts.head_tied if head_tied is None else head_tied
    if problem or matches_any(name, config.exclude):
        _keep_float(ctx, what, name, problem or "it is in `exclude`")
        return None
    if tied and matches_any(parts.head, config.exclude):
        _keep_float(ctx, what, name, f"{parts.head}, which computes with it, is in `exclude`")
        return None
    weight = table.weight.detach().float()
    group = config.block_size if scheme == "int4" else None
    with torch.no_grad():
        if scheme == "int8":
            codes, scales = per_channel_int8(weight.numpy(), axis=0)
            new_table = int8_embedding_class().from_codes(table, torch.from_numpy(codes), torch.from_numpy(scales))
        else:
            new_table = int4_embedding_class().from_codes(table, *rtn_quantize(weight, group, config.grid()), group)
        if table.weight.dtype != torch.float32:  # a model held in half precision looks rows up in it
            new_table = new_table.to(table.weight.dtype)
        head = parts.head if tied else (float_head if float_head and not matches_any(float_head, config.exclude)
                                        else None)
        if head is not None and tied:
            tie_head_to_table(module, head, new_table)
        elif head is not None:  # untied: rounded to nearest from its own weight, in the table's scheme
            if scheme == "int8":
                swap_modules(module, [head], int8_linear_class().from_linear)
            else:
                linear = int4_linear_class()
                swap_modules(module, [head], lambda old: linear.from_codes(
                    old, *rtn_quantize(old.weight, group, config.grid()), group))
    swap_modules(module, [name], lambda old: new_table)
    ctx.details.update({"embeddings": scheme, "embedding_parameters": int(weight.numel())})
    if head is not None and not tied:
        ctx.details["head"] = f"{scheme}, rounded to nearest"
    return embedding_record(name, table, scheme, head, tied, group)


def float_parameter_share(module, total_parameters: int) -> float:
    """The share of the model's parameters still stored as float after quantization: its float parameters
    (each shared one once; quantized codes and scales are buffers), over the float model's count."""
    floats = sum(p.numel() for p in module.parameters() if p.is_floating_point())
    return round(floats / max(total_parameters, 1), 4)
