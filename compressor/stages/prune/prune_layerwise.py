"""Unstructured pruning layer by layer (layerwise.py): magnitude block by block with no forward pass;
Wanda and SparseGPT through the same sequential walk as the whole-model path, each block read before
its turn and written and dropped after it."""

from __future__ import annotations

from ...checkpoint import copy_checkpoint_files, load_tokenizer
from ...data import calibration_batches
from ...errors import UserError
from ...sparsity import prune_magnitude, select_linears
from ...streamed import LayerwiseModel
from ..blockwise.layerwise import new_writer
from .prune_calibrated import calibrated_layer_pruner, calibrated_layers_pruner
from ..blockwise.sequential import compress_sequentially


def prune_layerwise(config, artifact, ctx) -> tuple:
    """Prune `artifact` block by block into ctx.workdir/model; returns (folder, pruned layer names)."""
    import torch

    if config.scope == "global":
        raise UserError("prune: scope global ranks every weight of the model at once, which layer-by-layer "
                        "execution never holds; use scope per-layer or execution: whole")
    model = LayerwiseModel(artifact.path, artifact.task, ctx.trust_remote_code)
    layers = select_linears(model.module, config.targets, config.ignore)
    outside = [name for name in layers if not name.startswith(model.prefix + ".")]
    if outside and config.method != "magnitude":
        raise UserError(f"prune: {outside[:3]} lie outside the transformer blocks; add them to `ignore`")
    out = ctx.workdir / "model"
    writer = new_writer(out, model.checkpoint.nbytes(), "prune")  # same shapes, same dtype

    def done(index, block):
        model.write(model.block_prefix(index), writer)
        model.drop(block)

    if config.method == "magnitude":
        with torch.no_grad():
            for index in ctx.progress.track(range(len(model.blocks)), len(model.blocks), "prune: block by block"):
                model.load_block(index)
                prune_magnitude({n: l for n, l in layers.items() if n.startswith(model.block_prefix(index))}, config)
                done(index, model.blocks[index])
    else:
        feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path))
        kind, prune_layer = calibrated_layer_pruner(config)
        model.load_embeddings()
        compress_sequentially(model.module, layers, feeds, artifact.task, kind, "prune", prune_layer,
                              progress=ctx.progress, block_loaded=model.load_block, block_done=done,
                              spill_dir=ctx.workdir / "activations", details=ctx.details,
                              compress_together=calibrated_layers_pruner(config))
        ctx.details["calibration_samples"] = config.calibration.samples
    model.load_outside()
    if outside:  # magnitude only (checked above): an output head the recipe chose to prune
        with torch.no_grad():
            prune_magnitude({name: layers[name] for name in outside}, config)
    model.write("", writer, outside=True)
    writer.finish()
    copy_checkpoint_files(artifact.path, out)
    return out, list(layers)
