"""merge_lora layer by layer (layerwise.py): the adapters' matrices (small) are read once, then the base
checkpoint is streamed from its shards one block at a time; each targeted weight gets
`weight * scaling * B @ A` added in float32 and is written back in the checkpoint's dtype. The merged
model is then checked against the unmerged one (the update added to each targeted layer's output, as
PEFT runs it) with one block in memory at a time (streamed.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from ...checkpoint import copy_checkpoint_files
from ...errors import StageFailed, UserError
from ..base import StageContext
from ...streamed import LayerwiseModel, largest_difference, streamed_logits
from ..blockwise.layerwise import new_writer, stream_tensors

# LoRA settings whose merge is more than `scaling * B @ A` added to a linear layer's weight. The whole path
# leaves them to PEFT; here they are refused by name. fan_in_fan_out needs nothing: it says GPT-2's Conv1D
# stores inputs x outputs, which the merge below knows from the model (the update added transposed).
UNSUPPORTED = ("use_dora", "modules_to_save", "bias", "lora_bias", "alpha_pattern", "layer_replication",
               "trainable_token_indices", "target_parameters", "use_qalora", "alora_invocation_tokens",
               "megatron_config")
PREFIX = "base_model.model."


def refuse_unsupported(adapters) -> None:
    """Name the first adapter setting layer by layer cannot merge, before any weight is read."""
    for adapter in adapters:
        for field in UNSUPPORTED:
            value = adapter.config.get(field)
            if value and value != "none":  # bias: "none" is the default, "all" / "lora_only" train biases
                raise UserError(f"merge_lora: {adapter.folder}: {field}: {value!r} is not merged layer by layer "
                                "(it is more than scaling * B @ A added to a linear weight); use execution: whole")


def read_updates(adapters) -> dict[str, list[tuple]]:
    """{weight name: [(A, B, scaling), ...]} in adapter order, as float32; scaling includes the adapter's
    weight. r is each layer's own (a rank_pattern gives layers different ranks)."""
    from safetensors.torch import load_file

    updates: dict[str, list[tuple]] = {}
    for adapter in adapters:
        tensors = load_file(str(adapter.weights_file()))
        for key in tensors:
            if not key.endswith((".lora_A.weight", ".lora_B.weight")):
                raise UserError(f"merge_lora: {adapter.folder}: {key} is not a LoRA matrix of a linear layer "
                                "(an embedding, bias or DoRA tensor); layer by layer merges lora_A / lora_B "
                                "pairs only; use execution: whole")
        for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
            layer = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            a, b = tensors[key].float(), tensors[key.replace(".lora_A.", ".lora_B.")].float()
            updates.setdefault(f"{layer}.weight", []).append((a, b, _scaling(adapter, a.shape[0])))
    return updates


def _scaling(adapter, rank: int) -> float:
    """PEFT's lora_alpha / r (rsLoRA: / sqrt(r)), times the recipe's weight for the adapter."""
    alpha = adapter.config.get("lora_alpha", 8)
    return (alpha / math.sqrt(rank) if adapter.config.get("use_rslora") else alpha / rank) * adapter.weight


def merge_layerwise(model: LayerwiseModel, task: str, adapters, inputs: dict, out: Path, ctx: StageContext) -> tuple:
    """Write the merged checkpoint to `out`; returns (largest difference between the merged and the
    unmerged model's logits on `inputs`, largest effect of the adapters on them)."""
    updates = read_updates(adapters)
    missing = sorted(set(updates) - set(model.checkpoint.names()))
    if missing:
        raise UserError(f"merge_lora: the adapters update {missing[:3]}, which the checkpoint does not store (a "
                        "weight tied to the embeddings?); use execution: whole")
    writer = new_writer(out, model.checkpoint.nbytes(), "merge_lora")  # same shapes, same dtype
    stream_tensors(model, writer, lambda name, tensor: _merged(
        name, tensor, updates[name], model.module_of.get(name, name) in model.transposed) if name in updates
        else tensor, ctx.progress, "merge_lora: block by block")
    writer.finish()
    copy_checkpoint_files(model.folder, out)
    return _compare(model.folder, out, task, updates, inputs, ctx)


def _merged(name: str, tensor, parts: list[tuple], inputs_first: bool = False):
    """W + scaling * B @ A for each adapter in turn (transposed for a weight stored inputs x outputs, GPT-2's
    Conv1D), in float32 as the whole path's float32 model merges (PEFT's safe merge: a non-finite result
    stops the stage), stored back in the checkpoint's dtype."""
    import torch

    weight = tensor.to(torch.float32)
    for a, b, scaling in parts:
        update = (b @ a) * scaling
        weight = weight + (update.T if inputs_first else update)
    if not torch.isfinite(weight).all():
        raise StageFailed(f"merge_lora: merging gives non-finite values in {name}; the adapter is broken")
    return weight.to(tensor.dtype)


def _compare(folder: Path, out: Path, task: str, updates: dict, inputs: dict, ctx: StageContext) -> tuple:
    """The whole path's check, each model run with one block in memory at a time: the merged model
    against the unmerged one, whose targeted layers add their update to their output as PEFT's do."""
    plain = _logits(folder, task, inputs, ctx)
    unmerged = _logits(folder, task, inputs, ctx, updates)
    merged = _logits(out, task, inputs, ctx)
    return largest_difference(unmerged, merged)[0], largest_difference(unmerged, plain)[0]


def _logits(folder: Path, task: str, inputs: dict, ctx: StageContext, updates: Optional[dict] = None):
    import torch

    model = LayerwiseModel(folder, task, ctx.trust_remote_code)
    handles = [model.module.get_submodule(name.removesuffix(".weight")).register_forward_hook(
        lambda _layer, args, output, parts=parts: _with_update(args[0], output, parts))
        for name, parts in (updates or {}).items()]
    try:
        return streamed_logits(model, inputs, torch.float32)
    finally:
        for handle in handles:
            handle.remove()


def _with_update(x, output, parts: list[tuple]):
    for a, b, scaling in parts:  # PEFT's unmerged LoRA forward: base(x) + lora_B(lora_A(x)) * scaling
        output = output + (x @ a.T) @ b.T * scaling
    return output
