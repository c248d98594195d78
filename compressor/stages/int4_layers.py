"""What the torch int4 paths share, whole model or layer by layer (int4_torch.py, int4_layerwise.py):
which layers are quantized, one layer's rounding (rtn or gptq), the swap to packed int4 layers, and
the transform and record that describe the result."""

from __future__ import annotations

import fnmatch

from ..artifacts import TorchModel
from ..errors import UserError
from ..torch_transforms import INT4_WEIGHT_ONLY, int4_linear_class, swap_modules
from .base import StageContext
from .int4_gptq import dequantize, gptq_quantize, rtn_quantize


def quantized_targets(module, exclude: list[str]) -> tuple[dict, list[str]]:
    """nn.Linear layers to quantize, and those kept in float because their weight is an embedding's;
    refused when `exclude` leaves none."""
    import torch

    embedded = {id(child.weight) for child in module.modules() if isinstance(child, torch.nn.Embedding)}
    chosen, tied = {}, []
    for name, child in module.named_modules():
        if not isinstance(child, torch.nn.Linear) or any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if id(child.weight) in embedded:
            tied.append(name)
        else:
            chosen[name] = child
    if not chosen:
        raise UserError("quantize int4-weight-only: no nn.Linear left to quantize after `exclude`")
    return chosen, tied


def layer_quantizer(config, grids: dict):
    """`quantize_layer(name, layer, stats=None)`: round the layer's weight (rtn, or gptq from its input
    statistics), keep its codes in `grids[name]` and put the dequantized values in the weight, so that
    later blocks are calibrated on the outputs of this layer as it will compute."""
    group = config.block_size

    def quantize_layer(name, layer, stats=None) -> None:
        if stats is None:
            codes, scales, zeros = rtn_quantize(layer.weight, group, config.grid())
        else:
            codes, scales, zeros = gptq_quantize(layer.weight, stats.hessian(), group, config.grid(),
                                                 config.dampening, config.act_order)
        grids[name] = (codes, scales, zeros)
        layer.weight.copy_(dequantize(codes, scales, zeros, group).to(layer.weight.dtype))
    return quantize_layer


def swap_to_int4(module, layers: dict, names: list[str], grids: dict, group: int) -> None:
    """Replace these quantized layers by packed int4 layers built from their codes (taken out of `grids`)."""
    linear = int4_linear_class()
    grid_of = {id(layers[name]): grids.pop(name) for name in names}
    swap_modules(module, names, lambda old: linear.from_codes(old, *grid_of[id(old)], group))


def int4_transform(config, names: list[str]) -> dict:
    return {"name": INT4_WEIGHT_ONLY, "layers": names, "group_size": config.block_size,
            "symmetric": config.symmetric, "grid": config.grid(), "stored": True}


def record_int4(config, artifact: TorchModel, result: TorchModel, names: list[str], tied: list[str],
                ctx: StageContext) -> None:
    ctx.details.update({"backend": "torch", "algorithm": config.algorithm, "block_size": config.block_size,
                        "symmetric": config.symmetric, "grid": config.grid(), "quantized_linear_layers": len(names),
                        "kept_in_float": tied, "size_mb_before": round(artifact.size_mb(), 3),
                        "size_mb_after": round(result.size_mb(), 3)})
    if config.algorithm == "gptq":
        ctx.details.update({"act_order": config.act_order, "dampening": config.dampening})
    if config.algorithm in ("gptq", "awq"):
        ctx.details["calibration_samples"] = config.calibration.samples


def record_awq(reductions: dict, ctx: StageContext) -> None:
    ctx.details.update({"awq_error_vs_rtn_mean": round(sum(reductions.values()) / max(len(reductions), 1), 4),
                        "awq_groups_scaled": sum(1 for r in reductions.values() if r < 1)})
