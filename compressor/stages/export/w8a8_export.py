"""Export of a torch fp8 model (static activations) to ONNX as standard Q/DQ: the graph TensorRT builds FP8
engines from, and ONNX Runtime evaluates on the CPU (no float8 kernel there: each DequantizeLinear feeds a
float MatMul, slow and exact). w8a8-int8 is refused: INT8_REFUSAL says why.

As for int4 (int4_export.py), each W8A8Linear is swapped back for an nn.Linear holding its dequantized weight
and the float copy is exported; every MatMul whose constant weight is bit for bit one of those weights then
reads it through DequantizeLinear from the 8-bit codes (float8e4m3fn or int8, the scale per output channel
or per tensor), and its input goes through QuantizeLinear -> DequantizeLinear with the layer's calibrated
scale. Opset 19 or later (float8 types). ONNX Runtime's QuantizeLinear saturates and rounds to nearest even
as torch's cast and round do, so the graph computes what compress's simulation computes, up to the order of
float32 sums; the export check compares the two.

Dynamic (per-token) activations have no standard Q/DQ form (a QuantizeLinear scale is a constant or one value
per tensor) and TensorRT's FP8 takes per-tensor activation scales, so they are refused when planning; so are
FP8 block weights (per-block DequantizeLinear needs opset 21's blocked axes, which TensorRT's FP8 path does
not read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ...anatomy import describe, is_fused_experts, restore_layout
from ...artifacts import TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, empty_model, module_to_change
from ...errors import StageFailed, UserError
from ...linear_layers import conv1d_names
from ...torch_transforms import EIGHT_BIT_ACTIVATIONS, FP8
from .int4_export import _plain_gemm, swap_to_float
from .vocabulary_export import weight_key

MIN_OPSET = 19  # float8 QuantizeLinear / DequantizeLinear


INT8_REFUSAL = ("ONNX Runtime fuses int8 Q/DQ MatMuls into u8s8 kernels that saturate on CPUs without AVX-512 "
                "VNNI (on an AVX2 EPYC a test layer came out 15 off in 99), so the export check and the gate would "
                "judge that kernel, not the model; write fp8 for ONNX / TensorRT, export the float model and use "
                "the ONNX int8-static quantizer, or keep the torch result")


def onnx_problem(quantize_config) -> Optional[str]:
    """Why export_onnx cannot follow this fp8 / w8a8-int8 quantize stage, or None."""
    if quantize_config.scheme == "w8a8-int8":
        return f"export_onnx does not write w8a8-int8: {INT8_REFUSAL}"
    if quantize_config.kv_cache != "float":
        return (f"export_onnx does not write an {quantize_config.kv_cache} KV cache (the graph's past key / value "
                "inputs and outputs stay float): set kv_cache: float, or keep the torch result / write "
                "compressed-tensors")
    if quantize_config.activations != "static":
        return (f"export_onnx writes {quantize_config.scheme} as Q/DQ with static activation scales (TensorRT's FP8 "
                "and int8 take per-tensor scales; per-token scales have no standard Q/DQ form): set activations: "
                "static with calibration data, or keep the torch result")
    if getattr(quantize_config, "weights", "channel") == "block":
        return "export_onnx writes fp8 weights per channel or per tensor; block weights have no Q/DQ form TensorRT reads"
    return None


def eight_bit_transform(artifact: TorchModel) -> Optional[dict]:
    """The stored fp8 / w8a8-int8 transform of a torch model (in memory or in its folder), or None."""
    transforms = artifact.transforms
    record = artifact.path / TRANSFORMS_FILE
    if not transforms and record.exists():
        transforms = json.loads(record.read_text()).get("transforms", [])
    if len(transforms) == 1 and transforms[0].get("name") in EIGHT_BIT_ACTIVATIONS and transforms[0].get("stored"):
        return transforms[0]
    return None


def write_dequantized_checkpoint(artifact: TorchModel, transform: dict, folder: Path, ctx) -> dict[str, tuple]:
    """A float copy of the model (each 8-bit layer an nn.Linear holding its dequantized weight) saved to `folder`.
    Returns, per layer, (weight key, codes [out, in], weight scale [out] or [1], input scale)."""
    if transform["name"] != FP8:
        raise UserError(f"export_onnx does not write w8a8-int8: {INT8_REFUSAL}")
    if transform["activations"] != "tensor" or transform["weights"] == "block":
        raise UserError("export_onnx: this 8-bit model has per-token activations or block weights, which have no "
                        "standard Q/DQ form; quantize with activations: static and channel or tensor weights")
    skeleton = empty_model(artifact.path, artifact.task, ctx.trust_remote_code)
    if any(is_fused_experts(child) for child in skeleton.modules()):
        raise UserError("export_onnx: the 8-bit experts of a mixture-of-experts model have no Q/DQ MatMul each in the "
                        "exported graph (it computes the experts as stacked tensors); keep the torch result")
    conv1d = conv1d_names(skeleton)
    module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
    layers = {name: (key, quantized.weight_q.clone(), quantized.weight_scale.reshape(-1).numpy().copy(),
                     float(quantized.input_scale))
              for name, (quantized, key) in swap_to_float(module, transform["layers"]).items()}
    restore_layout(module, describe(module), conv1d)
    folder.mkdir(parents=True)
    module.save_pretrained(folder, safe_serialization=True)
    copy_checkpoint_files(artifact.path, folder)
    return layers


def _code_tensor(codes, name: str, fmt: str):
    """An ONNX initializer of 8-bit codes, laid out as given, in the graph's 8-bit type."""
    import onnx
    import torch
    from onnx import numpy_helper

    codes = codes.contiguous()
    if fmt == "int8":
        return numpy_helper.from_array(codes.numpy(), name)
    raw = codes.view(torch.uint8).numpy().tobytes()  # the E4M3 bytes as they are
    return onnx.helper.make_tensor(name, onnx.TensorProto.FLOAT8E4M3FN, list(codes.shape), raw, raw=True)


