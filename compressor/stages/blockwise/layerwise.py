"""Layer by layer: compress a causal LM whose float32 weights do not fit in memory. The model is built
on the meta device (streamed.LayerwiseModel), and each transformer block in turn is read from its
safetensors shard, compressed, written to the result's shards in the checkpoint's own dtype and dropped
again; the tensors outside the blocks (embeddings, final norm, output head) are read when the stage
needs them. Calibration activations between blocks stay in memory or go to disk (activations.py). The
result is an ordinary Hugging Face folder: shards of at most SHARD_BYTES and model.safetensors.index.json.

Used by prune (magnitude, Wanda, SparseGPT), int8 and int4 weight-only quantization, cast and
merge_lora when `execution` is `layerwise`, or `auto` and the float32 weights with the whole-model
path's overhead would not fit in the memory available (`choose_execution`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ... import fit
from ...errors import UserError
from ...shards import ShardedCheckpoint, ShardWriter
from ...streamed import LayerwiseModel, return_freed_memory

log = logging.getLogger(__name__)

# The whole-model path holds the float32 model, a copy of it for the baseline, and activations.
WHOLE_MODEL_FACTOR = 3.0
SHARD_BYTES = 512 * 1024 ** 2  # small shards: the writer holds one shard in memory before saving it


def choose_execution(folder: Path, task: str, requested: str, stage: str) -> tuple[str, str]:
    """("whole" or "layerwise", why)."""
    if requested == "whole":
        return "whole", "asked for (execution: whole)"
    if task != "text-generation":
        if requested == "layerwise":
            raise UserError(f"{stage}: execution layerwise applies to causal LMs (task text-generation), whose "
                            "blocks run one after another")
        return "whole", f"layer by layer applies to causal LMs, not {task}"
    if requested == "layerwise":
        return "layerwise", "asked for (execution: layerwise)"
    if not any(Path(folder).glob("*.safetensors")):
        return "whole", "layer by layer reads safetensors shards; this checkpoint has none"
    checkpoint = ShardedCheckpoint(folder)
    need, available = fit.parameter_count(checkpoint) * 4 * WHOLE_MODEL_FACTOR, fit.memory_available()
    if available and need > available:
        return "layerwise", (f"float32 weights x {WHOLE_MODEL_FACTOR:g} = {need / 1e9:.1f} GB, more than the "
                             f"{available / 1e9:.1f} GB available")
    return "whole", f"float32 weights x {WHOLE_MODEL_FACTOR:g} = {need / 1e9:.1f} GB fit in memory"


def tensor_groups(model: LayerwiseModel) -> list[list[str]]:
    """The checkpoint's tensor names block by block, then those outside the blocks, for stages that stream
    every tensor through (cast, merge_lora). Only names the model's class holds: the whole-model path saves
    the loaded model's state, which leaves out tensors the class does not know."""
    groups = [model.checkpoint.names(model.block_prefix(index)) for index in range(len(model.blocks))]
    groups.append(model.outside_names())
    return [[name for name in names if model.holds(name)] for names in groups]


def stream_tensors(model: LayerwiseModel, writer: ShardWriter, convert, progress, description: str) -> None:
    """Read every tensor, write `convert(name, tensor)`, one block at a time (cast, merge_lora)."""
    for names in progress.track(tensor_groups(model), len(model.blocks) + 1, description):
        for name in names:
            writer.add(name, convert(name, model.checkpoint.tensor(name)))
        model.checkpoint.close()  # unmap what was read: the resident set stays near one block
        return_freed_memory()


def new_writer(out: Path, expected_bytes: int, stage: str) -> ShardWriter:
    """A writer for the result, once the disk is known to hold it: refused up front, not after an hour."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if expected_bytes > free:
        raise UserError(f"{stage}: the result needs about {expected_bytes / 1e9:.1f} GB and {out} has "
                        f"{free / 1e9:.1f} GB free; free some space or give --out on a larger disk")
    return ShardWriter(out, shard_bytes=SHARD_BYTES)
