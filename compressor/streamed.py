"""A causal LM held on the meta device, its tensors read from the safetensors shards when needed: the
skeleton the layer-by-layer stages (stages/blockwise/layerwise.py) compress one block at a time, and a forward
pass that reads each block just before it runs and drops it after, for models whose weights do not fit
in memory (the layer-by-layer stages' output checks, and evaluation of such models, runners.py). Peak
memory is one block, the tensors outside the blocks and activations."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .anatomy import (FUSED_EXPERT_TENSORS, architecture_of, blocks_of, expert_module_name, fuse_expert_tensors,
                      fused_experts_layout, is_fused_experts, linearize_experts, split_fused_experts)
from .checkpoint import model_class
from .errors import UserError
from .linear_layers import conv1d_to_linear
from .shards import ShardedCheckpoint, ShardWriter

TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


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
        self.stored = set(self.checkpoint.names())
        self.architecture = architecture_of(self.module)
        # checkpoint name -> module name, and back: they differ where transformers renames on loading
        # (GPT-NeoX's embed_out, Mixtral's block_sparse_moe) and for experts opened one by one
        module_name = checkpoint_renamer(self.module)
        self.module_of = {stored: module_name(stored) for stored in self.stored}
        self.stored_of = {name: stored for stored, name in self.module_of.items()}
        self._open_experts()
        # GPT-2's Conv1D layers become the nn.Linear they equal, as every stage opens them; their weights are
        # stored inputs x outputs, so they are transposed on reading and, for a float result, on writing
        self.transposed = {f"{name}.weight" for name in conv1d_to_linear(self.module)}
        self.float_names = set(self.module.state_dict())  # module names, experts one by one
        missing = sorted(n for n in self.float_names if n not in self.stored_of and self.fused_group(n) is None
                         and not self.tied(n) and not n.endswith("rotary_emb.inv_freq"))
        if missing:
            raise UserError(f"{self.folder}: the checkpoint lacks {missing[:3]} (and {max(len(missing) - 3, 0)} "
                            "more) that its config's model has")
        self.prefix, self.blocks = _decoder_blocks(self.module)

    def _open_experts(self) -> None:
        """Fused experts become one nn.Linear each in the skeleton (anatomy.linearize_experts), as every stage
        opens them. A checkpoint holds them one by one (Qwen3-MoE, Mixtral, DeepSeek: read as they are) or
        fused (GPT-OSS: `fused_storage`, split into experts on reading and fused back for a float result)."""
        fused = {name: fused_experts_layout(child) for name, child in self.module.named_modules()
                 if is_fused_experts(child)}
        self.fused_storage: dict[str, str] = {}  # expert group -> its layout, for groups the checkpoint stores fused
        if not fused:
            return
        for name, layout in fused.items():
            if f"{name}.0.gate_proj.weight" in self.stored_of:
                continue
            if not all(f"{name}.{key}" in self.stored_of for key in FUSED_EXPERT_TENSORS[layout]):
                raise UserError(f"{self.folder}: the experts of {name} are stored neither one by one nor as the "
                                f"{layout} fused tensors {list(FUSED_EXPERT_TENSORS[layout])}; use execution: whole")
            self.fused_storage[name] = layout
        linearize_experts(self.module)

    def fused_group(self, name: str) -> Optional[str]:
        """The expert group stored fused that the module tensor `name` belongs to, or None."""
        head = name.split(".")
        for cut in (len(head) - 3, len(head) - 1):  # group.N.proj.weight (an expert's), group.gate_up_proj
            if cut > 0 and ".".join(head[:cut]) in self.fused_storage:
                return ".".join(head[:cut])
        return None

    def stored_name(self, name: str) -> str:
        return self.stored_of.get(name, name)

    def holds(self, stored: str) -> bool:
        """Whether the checkpoint tensor `stored` is one the model's class has."""
        name = self.module_of.get(stored, stored)
        return name in self.float_names or self.fused_group(name) is not None

    def tied(self, name: str) -> bool:
        """Whether the tensor `name` is a tied copy of the input embeddings (the checkpoint stores it once)."""
        tied = getattr(self.module, "_tied_weights_keys", None) or {}
        return getattr(self.module.config, "tie_word_embeddings", False) and name in tied

    def block_prefix(self, index: int) -> str:
        return f"{self.prefix}.{index}."

    def load(self, names: list[str], dtype=None) -> None:
        """Read these tensors from the checkpoint into the skeleton, as float32 or in `dtype`."""
        import torch

        dtype = dtype or torch.float32
        state, fused = {}, {}
        for name in names:
            module_name = self.module_of.get(name, name)
            tensor = self.checkpoint.tensor(name)
            group = self.fused_group(module_name)
            if group is not None:  # a fused expert tensor: split below, once the group's tensors are all read
                fused.setdefault(group, {})[module_name[len(group) + 1:]] = tensor
                continue
            state[module_name] = (tensor.T.contiguous() if module_name in self.transposed else tensor).to(dtype)
        for group, tensors in fused.items():
            for index, expert in enumerate(split_fused_experts(tensors, self.fused_storage[group])):
                for key, tensor in expert.items():
                    state[f"{group}.{index}.{key}"] = tensor.contiguous().to(dtype)
        self.module.load_state_dict(state, strict=False, assign=True)
        self.checkpoint.close()  # unmap the shards: pages read stay out of the resident set

    def load_block(self, index: int, _block=None) -> None:
        self.load(self.checkpoint.names(self.block_prefix(index)))

    def load_embeddings(self) -> None:
        """What the calibration forward needs before the first block: the tensors outside the blocks but the
        output head's (the token table, and OPT's learned positions and projection, the final norm)."""
        head = self.module.get_output_embeddings()
        head_names = {f"{name}.{key}" for name, child in self.module.named_modules() if child is head
                      for key, _ in child.named_parameters(recurse=False)}
        self.load([name for name in self.outside_names() if self.module_of.get(name, name) not in head_names])

    def outside_names(self) -> list[str]:
        return [n for n in self.checkpoint.names() if not n.startswith(self.prefix + ".")]

    def load_outside(self) -> None:
        """Embeddings, final norm and output head: what lies before the first block and after the last."""
        self.load(self.outside_names())
        if getattr(self.module.config, "tie_word_embeddings", False):
            self.module.tie_weights()

    def write(self, prefix: str, writer: ShardWriter, outside: bool = False, stored_names: bool = False) -> None:
        """Write the tensors under `prefix` (or all outside the blocks): float tensors the checkpoint held
        go back in its dtype; new tensors (int8 codes and their scales) as they are. Named as the module
        names them (the layout compress's quantized loader reads, experts one by one), or with
        `stored_names` as the checkpoint did (a float result, which transformers loads)."""
        state, fused_done = self.module.state_dict(), set()
        for name, tensor in state.items():
            inside = name.startswith(self.prefix + ".")
            if (outside and inside) or (not outside and not name.startswith(prefix)) or tensor.is_meta:
                continue
            group = self.fused_group(name)
            if stored_names and group is not None:  # a float result stores the group fused, as the checkpoint did
                if group not in fused_done:
                    fused_done.add(group)
                    self._write_fused(group, state, writer)
                continue
            stored = self.stored_name(name)
            held = stored in self.stored or group is not None  # a checkpoint tensor, or part of a fused one
            if name in self.float_names and not held:
                continue  # a tied copy (lm_head of a model with tied embeddings): transformers ties it on load
            if held and name in self.float_names and tensor.is_floating_point():
                tensor = tensor.to(self.storage_dtype)
            if stored_names and name in self.transposed:  # back to Conv1D's inputs x outputs
                tensor = tensor.T.contiguous()
            writer.add(stored if stored_names else name, tensor)

    def _write_fused(self, group: str, state: dict, writer: ShardWriter) -> None:
        experts = len(self.module.get_submodule(group))
        keys = [key[len(f"{group}.0."):] for key in state if key.startswith(f"{group}.0.")]
        tensors = fuse_expert_tensors([{key: state[f"{group}.{index}.{key}"] for key in keys}
                                       for index in range(experts)], self.fused_storage[group])
        for key, tensor in tensors.items():
            writer.add(self.stored_name(f"{group}.{key}"), tensor.to(self.storage_dtype).contiguous())

    def drop(self, module) -> None:
        """Release a part's weights (back to the meta device): parameters and stored buffers (int8 and int4
        codes). Buffers computed when the model was built (rotary frequencies) stay, so the skeleton can
        run forward again."""
        import torch

        for part in module.modules():
            for name, param in list(part._parameters.items()):
                if param is not None and not param.is_meta:
                    part._parameters[name] = torch.nn.Parameter(param.to("meta"), requires_grad=False)
            for name, buffer in list(part._buffers.items()):
                if buffer is not None and name not in part._non_persistent_buffers_set:
                    part._buffers[name] = buffer.to("meta")
        return_freed_memory()


