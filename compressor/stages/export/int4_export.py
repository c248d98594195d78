"""Export of a torch int4 weight-only model to ONNX with its own 4-bit codes.

The exporter traces float layers, so each Int4WeightOnlyLinear is swapped back for an nn.Linear
holding its dequantized weight, and that float copy is exported. Every MatMul whose constant weight
is bit-for-bit one of those dequantized weights (transposed, as the exporter stores it) is then
replaced by ONNX Runtime's MatMulNBits carrying the torch stage's codes, scales and zero points:
the grid GPTQ or AWQ chose is kept, not refitted by ONNX Runtime's round-to-nearest. Both forms
compute (code - zero point) * scale, so ONNX Runtime matches torch to float rounding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ...artifacts import TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, empty_model, module_to_change
from ...anatomy import describe, is_fused_experts, restore_layout
from ...embeddings import dequantized_table
from ...errors import StageFailed, UserError
from ...linear_layers import conv1d_names
from ...torch_transforms import INT4_WEIGHT_ONLY, swap_modules
from .vocabulary_export import (BlockCodes, QuantizedVocabulary, codes_of, initializers, matmul_node,
                                vocabulary_plan, weight_key)


def int4_transform(artifact: TorchModel) -> Optional[dict]:
    """The stored int4 weight-only transform of a torch model (in memory or in its folder), or None."""
    transforms = artifact.transforms
    record = artifact.path / TRANSFORMS_FILE
    if not transforms and record.exists():
        transforms = json.loads(record.read_text()).get("transforms", [])
    if len(transforms) == 1 and transforms[0].get("name") == INT4_WEIGHT_ONLY and transforms[0].get("stored"):
        return transforms[0]
    return None


def write_dequantized_checkpoint(artifact: TorchModel, transform: dict, folder: Path,
                                 ctx) -> tuple[dict[str, tuple], Optional[QuantizedVocabulary]]:
    """Save a float copy of the int4 model (each int4 layer an nn.Linear with its dequantized weight, the
    quantized token table an nn.Embedding of its dequantized rows) to `folder` as a plain safetensors
    checkpoint. Returns, per layer name, (weight key, codes, scales, zero points) as numpy arrays, codes
    N x K; and the quantized table's and head's codes (None when the table is float)."""
    import torch

    skeleton = empty_model(artifact.path, artifact.task, ctx.trust_remote_code)
    if any(is_fused_experts(child) for child in skeleton.modules()):
        raise UserError("export_onnx: the int4 experts of a mixture-of-experts model have no MatMulNBits form in "
                        "the exported graph (it computes the experts as stacked tensors, not one MatMul each); "
                        "write them with export_compressed_tensors, or export the float model")
    conv1d = conv1d_names(skeleton)
    module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
    grids = {}
    with torch.no_grad():
        for name, (quantized, key) in swap_to_float(module, transform["layers"]).items():
            grids[name] = (key, quantized.codes().numpy(), quantized.weight_scale.numpy(),
                           quantized.weight_zero_point.numpy())
        vocabulary, note = _float_table(module, transform.get("embeddings"))
    if note:
        ctx.notes.append(f"export_onnx: {note}")
    # GPT-2's layers back to Conv1D, experts back to their fused tensors: the layout the model's class loads
    # (the exporter then writes a Conv1D as a Gemm or MatMul reading (inputs, outputs), matched below)
    restore_layout(module, describe(module), conv1d)
    folder.mkdir(parents=True)
    module.save_pretrained(folder, safe_serialization=True)
    copy_checkpoint_files(artifact.path, folder)
    return grids, vocabulary


def swap_to_float(module, names: list[str]) -> dict[str, tuple]:
    """Replace each named quantized layer (anything with `dequantized_weight`) by an nn.Linear holding its
    dequantized float32 weight, in place; returns, per name, (the quantized layer, the weight's key)."""
    import torch

    swapped = {}
    with torch.no_grad():
        for name in names:
            parent_name, _, child_name = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            quantized = getattr(parent, child_name)
            weight = quantized.dequantized_weight(torch.float32)
            linear = torch.nn.Linear(quantized.in_features, quantized.out_features, bias=quantized.bias is not None)
            linear.weight.copy_(weight)
            if quantized.bias is not None:
                linear.bias.copy_(quantized.bias)
            setattr(parent, child_name, linear)
            swapped[name] = (quantized, weight_key(weight.numpy()))
    return swapped


def _float_table(module, table: Optional[dict]) -> tuple[Optional[QuantizedVocabulary], Optional[str]]:
    """A quantized embedding table (and the head quantized with it) back to float, their dequantized values,
    for the exporter to trace. Returns the codes pack_vocabulary then puts into the graph in place of the
    float Gather (and of the head's MatMul, where vocabulary_plan says so), or None; and a note on what stays
    float, or None."""
    import torch

    if not table:
        return None, None
    quantized = module.get_submodule(table["name"])
    weight = torch.nn.Parameter(dequantized_table(quantized), requires_grad=False)
    float_table = torch.nn.Embedding(quantized.num_embeddings, quantized.embedding_dim, quantized.padding_idx)
    float_table.weight = weight
    swap_modules(module, [table["name"]], lambda old: float_table)
    lookup, quantized_head, note = vocabulary_plan(table["scheme"], table["head"], table["head_tied"])
    vocabulary = QuantizedVocabulary(table["name"], weight_key(weight.numpy()), codes_of(quantized),
                                     table["scheme"]) if lookup else None
    if table["head"]:
        head = module.get_submodule(table["head"])
        linear = torch.nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        if table["head_tied"]:
            linear.weight = weight
        else:
            linear.weight = torch.nn.Parameter(head.dequantized_weight(torch.float32), requires_grad=False)
        if quantized_head:
            vocabulary.head, vocabulary.head_tied = table["head"], table["head_tied"]
            if not table["head_tied"]:
                vocabulary.head_key, vocabulary.head_codes = weight_key(linear.weight.numpy()), codes_of(head)
        if head.bias is not None:
            linear.bias.copy_(head.bias)
        swap_modules(module, [table["head"]], lambda old: linear)
    return vocabulary, note


def pack_int4_matmuls(model, grids: dict[str, tuple], group_size: int, symmetric: bool) -> int:
    """Replace, in place, each MatMul of `model` whose constant weight is one of `grids`' dequantized
    weights by MatMulNBits with that layer's codes. Every layer must be found once at least."""
    import onnx
    from onnx import helper, numpy_helper

    by_key, names_of = {}, {}
    for name, (key, codes, scales, zeros) in grids.items():  # layers with bit-identical weights share one entry
        by_key[key] = (name, codes, scales, zeros)
        names_of.setdefault(key, []).append(name)
    inits = {i.name: i for i in model.graph.initializer}
    found, replaced = set(), {}
    for index, node in enumerate(model.graph.node):
        gemm = _plain_gemm(node) if node.op_type == "Gemm" else None
        init = inits.get(node.input[1]) if (node.op_type == "MatMul" or gemm) and len(node.input) > 1 else None
        if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            continue
        weight = numpy_helper.to_array(init)
        key = weight_key(weight if gemm == "transposed" else weight.T)  # transB: (outputs, inputs)
        if key not in by_key:
            continue
        _, codes, scales, zeros = by_key[key]
        found.update(names_of[key])
        new, new_inits = pack_matmulnbits(node, codes, scales, None if symmetric else zeros, group_size, None,
                                          prefix=f"{node.input[1]}_{index}")
        if gemm and len(node.input) > 2 and node.input[2]:  # Gemm's bias C: added after the 4-bit product
            product = f"{node.output[0]}_nobias"
            new.output[0] = product
            new = [new, helper.make_node("Add", [product, node.input[2]], list(node.output), name=f"{node.name}_bias")]
        replaced[node.name] = (new, new_inits)
    missing = sorted(set(grids) - found)
    if missing:
        raise StageFailed(f"export_onnx: {len(missing)} int4 layers were not found as MatMul weights in the exported "
                          f"graph (first: {missing[:3]}); the exporter changed their weights")
    swap_matmul_nodes(model, replaced)
    return len(replaced)


def _plain_gemm(node) -> Optional[str]:
    """For a Gemm that is a linear layer, Y = A B^T + C ("transposed": how the exporter writes nn.Linear on
    2-D inputs, OPT's feed-forward layers) or Y = A B + C ("plain": GPT-2's Conv1D), which; else None."""
    from onnx import helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("transA", 0) != 0 or attributes.get("alpha", 1.0) != 1.0 or attributes.get("beta", 1.0) != 1.0:
        return None
    return "transposed" if attributes.get("transB", 0) == 1 else "plain"


def pack_matmulnbits(node, codes: np.ndarray, scales: np.ndarray, zeros, block_size: int,
                     accuracy_level, prefix: str):
    """The MatMulNBits node and its initializers (vocabulary_export.BlockCodes' layout: B [N, blocks,
    block/2] uint8 with the low nibble first, scales [N * blocks], zero points two per byte per row,
    omitted when symmetric, where the operator's default of 8 applies)."""
    blocks = BlockCodes(codes, scales.astype(np.float32), zeros, 4, block_size)
    inits, names = initializers(blocks, prefix)
    return matmul_node(node, blocks, names, accuracy_level), inits


def swap_matmul_nodes(model, replaced: dict[str, tuple]) -> None:
    """Put each new node of `replaced` (old node name -> (new node, its initializers)) in place of
    the old one, in place, and drop the float weights no node reads any more."""
    import onnx

    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    order = []
    for node in model.graph.node:
        if node.name in replaced:
            new, new_inits = replaced[node.name]
            order.extend(new if isinstance(new, list) else [new])
            model.graph.initializer.extend(new_inits)
            readers[node.input[1]] -= 1
        else:
            order.append(node)
    del model.graph.node[:]
    model.graph.node.extend(order)
    unused = [i for i in model.graph.initializer if readers.get(i.name, 1) == 0]
    for init in unused:
        model.graph.initializer.remove(init)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
