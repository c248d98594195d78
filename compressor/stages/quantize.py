"""quantize: int8 dynamic quantization of ONNX models (ONNX Runtime) and torch models (torch.ao)."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections import Counter
from typing import Literal, Optional

from pydantic import Field

from ..artifacts import OnnxModel, TorchModel
from ..errors import UserError
from .base import Stage, StageConfigBase, StageContext
from .export_onnx import copy_tokenizer_files

log = logging.getLogger(__name__)

QUANTIZED_ONNX_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM",
                      "QLinearMatMul", "ConvInteger")


class QuantizeConfig(StageConfigBase):
    type: Literal["quantize"]
    scheme: Literal["int8-dynamic"] = Field(
        description="int8-dynamic: int8 weights, activations quantized per call at run time")
    per_channel: bool = Field(True, description="one weight scale per output channel instead of per tensor")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where int8 overflows")
    op_types: Optional[list[str]] = Field(
        None, description="ONNX only: operator types to quantize (e.g. [MatMul, Attention]); default: "
                          "every type ONNX Runtime can quantize dynamically")
    exclude: list[str] = Field(
        default_factory=list, description="node names (ONNX) or module names (torch) to keep in float; "
                                          "shell-style patterns such as '*lm_head*'")


class Quantize(Stage):
    type = "quantize"
    summary = "Quantize weights to int8 (ONNX Runtime for ONNX models, torch.ao for torch models)"
    config_model = QuantizeConfig
    accepts = ("onnx", "torch")

    def check(self, config: QuantizeConfig, input_kind, task):
        if input_kind == "torch" and config.op_types:
            return "op_types applies to ONNX models; for torch models int8-dynamic quantizes nn.Linear"
        if input_kind == "torch" and config.reduce_range:
            return "reduce_range applies to ONNX models; torch's dynamic int8 kernels do not use it"
        return None

    def backends(self, config, input_kind):
        return ["onnxruntime.quantization"] if input_kind == "onnx" else ["torch.ao.quantization"]

    def run(self, config: QuantizeConfig, artifact, ctx: StageContext):
        if isinstance(artifact, OnnxModel):
            return _quantize_onnx(config, artifact, ctx)
        return _quantize_torch(config, artifact, ctx)


def _quantize_onnx(config: QuantizeConfig, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(artifact.path), load_external_data=False)
    names = [node.name for node in graph.graph.node]
    excluded = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in config.exclude)]
    unmatched = [p for p in config.exclude if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError(f"quantize.exclude: no node matches {unmatched}; node names look like {names[:3]}")
    out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
    # Fused graphs hold com.microsoft ops (Attention, SkipLayerNormalization) that ONNX shape
    # inference cannot type, so the quantizer would fail on their outputs; give it the float type
    # the graph computes in, read from its first float output.
    float_type = next((o.type.tensor_type.elem_type for o in graph.graph.output
                       if o.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)),
                      onnx.TensorProto.FLOAT)
    quantize_dynamic(artifact.path, out.path, op_types_to_quantize=config.op_types,
                     per_channel=config.per_channel, reduce_range=config.reduce_range,
                     weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                     use_external_data_format=artifact.needs_external_data(),
                     extra_options={"DefaultTensorType": float_type})
    copy_tokenizer_files(artifact.folder, ctx.workdir)
    ops = Counter(node.op_type for node in onnx.load(str(out.path), load_external_data=False).graph.node)
    quantized = {op: ops[op] for op in QUANTIZED_ONNX_OPS if ops[op]}
    if not quantized:
        raise UserError("quantize: ONNX Runtime quantized no node; check op_types and exclude")
    ctx.details.update({"backend": "onnxruntime", "quantized_nodes": quantized, "excluded_nodes": len(excluded),
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(out.size_mb(), 3)})
    return out


def _quantize_torch(config: QuantizeConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    from ..checkpoint import TRANSFORMS_FILE, load_torch_model

    transform = {"name": "int8-dynamic", "per_channel": config.per_channel,
                 "reduce_range": config.reduce_range, "exclude": list(config.exclude)}
    module = load_torch_model(artifact, allow_pickle=ctx.allow_pickle, trust_remote_code=ctx.trust_remote_code)
    quantized, count = _torch_dynamic_int8(module, transform)
    if count == 0:
        raise UserError("quantize: no nn.Linear left to quantize after `exclude`")
    # The artifact is the float checkpoint plus a replayable transform: torch's packed int8 weights
    # have no safetensors form, and dynamic quantization is a deterministic function of the weights.
    out = ctx.workdir / "model"
    shutil.copytree(artifact.path, out)
    transforms = artifact.transforms + [transform]
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": transforms}, indent=2))
    ctx.details.update({"backend": "torch.ao", "quantized_linear_layers": count})
    return TorchModel(out, artifact.task, transforms=transforms, module=quantized)


def _torch_dynamic_int8(module, transform: dict):
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = per_channel_dynamic_qconfig if transform["per_channel"] else default_dynamic_qconfig
    names = [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)
             and not any(fnmatch.fnmatchcase(name, p) for p in transform["exclude"])]
    quantized = quantize_dynamic(module, {name: qconfig for name in names}, dtype=torch.qint8, inplace=False)
    return quantized, len(names)


def apply_torch_transform(module, transform: dict):
    """Replay a transform recorded in compress_transforms.json on a freshly loaded module."""
    if transform.get("name") != "int8-dynamic":
        raise UserError(f"unknown transform {transform!r} in compress_transforms.json")
    return _torch_dynamic_int8(module, transform)[0]
