"""What the torch int4 paths share, whole model or layer by layer (int4_torch.py, int4_layerwise.py):
which layers are quantized, one layer's rounding (rtn or gptq), the swap to packed int4 layers, and
the transform and record that describe the result."""

from __future__ import annotations

from typing import Optional

from ...anatomy import Anatomy, matches_any
from ...artifacts import TorchModel
from ...torch_transforms import INT4_WEIGHT_ONLY, int4_linear_class, swap_modules
from ..base import StageContext
from ..blockwise.sequential import stacked_rows
from .int4_gptq import dequantize, gptq_quantize, rtn_quantize


def quantizes_head(config) -> bool:
    """Whether an untied head is quantized: asked for by `quantize_head`, else only by rtn. Calibrated
    methods leave it float by default, as the peers do: it reads the final hidden states, which no block's
    calibration covers, and a 4-bit head costs more accuracy than any block layer."""
    return config.quantize_head if config.quantize_head is not None else config.algorithm == "rtn"


def quantized_targets(parts: Anatomy, config) -> tuple[dict, list[str]]:
    """Linear layers to quantize (experts included, routers never), and the linears kept in float: the head
    when it is tied to the embedding table (quantizing it would quantize the lookup too, and untie the
    checkpoint) or not asked for (quantizes_head). Refused when `exclude` leaves none."""
    chosen = parts.select([], config.exclude, "quantize int4-weight-only",
                          head=quantizes_head(config) and not parts.head_tied)
    kept = [name for name in (parts.head,) if name is not None and name not in chosen
            and not matches_any(name, config.exclude)]
    return chosen, kept


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


def layers_quantizer(config, grids: dict):
    """`quantize_together(named, stats)`: GPTQ of layers reading one input (sequential.compress_sequentially),
    their rows stacked: each row's codes depend only on the row and the shared Hessian, so the codes are
    those of one layer at a time, from one column loop."""
    group = config.block_size

    def quantize_together(named: list, stats) -> None:
        stacked, bounds = stacked_rows(named)
        codes, scales, zeros = gptq_quantize(stacked, stats.hessian(), group, config.grid(), config.dampening,
                                             config.act_order)
        for (name, layer), rows in zip(named, bounds):
            grids[name] = (codes[rows].contiguous(), scales[rows].contiguous(), zeros[rows].contiguous())
            layer.weight.copy_(dequantize(*grids[name], group).to(layer.weight.dtype))
    return quantize_together


def swap_to_int4(module, layers: dict, names: list[str], grids: dict, group: int) -> None:
    """Replace these quantized layers by packed int4 layers built from their codes (taken out of `grids`)."""
    linear = int4_linear_class()
    grid_of = {id(layers[name]): grids.pop(name) for name in names}
    swap_modules(module, names, lambda old: linear.from_codes(old, *grid_of[id(old)], group))


def int4_transform(config, names: list[str], embeddings: Optional[dict] = None) -> dict:
    """The record loading replays: the int4 layers, and the quantized embedding table if any."""
    return {"name": INT4_WEIGHT_ONLY, "layers": names, "group_size": config.block_size,
            "symmetric": config.symmetric, "grid": config.grid(), "stored": True, "embeddings": embeddings}


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