def _zero_point(name: str, fmt: str, size: int = 0):
    """Zeros of the 8-bit type: a scalar, or one per channel (`size`), as DequantizeLinear's scale has."""
    import onnx

    kind = onnx.TensorProto.FLOAT8E4M3FN if fmt == "fp8" else onnx.TensorProto.INT8
    return onnx.helper.make_tensor(name, kind, [size] if size else [], [0] * max(size, 1))


def insert_qdq(model, layers: dict[str, tuple], transform: dict) -> int:
    """Rewrite, in place, each MatMul (or linear Gemm) whose constant weight is one of `layers`' dequantized
    weights: weight from 8-bit codes through DequantizeLinear, input through QuantizeLinear -> DequantizeLinear.
    Every layer must be found."""
    import onnx
    from onnx import helper, numpy_helper

    fmt = "fp8" if transform["name"] == FP8 else "int8"
    by_key, names_of = {}, {}
    for name, entry in layers.items():
        by_key[entry[0]] = entry
        names_of.setdefault(entry[0], []).append(name)
    inits = {i.name: i for i in model.graph.initializer}
    found, rewritten, order, unused = set(), 0, [], set()
    for index, node in enumerate(model.graph.node):
        gemm = _plain_gemm(node) if node.op_type == "Gemm" else None
        init = inits.get(node.input[1]) if (node.op_type == "MatMul" or gemm) and len(node.input) > 1 else None
        if init is None or len(init.dims) != 2 or init.data_type != onnx.TensorProto.FLOAT:
            order.append(node)
            continue
        weight = numpy_helper.to_array(init)
        key = weight_key(weight if gemm == "transposed" else weight.T)
        if key not in by_key:
            order.append(node)
            continue
        _, codes, weight_scale, input_scale = by_key[key]
        found.update(names_of[key])
        prefix = f"compress_{fmt}_{index}"
        # the weight as the node reads it: [in, out] for MatMul and plain Gemm, [out, in] for a transB Gemm;
        # per-channel scales run along the outputs' axis
        code_init = _code_tensor(codes if gemm == "transposed" else codes.t(), f"{prefix}_w", fmt)
        axis = 0 if gemm == "transposed" else 1
        per_channel = weight_scale.size > 1  # else one scale: a scalar, ONNX's per-tensor form
        scale_array = weight_scale.astype(np.float32) if per_channel else np.array(weight_scale[0], dtype=np.float32)
        new_inits = [code_init, numpy_helper.from_array(scale_array, f"{prefix}_w_scale"),
                     _zero_point(f"{prefix}_w_zero", fmt, weight_scale.size if per_channel else 0),
                     numpy_helper.from_array(np.array(input_scale, dtype=np.float32), f"{prefix}_x_scale"),
                     _zero_point(f"{prefix}_x_zero", fmt)]
        model.graph.initializer.extend(new_inits)
        weight_out, x_q, x_dq = f"{prefix}_w_dq", f"{prefix}_x_q", f"{prefix}_x_dq"
        dq_attrs = {"axis": axis} if per_channel else {}
        order += [helper.make_node("DequantizeLinear", [f"{prefix}_w", f"{prefix}_w_scale", f"{prefix}_w_zero"],
                                   [weight_out], name=f"{prefix}_weight", **dq_attrs),
                  helper.make_node("QuantizeLinear", [node.input[0], f"{prefix}_x_scale", f"{prefix}_x_zero"], [x_q],
                                   name=f"{prefix}_quantize_input"),
                  helper.make_node("DequantizeLinear", [x_q, f"{prefix}_x_scale", f"{prefix}_x_zero"], [x_dq],
                                   name=f"{prefix}_dequantize_input")]
        unused.add(node.input[1])
        node.input[0], node.input[1] = x_dq, weight_out
        order.append(node)
        rewritten += 1
    missing = sorted(set(layers) - found)
    if missing:
        raise StageFailed(f"export_onnx: {len(missing)} 8-bit layers were not found as MatMul weights in the exported "
                          f"graph (first: {missing[:3]}); the exporter changed their weights")
    del model.graph.node[:]
    model.graph.node.extend(order)
    still_read = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name in unused and i.name not in still_read]:
        model.graph.initializer.remove(init)
    return rewritten
