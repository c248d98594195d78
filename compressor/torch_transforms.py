"""Torch transforms recorded in compress_transforms.json, and their replay when a checkpoint is loaded.

Two kinds: int8-dynamic (torch.ao), kept as the float checkpoint plus a record because packed int8
weights have no safetensors form; and weight-only int8 and int4, whose integer weights and scales
are stored ("stored": true) and loaded into swapped-in layers. The quantize stage writes them; checkpoint.py
replays them, so this module sits below both and imports neither.
"""

from __future__ import annotations

import copy
import fnmatch

import numpy as np

from .anatomy import is_fused_experts, open_for_compression
from .artifacts import TorchModel
from .embeddings import empty_quantized_embedding, tie_head_to_table
from .int4_codes import dequantize_packed, pack_codes, unpack_codes
from .kv_cache import install_fp8_kv
from .errors import UserError
from .linear_layers import conv1d_names
from .shards import read_state
from .w8a8_layers import w8a8_linear_class

INT8_DYNAMIC = "int8-dynamic"
INT8_WEIGHT_ONLY = "int8-weight-only"
INT4_WEIGHT_ONLY = "int4-weight-only"
FP8 = "fp8"              # 8-bit weights and activations (w8a8_layers.W8A8Linear), E4M3
W8A8_INT8 = "w8a8-int8"  # the same layers in int8
EIGHT_BIT_ACTIVATIONS = (FP8, W8A8_INT8)
CAST = "cast"  # float16 / bfloat16: the saved weights are half precision, the record makes loading keep them so


