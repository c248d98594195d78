"""int4 weight-only quantization of a torch model's nn.Linear layers: 4-bit codes in groups of
`block_size` inputs with a scale and zero point per output row and group, stored packed in
safetensors and dequantized per call (torch_transforms.Int4WeightOnlyLinear).

- rtn: each group rounded to nearest on its own grid, no data;
- gptq: one transformer block at a time on calibration text, each block seeing the outputs of the
  blocks already quantized (the GPTQ paper's sequential setting); within a layer, columns are
  quantized in order (or by decreasing Hessian diagonal with `act_order`) and each one's rounding
  error is compensated in the columns still to come (int4_gptq.gptq_quantize);
- awq: block by block too; input channels with large activations are scaled up in the weights and
  down in the layer producing them before round-to-nearest (awq.py).

Layers whose weight is the (tied) embedding table stay in float: quantizing them would quantize
the embedding lookup too, and untie the checkpoint."""

from __future__ import annotations

import fnmatch
import json
import logging

from .. import distributed
from ..artifacts import TorchModel
from ..checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_tokenizer, module_to_change
from ..data import calibration_batches
from ..errors import UserError
from ..linear_layers import conv1d_to_linear
from ..torch_transforms import INT4_WEIGHT_ONLY, int4_linear_class, swap_modules
from .base import StageContext
from .int4_gptq import dequantize, gptq_quantize, rtn_quantize
from .awq import awq_smooth
from .sequential import compress_sequentially

log = logging.getLogger(__name__)


def _targets(module, exclude: list[str]) -> tuple[dict, list[str]]:
    """nn.Linear layers to quantize, and those kept in float because their weight is an embedding's."""
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
    return chosen, tied


def int4_weight_only_torch(config, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    import torch
    from safetensors.torch import save_model

    if artifact.transforms:
        raise UserError("quantize int4-weight-only: the model is already quantized "
                        f"({artifact.transforms[-1]['name']}); quantize once")
    module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
    conv1d_to_linear(module)  # GPT-2's Conv1D layers are quantized as the nn.Linear they equal
    layers, tied = _targets(module, config.exclude)
    if not layers:
        raise UserError("quantize int4-weight-only: no nn.Linear left to quantize after `exclude`")
    group = config.block_size
    grids = {}

    def quantize_layer(name, layer, stats=None) -> None:
        if stats is None:
            codes, scales, zeros = rtn_quantize(layer.weight, group, config.grid())
        else:
            codes, scales, zeros = gptq_quantize(layer.weight, stats.hessian(), group, config.grid(),
                                                 config.dampening, config.act_order)
        grids[name] = (codes, scales, zeros)
        # later blocks are calibrated on the outputs of this layer as it will compute
        layer.weight.copy_(dequantize(codes, scales, zeros, group).to(layer.weight.dtype))

    with torch.no_grad():
        if config.algorithm == "gptq":
            feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path))
            compress_sequentially(module, layers, feeds, artifact.task, "hessian", "quantize int4 gptq",
                                  quantize_layer, ctx.progress)
            if not distributed.leads():
                # Only process 0 quantizes (it holds the codes); the others stop here (pipeline.py): no stage
                # after quantize splits calibration, so nothing reads this process's result.
                return artifact
            ctx.details["calibration_samples"] = config.calibration.samples
        elif config.algorithm == "awq":
            feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path))

            def quantize_block(prefix: str) -> None:
                for name, layer in layers.items():
                    if name.startswith(prefix):
                        quantize_layer(name, layer)
            reductions = awq_smooth(module, layers, feeds, artifact.task, group, config.grid(), quantize_block,
                                    ctx.progress)
            missed = [name for name in layers if name not in grids]
            for name in missed:  # targeted layers outside the balanced groups' blocks: plain rounding
                quantize_layer(name, layers[name])
            ctx.details.update({"calibration_samples": config.calibration.samples,
                                "awq_error_vs_rtn_mean": round(sum(reductions.values()) / max(len(reductions), 1), 4),
                                "awq_groups_scaled": sum(1 for r in reductions.values() if r < 1)})
        else:
            for name in ctx.progress.track(list(layers), len(layers), "quantizing int4 (rtn)"):
                quantize_layer(name, layers[name])
    linear = int4_linear_class()
    names = list(layers)
    grid_of = {id(layers[name]): grids[name] for name in names}
    swap_modules(module, names, lambda old: linear.from_codes(old, *grid_of[id(old)], group))
    out = ctx.workdir / "model"
    out.mkdir()
    copy_checkpoint_files(artifact.path, out)
    save_model(module, str(out / "model.safetensors"), metadata={"format": "pt"})
    transform = {"name": INT4_WEIGHT_ONLY, "layers": names, "group_size": group, "symmetric": config.symmetric,
                 "grid": config.grid(), "stored": True}
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform], module=module.eval())
    ctx.details.update({"backend": "torch", "algorithm": config.algorithm, "block_size": group,
                        "symmetric": config.symmetric, "grid": config.grid(), "quantized_linear_layers": len(names),
                        "kept_in_float": tied, "size_mb_before": round(artifact.size_mb(), 3),
                        "size_mb_after": round(result.size_mb(), 3)})
    if config.algorithm == "gptq":
        ctx.details.update({"act_order": config.act_order, "dampening": config.dampening})
    return result
