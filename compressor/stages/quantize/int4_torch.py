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

A head tied to the embedding table is not rounded with the blocks: it is quantized with the table
(embedding_tables.py, int8 by default) and computes with the table's codes, or stays float with it
(`embeddings: float`)."""

from __future__ import annotations

import json
import logging

from ... import distributed
from ...anatomy import excluded_by, open_for_compression, record_coverage
from ...artifacts import TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_tokenizer, module_to_change
from ...data import calibration_batches
from ...errors import UserError
from .awq import awq_smooth
from ..base import StageContext
from .embedding_tables import float_parameter_share, quantize_embedding_table
from .int4_layers import (int4_transform, layer_quantizer, layers_quantizer, quantized_targets, record_awq, record_int4,
                          swap_to_int4)
from .int4_layerwise import int4_layerwise
from ..blockwise.layerwise import choose_execution
from ..blockwise.sequential import compress_sequentially, split_by_blocks

log = logging.getLogger(__name__)


def int4_weight_only_torch(config, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    import torch
    from safetensors.torch import save_model

    if artifact.transforms:
        raise UserError("quantize int4-weight-only: the model is already quantized "
                        f"({artifact.transforms[-1]['name']}); quantize once")
    execution, why = choose_execution(artifact.path, artifact.task, config.execution, "quantize int4-weight-only")
    ctx.details.update({"execution": execution, "execution_reason": why})
    if execution == "layerwise":
        return int4_layerwise(config, artifact, ctx)
    module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
    # GPT-2's Conv1D layers are quantized as the nn.Linear they equal, fused experts one by one
    parts = open_for_compression(module)
    layers, tied = quantized_targets(parts, config)
    group = config.block_size
    grids = {}
    quantize_layer = layer_quantizer(config, grids)
    with torch.no_grad():
        if config.algorithm == "gptq":
            feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path))
            inside, outside = split_by_blocks(module, layers)
            compress_sequentially(module, inside, feeds, artifact.task, "hessian", "quantize int4 gptq",
                                  quantize_layer, ctx.progress, spill_dir=ctx.workdir / "activations",
                                  details=ctx.details, all_experts=config.calibration.all_experts,
                                  compress_together=layers_quantizer(config, grids))
            for name, layer in outside.items():  # the head, when asked for: no block's inputs reach it
                quantize_layer(name, layer)
            if not distributed.leads():
                # Only process 0 quantizes (it holds the codes); the others stop here (pipeline.py): no stage
                # after quantize splits calibration, so nothing reads this process's result.
                return artifact
        elif config.algorithm == "awq":
            feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path))

            def quantize_block(prefix: str) -> None:
                for name, layer in layers.items():
                    if name.startswith(prefix):
                        quantize_layer(name, layer)
            record_awq(awq_smooth(module, split_by_blocks(module, layers)[0], feeds, artifact.task, group, config.grid(), quantize_block,
                                  ctx.progress, spill_dir=ctx.workdir / "activations", details=ctx.details,
                                  all_experts=config.calibration.all_experts), ctx)
            missed = [name for name in layers if name not in grids]
            for name in missed:  # layers no balanced group covers (and the head, if asked for): plain rounding
                quantize_layer(name, layers[name])
        else:
            for name in ctx.progress.track(list(layers), len(layers), "quantizing int4 (rtn)"):
                quantize_layer(name, layers[name])
    names = list(layers)
    swap_to_int4(module, layers, names, grids, group)
    untied_float_head = next((name for name in tied if not parts.tied_to_embedding(name)), None)
    table = quantize_embedding_table(module, parts, config, ctx, "quantize int4-weight-only", untied_float_head)
    out = ctx.workdir / "model"
    out.mkdir()
    copy_checkpoint_files(artifact.path, out)
    save_model(module, str(out / "model.safetensors"), metadata={"format": "pt"})
    transform = int4_transform(config, names, table)
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform], module=module.eval())
    kept = [name for name in tied if table is None or name != table["head"]]
    record_int4(config, artifact, result, names, kept, ctx)
    ctx.details["float_parameter_share"] = float_parameter_share(module, parts.total_parameters)
    record_coverage(parts, names, "quantize int4-weight-only", ctx, excluded_by(parts, layers))
    return result
