"""Layer by layer: compress a causal LM whose float32 weights do not fit in memory. The model is built
on the meta device (no memory), the tensors outside the transformer blocks (embeddings, final norm,
output head) are read from the checkpoint, and then each block in turn is read from its safetensors
shard, compressed, written to the result's shards in the checkpoint's own dtype and dropped again. The
calibration activations between blocks stay in memory (a few hundred MB even for 7B models at the
calibration sizes recipes use). The result is an ordinary Hugging Face folder: shards of at most
SHARD_BYTES and model.safetensors.index.json.

Used by prune (magnitude, Wanda, SparseGPT) and int8 weight-only quantization when `execution` is
`layerwise`, or `auto` and the float32 weights with the whole-model path's overhead would not fit in
the memory available (`choose_execution`)."""

from __future__ import annotations

import logging
from pathlib import Path

from .. import fit
from ..checkpoint import model_class
from ..errors import UserError
from ..linear_layers import is_conv1d
from ..shards import ShardedCheckpoint, ShardWriter

log = logging.getLogger(__name__)

# The whole-model path holds the float32 model, a copy of it for the baseline, and activations.
WHOLE_MODEL_FACTOR = 3.0
SHARD_BYTES = 512 * 1024 ** 2  # small shards: the writer holds one shard in memory before saving it
TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


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


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim) after each block. Block-sized
    tensors read, converted and written here otherwise fragment the heap, and peak memory grew with depth
    (3.0 GB against 2.4 GB for int8 of a 32-block, 2048-wide model; docs/BENCHMARKS.md). Trimming changes
    no allocator setting, so what runs after the stage in the same process is unaffected."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return
    if libc is not None and hasattr(libc, "malloc_trim"):  # glibc only
        libc.malloc_trim(0)


class LayerwiseModel:
    """A model skeleton on the meta device whose parts are read from the checkpoint when needed."""

    def __init__(self, folder: Path, task: str, trust_remote_code: bool = False):
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoConfig

        self.folder = Path(folder)
        self.checkpoint = ShardedCheckpoint(self.folder)
        self.storage_dtype = getattr(torch, TORCH_DTYPES.get(self.checkpoint.float_dtype(), "float32"))
        config = AutoConfig.from_pretrained(self.folder, trust_remote_code=trust_remote_code)
        # Buffers (rotary frequencies) are computed, not stored: they are built for real, parameters empty.
        with init_empty_weights(include_buffers=False):
            self.module = model_class(task).from_config(config, dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code)
        self.module.eval()
        self.float_names = set(self.module.state_dict())
        self.stored = set(self.checkpoint.names())
        missing = sorted(n for n in self.float_names - self.stored
                         if not self.tied(n) and not n.endswith("rotary_emb.inv_freq"))
        if missing:
            raise UserError(f"{self.folder}: the checkpoint lacks {missing[:3]} (and {max(len(missing) - 3, 0)} "
                            "more) that its config's model has")
        self.prefix, self.blocks = _decoder_blocks(self.module)
        if any(is_conv1d(child) for child in self.module.modules()):
            raise UserError(f"{self.folder}: layer by layer handles nn.Linear models; this one stores its layers as "
                            "GPT-2's Conv1D (use execution: whole)")

    def tied(self, name: str) -> bool:
        """Whether the tensor `name` is a tied copy of the input embeddings (the checkpoint stores it once)."""
        tied = getattr(self.module, "_tied_weights_keys", None) or {}
        return getattr(self.module.config, "tie_word_embeddings", False) and name in tied

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def load(self, names: list[str]) -> None:
        """Read these tensors from the checkpoint into the skeleton, as float32."""
        state = {name: self.checkpoint.tensor(name).float() for name in names}
        self.module.load_state_dict(state, strict=False, assign=True)
        self.checkpoint.close()  # unmap the shards: pages read stay out of the resident set

    def load_block(self, index: int, _block=None) -> None:
        self.load(self.checkpoint.names(self.block_prefix(index)))

    def load_embeddings(self) -> None:
        """The input embeddings alone: all the calibration forward needs before the first block."""
        table = self.module.get_input_embeddings()
        name = next(n for n, child in self.module.named_modules() if child is table)
        self.load([f"{name}.weight"])

    def outside_names(self) -> list[str]:
        return [n for n in self.checkpoint.names() if not n.startswith(self.prefix + ".")]

    def load_outside(self) -> None:
        """Embeddings, final norm and output head: what lies before the first block and after the last."""
        self.load(self.outside_names())
        if getattr(self.module.config, "tie_word_embeddings", False):
            self.module.tie_weights()

    def write(self, prefix: str, writer: ShardWriter, outside: bool = False) -> None:
        """Write the tensors under `prefix` (or all outside the blocks): float tensors the checkpoint held
        go back in its dtype; new tensors (int8 codes and their scales) as they are."""
        for name, tensor in self.module.state_dict().items():
            inside = name.startswith(self.prefix + ".")
            if (outside and inside) or (not outside and not name.startswith(prefix)) or tensor.is_meta:
                continue
            if name in self.float_names and name not in self.stored:
                continue  # a tied copy (lm_head of a model with tied embeddings): transformers ties it on load
            if name in self.stored and tensor.is_floating_point():
                tensor = tensor.to(self.storage_dtype)
            writer.add(name, tensor)

    def drop(self, module) -> None:
        """Release a part's tensors (back to the meta device)."""
        module.to("meta")
        return_freed_memory()


def tensor_groups(model: LayerwiseModel) -> list[list[str]]:
    """The checkpoint's tensor names block by block, then those outside the blocks, for stages that stream
    every tensor through (cast, merge_lora). Only names the model's class holds: the whole-model path saves
    the loaded model's state, which leaves out tensors the class does not know."""
    groups = [model.checkpoint.names(model.block_prefix(index)) for index in range(len(model.blocks))]
    groups.append(model.outside_names())
    return [[name for name in names if name in model.float_names] for names in groups]


def stream_tensors(model: LayerwiseModel, writer: ShardWriter, convert, progress, description: str) -> None:
    """Read every tensor, write `convert(name, tensor)`, one block at a time (cast, merge_lora)."""
    for names in progress.track(tensor_groups(model), len(model.blocks) + 1, description):
        for name in names:
            writer.add(name, convert(name, model.checkpoint.tensor(name)))
        model.checkpoint.close()  # unmap what was read: the resident set stays near one block
        return_freed_memory()


def _decoder_blocks(module):
    import torch

    lists = [(name, child) for name, child in module.named_modules() if isinstance(child, torch.nn.ModuleList)]
    if not lists:
        raise UserError("layer by layer: the model has no repeated blocks (an nn.ModuleList)")
    return max(lists, key=lambda item: len(item[1]))


def new_writer(out: Path, expected_bytes: int, stage: str) -> ShardWriter:
    """A writer for the result, once the disk is known to hold it: refused up front, not after an hour."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    if expected_bytes > free:
        raise UserError(f"{stage}: the result needs about {expected_bytes / 1e9:.1f} GB and {out} has "
                        f"{free / 1e9:.1f} GB free; free some space or give --out on a larger disk")
    return ShardWriter(out, shard_bytes=SHARD_BYTES)
