"""Torch int4 weight-only layer by layer (layerwise.py): the model is built empty, each transformer block
is read from the shards when it is its turn, rounded (rtn), or calibrated and rounded (gptq through
the same sequential walk as the whole-model path, awq through the same balancing), swapped for packed
int4 layers, written and dropped. The result is the whole path's layout in shards, which
torch_transforms.load_weight_only_torch loads without building the float model."""

from __future__ import annotations

import json

from ... import distributed
from ...anatomy import describe, excluded_by, record_coverage
from ...artifacts import TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_tokenizer
from ...data import calibration_batches
from .awq import awq_smooth
from ..base import StageContext
from .embedding_tables import quantize_embedding_table
from .int4_layers import (int4_transform, layer_quantizer, layers_quantizer, quantized_targets, record_awq,
                          record_int4, swap_to_int4)
from ...streamed import LayerwiseModel
from ..blockwise.layerwise import new_writer
from ..blockwise.sequential import compress_sequentially

STAGE = "quantize int4-weight-only"


def int4_layerwise(config, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    import torch

    model = LayerwiseModel(artifact.path, artifact.task, ctx.trust_remote_code)
    anatomy = describe(model.module)  # the skeleton's: experts one by one, routers known
    layers, tied = quantized_targets(anatomy, config)
    # The skeleton's head is not tied to its (empty) embeddings as a loaded model's is: ask the config.
    tied += [name for name in layers if model.tied(f"{name}.weight")]
    layers = {name: layer for name, layer in layers.items() if name not in tied}
    outside = [name for name in layers if not name.startswith(model.prefix + ".")]
    # outside the blocks (the head, when asked for): rounded to nearest once the blocks are done
    grids: dict = {}
    quantize_layer = layer_quantizer(config, grids)
    out = ctx.workdir / "model"
    # packed codes and scales take less than the checkpoint's floats: its size bounds the result's
    writer = new_writer(out, model.checkpoint.nbytes(), STAGE)

    def done(index: int, block) -> None:
        if distributed.leads():
            prefix = model.block_prefix(index)
            names = [name for name in layers if name.startswith(prefix)]
            for name in names:
                if name not in grids:  # awq: layers no balanced group covers are rounded plainly
                    quantize_layer(name, layers[name])
            swap_to_int4(model.module, layers, names, grids, config.block_size)
            model.write(prefix, writer)
        model.drop(block)

    with torch.no_grad():
        if config.algorithm == "rtn":
            for index in ctx.progress.track(range(len(model.blocks)), len(model.blocks), f"{STAGE}: block by block"):
                model.load_block(index)
                done(index, model.blocks[index])
        else:
            _calibrate(config, artifact, model, layers, quantize_layer, layers_quantizer(config, grids), done, ctx)
        if not distributed.leads():
            return artifact  # as in the whole path: process 0 writes the result
        model.load_outside()
        for name in outside:
            quantize_layer(name, layers[name])
        swap_to_int4(model.module, layers, outside, grids, config.block_size)
        parts = describe(model.module)  # now that the head is loaded
        head_tied = parts.head is not None and model.tied(f"{parts.head}.weight")
        untied_float_head = next((name for name in tied if not head_tied), None)
        table = quantize_embedding_table(model.module, parts, config, ctx, STAGE, untied_float_head, head_tied)
        model.write("", writer, outside=True)
    writer.finish()
    copy_checkpoint_files(artifact.path, out)
    transform = int4_transform(config, list(layers), table)
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform])
    kept = [name for name in tied if table is None or name != table["head"]]
    record_int4(config, artifact, result, list(layers), kept, ctx)
    record_coverage(anatomy, list(layers), STAGE, ctx, excluded_by(anatomy, layers))
    return result


def _calibrate(config, artifact: TorchModel, model: LayerwiseModel, layers: dict, quantize_layer, together, done,
               ctx: StageContext) -> None:
    feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path))
    model.load_embeddings()
    spill = {"spill_dir": ctx.workdir / "activations", "details": ctx.details}
    layers = {name: layer for name, layer in layers.items() if name.startswith(model.prefix + ".")}
    if config.algorithm == "gptq":
        compress_sequentially(model.module, layers, feeds, artifact.task, "hessian", "quantize int4 gptq",
                              quantize_layer, ctx.progress, block_loaded=model.load_block, block_done=done,
                              compress_together=together, **spill)
        return

    def quantize_block(prefix: str) -> None:
        for name, layer in layers.items():
            if name.startswith(prefix):
                quantize_layer(name, layer)
    record_awq(awq_smooth(model.module, layers, feeds, artifact.task, config.block_size, config.grid(),
                          quantize_block, ctx.progress, block_loaded=model.load_block, block_done=done, **spill), ctx)
