"""Unstructured pruning layer by layer (layerwise.py): magnitude block by block with no forward pass;
Wanda and SparseGPT through the same sequential walk as the whole-model path, each block read before
its turn and written and dropped after it."""

from __future__ import annotations

from ...checkpoint import copy_checkpoint_files, load_tokenizer
from ...data import calibration_batches
from ...errors import UserError
from ...anatomy import describe, excluded_by, record_coverage
from ...sparsity import layer_sparsity, prune_magnitude
from ...streamed import LayerwiseModel
from ..blockwise.layerwise import new_writer
from .prune_calibrated import calibrated_layer_pruner, calibrated_layers_pruner
from ..blockwise.sequential import compress_sequentially


def prune_layerwise(config, artifact, ctx) -> tuple:
    """Prune `artifact` block by block into ctx.workdir/model; returns (folder, pruned layer names as the files
    name them, and for a model whose experts are stored fused the per-layer zero counts from memory)."""
    import torch

    if config.scope == "global":
        raise UserError("prune: scope global ranks every weight of the model at once, which layer-by-layer "
                        "execution never holds; use scope per-layer or execution: whole")
    model = LayerwiseModel(artifact.path, artifact.task, ctx.trust_remote_code)
    parts = describe(model.module)  # the skeleton's anatomy: experts one by one, routers known
    layers = parts.select(config.targets, config.ignore, "prune", head=True)
    outside = [name for name in layers if not name.startswith(model.prefix + ".")]
    if outside and config.method != "magnitude":
        raise UserError(f"prune: {outside[:3]} lie outside the transformer blocks; add them to `ignore`")
    out = ctx.workdir / "model"
    writer = new_writer(out, model.checkpoint.nbytes(), "prune")  # same shapes, same dtype
    counted: dict[str, tuple[int, int]] = {}

    def done(index, block):  # a float result: under the checkpoint's names, which transformers loads
        prefix = model.block_prefix(index)
        counted.update(layer_sparsity({n: layer for n, layer in layers.items() if n.startswith(prefix)}))
        model.write(prefix, writer, stored_names=True)
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
    counted.update(layer_sparsity({name: layers[name] for name in outside}))
    reached = [name for name, (zeros, size) in counted.items() if zeros >= 0.9 * config.target_sparsity * size]
    record_coverage(parts, reached, "prune", ctx, excluded_by(parts, layers))
    model.write("", writer, outside=True, stored_names=True)
    writer.finish()
    copy_checkpoint_files(artifact.path, out)
    if model.fused_storage:  # experts written back fused: their layers are counted as pruned, in memory
        return out, list(layers), counted
    # the files name each layer as the checkpoint did (Mixtral's experts: block_sparse_moe.experts.N.w1)
    return out, [model.stored_name(f"{name}.weight").removesuffix(".weight") for name in layers], None
