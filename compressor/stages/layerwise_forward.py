"""A causal LM's logits computed with one transformer block in memory at a time, so that a stage running
layer by layer (layerwise.py) can still compare its result with the model it came from: the model's own
forward runs on the meta-device skeleton, and hooks read each block from its shard just before the block
runs and drop it right after. Peak memory is one block, the tensors outside the blocks and activations."""

from __future__ import annotations

from .layerwise import LayerwiseModel


def load_as(model: LayerwiseModel, names: list[str], dtype) -> None:
    """Read these tensors into the skeleton in `dtype` (LayerwiseModel.load always upcasts to float32)."""
    state = {name: model.checkpoint.tensor(name).to(dtype) for name in names}
    model.module.load_state_dict(state, strict=False, assign=True)
    model.checkpoint.close()


def streamed_logits(model: LayerwiseModel, inputs: dict, dtype):
    """The logits for `inputs` (as float32), the model held in `dtype`, blocks read in turn and dropped."""
    import torch

    module = model.module.to(dtype)  # buffers too (rotary frequencies), as a whole model's .to(dtype) does
    load_as(model, model.outside_names(), dtype)
    if getattr(module.config, "tie_word_embeddings", False):
        module.tie_weights()
    handles = []
    for index, block in enumerate(model.blocks):
        prefix = model.block_prefix(index)
        handles.append(block.register_forward_pre_hook(
            lambda _block, _args, prefix=prefix: load_as(model, model.checkpoint.names(prefix), dtype)))
        handles.append(block.register_forward_hook(lambda block, _args, _output: model.drop(block)))
    try:
        with torch.no_grad():
            return module(**inputs, use_cache=False).logits.float()
    finally:
        for handle in handles:
            handle.remove()
        model.drop(module)


def largest_difference(reference, candidate, mask=None) -> tuple[float, float]:
    """(largest |reference - candidate|, largest |reference|), over the real tokens where a mask is given:
    padding positions' outputs are undefined."""
    if mask is not None:
        reference, candidate = reference[mask.bool()], candidate[mask.bool()]
    return float((reference - candidate).abs().max()), float(reference.abs().max())