def checkpoint_renamer(module):
    """A function from a checkpoint's tensor name to the name the model's module gives it: transformers'
    own renaming rules for this model (those from_pretrained applies), then compress's names for experts
    opened one by one (anatomy.expert_module_name)."""
    architecture = architecture_of(module)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:  # a transformers without conversion rules loads checkpoints under the module's names
        return lambda name: expert_module_name(architecture, name)
    renamings = [rule for rule in get_model_conversion_mapping(module) if isinstance(rule, WeightRenaming)]
    return lambda name: expert_module_name(architecture, apply_renamings(name, renamings))


def _decoder_blocks(module):
    """The anatomy's blocks: the module list holding the most linear layers (not an expert group)."""
    name, blocks = blocks_of(module)
    if blocks is None:
        raise UserError("layer by layer: the model has no repeated blocks (an nn.ModuleList of linear layers)")
    return name, blocks


def streamed_logits(model: LayerwiseModel, inputs: dict, dtype, buffers_in_dtype: bool = True):
    """The logits for `inputs` (as float32), the model held in `dtype`, blocks read in turn and dropped.
    `buffers_in_dtype`: computed buffers (rotary frequencies) in `dtype` too, as a whole model's .to(dtype)
    does (a cast); False keeps them as from_pretrained builds them (float32), for evaluating a checkpoint."""
    import torch

    module = model.module.to(dtype) if buffers_in_dtype else model.module
    model.load(model.outside_names(), dtype)
    if getattr(module.config, "tie_word_embeddings", False):
        module.tie_weights()
    handles = []
    for index, block in enumerate(model.blocks):
        prefix = model.block_prefix(index)
        handles.append(block.register_forward_pre_hook(
            lambda _block, _args, prefix=prefix: model.load(model.checkpoint.names(prefix), dtype)))
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
