"""quantize: int8 dynamic (ONNX Runtime for ONNX models, torch.ao for torch models); int8-static,
int8-weight-only, int4-weight-only and nf4 / fp4 (bitsandbytes) live in their own modules, each with
its config class, and are dispatched from here on the class of the stage's config."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from typing import Annotated, Literal, Optional, Union

from pydantic import Field

from ...artifacts import ArtifactKind, OnnxModel, TorchModel
from ...checkpoint import TRANSFORMS_FILE, load_torch_model
from ...errors import UserError
from ...onnx_graph import graph_float_type, match_nodes
from ...torch_transforms import torch_dynamic_int8
from ..base import Stage, StageContext
from .bnb_4bit import Bnb4bitConfig, quantize_bnb_4bit
from ..export.export_onnx import copy_tokenizer_files
from .int4_onnx import Int4WeightOnlyConfig, int4_weight_only_onnx
from .int4_torch import int4_weight_only_torch
from .onnx_static_config import Int8StaticConfig
from .quantize_base import QuantizeConfigBase
from .w8a8 import Fp8Config, W8A8Int8Config, quantize_w8a8
from .weight_only import Int8WeightOnlyConfig, quantize_weight_only

log = logging.getLogger(__name__)

QUANTIZED_ONNX_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM",
                      "QLinearMatMul", "ConvInteger")


class Int8DynamicConfig(QuantizeConfigBase):
    """int8 weights, activations quantized per call at run time (ONNX Runtime or torch.ao)."""

    scheme: Literal["int8-dynamic"] = Field(
        description="int8 weights, activations quantized per call at run time (ONNX and torch)")
    per_channel: bool = Field(True, description="one weight scale per output channel instead of per tensor")
    reduce_range: bool = Field(False, description="ONNX only: 7-bit weights, for CPUs without VNNI where int8 "
                                                  "overflows")
    op_types: Optional[list[str]] = Field(
        None, description="ONNX only: operator types to quantize (e.g. [MatMul, Attention]); default: every "
                          "type ONNX Runtime can quantize dynamically")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if input_kind == "torch" and self.op_types:
            return "op_types applies to ONNX models; for torch models int8 quantizes nn.Linear"
        if input_kind == "torch" and self.reduce_range:
            return "reduce_range applies to ONNX models; torch's dynamic int8 kernels do not use it"
        return None

    def backends(self, input_kind: ArtifactKind) -> list[str]:
        return ["onnxruntime.quantization"] if input_kind == "onnx" else ["torch.ao.quantization"]


# One class per scheme; `scheme` picks the class, so an option of another scheme is an unknown field.
QuantizeConfig = Annotated[
    Union[Int8DynamicConfig, Int8StaticConfig, Int8WeightOnlyConfig, Int4WeightOnlyConfig, Bnb4bitConfig, Fp8Config,
          W8A8Int8Config],
    Field(discriminator="scheme"),
]


class Quantize(Stage):
    type = "quantize"
    summary = ("Quantize: int8 dynamic, static with calibration (ONNX) or weight-only; int4 weight-only (RTN or "
               "GPTQ; HQQ on ONNX); "
               "nf4 / fp4 (torch, bitsandbytes); FP8 and int8 weights with activations (W8A8, torch)")
    config_model = QuantizeConfig
    accepts = ("onnx", "torch")
    needs_calibration = "with scheme int8-static, int4-weight-only with algorithm gptq or awq, w8a8-int8 (smoothing, " \
                        "gptq) or static activations"

    def check(self, config: QuantizeConfigBase, input_kind, task):
        if getattr(config, "kv_cache", "float") != "float" and task != "text-generation":
            return f"kv_cache {config.kv_cache} applies to language models (text-generation), which cache keys " \
                   f"and values; this recipe's task is {task}"
        return config.problem(input_kind)

    def check_order(self, config: QuantizeConfigBase, earlier):
        quantized = [c for c in earlier if c.type == "quantize"]
        if quantized:  # every scheme starts from float weights; quantizing codes again compounds the error
            return f"the model is already quantized by an earlier stage ({quantized[-1].scheme}); quantize once"
        return None

    def backends(self, config: QuantizeConfigBase, input_kind):
        return config.backends(input_kind)

    def unavailable(self, config: QuantizeConfigBase, input_kind):
        return config.unavailable()

    def splits_calibration(self, config: QuantizeConfigBase, input_kind):
        return input_kind == "torch" and config.scheme == "int4-weight-only" and config.algorithm == "gptq"

    def run(self, config: QuantizeConfigBase, artifact, ctx: StageContext):
        return RUNS[type(config)](config, artifact, ctx)


def _int8_dynamic(config: Int8DynamicConfig, artifact, ctx: StageContext):
    if isinstance(artifact, OnnxModel):
        return _quantize_onnx(config, artifact, ctx)
    return _quantize_torch(config, artifact, ctx)


def _int4_weight_only(config: Int4WeightOnlyConfig, artifact, ctx: StageContext):
    if isinstance(artifact, OnnxModel):
        return int4_weight_only_onnx(config, artifact, ctx)
    return int4_weight_only_torch(config, artifact, ctx)


def _int8_static(config: Int8StaticConfig, artifact, ctx: StageContext):
    # Imported here, not at the top: onnx_static subclasses an ONNX Runtime class at import, and
    # `compress stages` and plan() (exit 3 naming the missing backend) must work without onnxruntime.
    from .onnx_static import quantize_static_onnx

    return quantize_static_onnx(config, artifact, ctx)


# What quantizes with each config class; the same classes as QuantizeConfig (a test checks).
RUNS = {Int8DynamicConfig: _int8_dynamic, Int8StaticConfig: _int8_static, Int8WeightOnlyConfig: quantize_weight_only,
        Int4WeightOnlyConfig: _int4_weight_only, Bnb4bitConfig: quantize_bnb_4bit, Fp8Config: quantize_w8a8,
        W8A8Int8Config: quantize_w8a8}


def _quantize_onnx(config: Int8DynamicConfig, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    graph = onnx.load(str(artifact.path), load_external_data=False)
    excluded = match_nodes([node.name for node in graph.graph.node], config.exclude, "exclude")
    out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
    float_type = graph_float_type(graph)
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


def _quantize_torch(config: Int8DynamicConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    if artifact.transforms:
        raise UserError(f"quantize int8-dynamic: the model is already quantized ({artifact.transforms[-1]['name']})")
    transform = {"name": "int8-dynamic", "per_channel": config.per_channel,
                 "reduce_range": config.reduce_range, "exclude": list(config.exclude)}
    module = load_torch_model(artifact, allow_pickle=ctx.allow_pickle, trust_remote_code=ctx.trust_remote_code)
    quantized, count = torch_dynamic_int8(module, transform)
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