def per_channel_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis` (the output channels)."""
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    peak = np.abs(weight).max(axis=reduce, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return quantized, scale.reshape(-1)


def torch_dynamic_int8(module, transform: dict):
    """torch.ao dynamic int8 of every nn.Linear not excluded; returns (new module, layers quantized)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if transform["per_channel"] else default_dynamic_qconfig
    copied = bool(conv1d_names(module)) or any(is_fused_experts(child) for child in module.modules())
    if copied:  # torch.ao quantizes nn.Linear: GPT-2's Conv1D layers become the Linear they equal and fused
        module = copy.deepcopy(module)  # experts one Linear each, in a copy (the caller's may be a baseline)
    parts = open_for_compression(module)
    names = [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)
             and name in parts.linears and not parts.is_router(name)
             and not any(fnmatch.fnmatchcase(name, p) for p in transform["exclude"])]
    quantized = quantize_dynamic(module, {name: qconfig for name in names}, dtype=torch.qint8, inplace=copied)
    return quantized, len(names)


def apply_torch_transform(module, transform: dict):
    """Replay a transform recorded in compress_transforms.json on a freshly loaded module."""
    import torch

    if transform.get("name") == CAST and transform.get("dtype") in ("float16", "bfloat16"):
        return module.to(getattr(torch, transform["dtype"]))
    if transform.get("name") != INT8_DYNAMIC:
        raise UserError(f"unknown transform {transform!r} in compress_transforms.json")
    return torch_dynamic_int8(module, transform)[0]


def int8_linear_class():
    """The nn.Module class of an int8 weight-only linear layer (a factory, so torch loads on first use)."""
    import torch
    import torch.nn.functional as F

    class Int8WeightOnlyLinear(torch.nn.Module):
        """nn.Linear with an int8 weight and a float scale per output channel; dequantized per call."""

        def __init__(self, in_features: int, out_features: int, bias: bool):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

        @classmethod
        def from_linear(cls, linear):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None)
            quantized, scale = per_channel_int8(linear.weight.detach().float().numpy(), axis=0)
            module.weight_int8.copy_(torch.from_numpy(quantized))
            module.weight_scale.copy_(torch.from_numpy(scale))
            if linear.bias is not None:
                module.bias.data.copy_(linear.bias.detach().float())
            return module

        def dequantized_weight(self, dtype=torch.float32):
            return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

        def forward(self, x):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    return Int8WeightOnlyLinear


def int4_linear_class():
    """The nn.Module class of an int4 weight-only linear layer (a factory, so torch loads on first use)."""
    import torch
    import torch.nn.functional as F

    class Int4WeightOnlyLinear(torch.nn.Module):
        """nn.Linear with 4-bit weight codes (0..15, two per byte, low nibble first along the input
        axis), and per output row and group of `group_size` inputs a float scale and a zero point;
        weight = (code - zero point) * scale, dequantized per call."""

        def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int):
            super().__init__()
            self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
            groups = -(-in_features // group_size)
            self.register_buffer("weight_packed", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8))
            self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=torch.float32))
            self.register_buffer("weight_zero_point", torch.full((out_features, groups), 8, dtype=torch.uint8))
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

        @classmethod
        def from_codes(cls, linear, codes, scales, zeros, group_size: int):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size)
            module.weight_packed.copy_(pack_codes(codes, module.weight_packed.shape[1]))
            module.weight_scale.copy_(scales)
            module.weight_zero_point.copy_(zeros.to(torch.uint8))
            if linear.bias is not None:
                module.bias.data.copy_(linear.bias.detach().float())
            return module

        def codes(self):
            return unpack_codes(self.weight_packed, self.in_features)

        def dequantized_weight(self, dtype=torch.float32):
            return dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point, self.group_size,
                                     self.in_features, dtype)

        def forward(self, x):
            return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    return Int4WeightOnlyLinear


def swap_modules(module, names: list[str], build) -> None:
    """Replace each named submodule by build(old submodule), in place."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, build(getattr(parent, child)))


def _share_tied_embeddings(module) -> None:
    """A tied lm_head and embedding table are stored once, under either name: point both at it."""
    if not getattr(module.config, "tie_word_embeddings", False):
        return
    inputs, outputs = module.get_input_embeddings(), module.get_output_embeddings()
    if inputs is None or outputs is None or not hasattr(outputs, "weight") or not hasattr(inputs, "weight"):
        return  # the head was quantized on its own: nothing is shared
    kept = outputs.weight if inputs.weight.is_meta else inputs.weight
    inputs.weight = outputs.weight = kept


def _empty_quantized_table(module, table: dict, transform: dict) -> None:
    """Swap in the quantized embedding table the transform records, and the head quantized with it, empty
    (the meta device), for the stored codes to be loaded into. A tied head computes with the table module
    (embeddings.TiedQuantizedHead), so loading the table's tensors loads the head's."""
    swap_modules(module, [table["name"]], lambda old: empty_quantized_embedding(old, table))
    head = table["head"]
    if head is None:
        return
    if table["head_tied"]:
        tie_head_to_table(module, head, module.get_submodule(table["name"]))
        return

    def build(old):
        if table["scheme"] == "int4":
            return int4_linear_class()(old.in_features, old.out_features, old.bias is not None, table["group_size"])
        return int8_linear_class()(old.in_features, old.out_features, old.bias is not None)
    if head not in transform["layers"]:
        swap_modules(module, [head], build)


def load_weight_only_torch(artifact: TorchModel, transform: dict, model_cls, trust_remote_code: bool):
    """Rebuild the model (`model_cls`, a transformers Auto class) from its config with empty (meta)
    weights, swap in the int8 or int4 layers, and load the stored tensors in place of the empty ones:
    the float model is never materialised, so loading peaks near the quantized size, not fp32's."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(artifact.path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        module = model_cls.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    open_for_compression(module)  # the quantize stage saved GPT-2's Conv1D layers as nn.Linear, experts one by one
    with torch.device("meta"):  # the quantized layers' tensors too: a tensor missing from the file stays empty
        if transform["name"] == INT4_WEIGHT_ONLY:
            linear4 = int4_linear_class()
            swap_modules(module, transform["layers"], lambda old: linear4(
                old.in_features, old.out_features, old.bias is not None, transform["group_size"]))
        elif transform["name"] in EIGHT_BIT_ACTIVATIONS:
            linear8 = w8a8_linear_class()
            fmt = "fp8" if transform["name"] == FP8 else "int8"
            swap_modules(module, transform["layers"], lambda old: linear8(
                old.in_features, old.out_features, old.bias is not None, fmt, transform["weights"],
                transform["activations"]))
        else:
            linear = int8_linear_class()
            swap_modules(module, transform["layers"],
                         lambda old: linear(old.in_features, old.out_features, old.bias is not None))
        table = transform.get("embeddings")
        if table:
            _empty_quantized_table(module, table, transform)
        if transform.get("kv_cache"):  # scale buffers the state dict fills, and the hooks that use them
            install_fp8_kv(module, transform["kv_cache"]["attention"])
    # One file or shards (a layer-by-layer result keeps float tensors in the checkpoint's dtype)
    # (8-bit float codes stay as they are)
    state = {name: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
             for name, t in read_state(artifact.path).items()}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if not (table and table["head_tied"]):  # a tied quantized head computes with the table module itself
        _share_tied_embeddings(module)
    still_empty = [name for name, tensor in list(module.named_parameters()) + list(module.named_buffers())
                   if tensor.is_meta]
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if still_empty or unexpected:
        raise UserError(f"{artifact.path}: its weights do not match the {transform['name']} layout (missing "
                        f"{(still_empty or missing)[:3]}, unexpected {unexpected[:3]})")
    return module.eval()
