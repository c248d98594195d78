"""quantize: int8 dynamic (ONNX Runtime for ONNX models, torch.ao for torch models); int8-static,
int8-weight-only, int4-weight-only and nf4 / fp4 (bitsandbytes) live in their own modules and are
dispatched from here."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections import Counter
from typing import Literal, Optional

from pydantic import Field

from ..artifacts import OnnxModel, TorchModel
from ..data import CalibrationConfig
from ..errors import UserError
from .base import Stage, StageConfigBase, StageContext
from .export_onnx import copy_tokenizer_files

log = logging.getLogger(__name__)

QUANTIZED_ONNX_OPS = ("MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM",
                      "QLinearMatMul", "ConvInteger")


STATIC_ONLY = ("method", "percentile", "activation_type", "activation_symmetric", "include",
               "quantize_outputs", "smooth_alpha", "preprocess", "fallback")
INT4_ONLY = ("algorithm", "block_size", "symmetric", "accuracy_level")
BNB_ONLY = ("double_quant", "compute_dtype")
BNB_SCHEMES = ("nf4", "fp4")


class FallbackConfig(StageConfigBase):
    """Accuracy-aware fallback for int8-static: keep the most harmful nodes in float."""

    max_nodes: int = Field(ge=1, description="at most this many nodes are left in float")
    min_cosine: float = Field(
        0.99, gt=0, le=1, description="stop once the worst calibration sample's output cosine against fp32 "
                                      "reaches this")


class QuantizeConfig(StageConfigBase):
    type: Literal["quantize"]
    scheme: Literal["int8-dynamic", "int8-static", "int8-weight-only", "int4-weight-only", "nf4", "fp4"] = Field(
        description="int8-dynamic: int8 weights, activations quantized per call at run time; int8-static: "
                    "int8 weights and activations with ranges from calibration data (ONNX, QDQ); "
                    "int8-weight-only: int8 weights per output channel, float activations (ONNX and torch); "
                    "int4-weight-only: 4-bit weights in blocks, float activations (ONNX, MatMulNBits); "
                    "nf4 / fp4: 4-bit normal-float / float weights in blocks of 64 through bitsandbytes "
                    "(torch), saved as a Hugging Face folder that from_pretrained reloads")
    per_channel: bool = Field(True, description="one weight scale per output channel instead of per tensor "
                                                "(int8-weight-only is always per channel)")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where int8 overflows")
    op_types: Optional[list[str]] = Field(
        None, description="ONNX only: operator types to quantize (e.g. [MatMul, Attention]); default: every "
                          "type ONNX Runtime can quantize dynamically; [MatMul] for int8-static and "
                          "int8-weight-only")
    exclude: list[str] = Field(
        default_factory=list, description="node names (ONNX) or module names (torch) to keep in float; "
                                          "shell-style patterns such as '*lm_head*' (nf4 / fp4 always keep "
                                          "the output head, lm_head or classifier, in float)")
    calibration: Optional[CalibrationConfig] = Field(
        None, description="int8-static: the samples activation ranges are measured on; int4-weight-only with "
                          "algorithm gptq: the samples whose layer inputs guide rounding (see Calibration data)")
    # int4-weight-only only
    algorithm: Literal["rtn", "gptq", "hqq"] = Field(
        "rtn", description="int4-weight-only: rtn rounds each block to nearest; gptq compensates rounding "
                           "error with calibration data; hqq optimises each block's scale and zero point")
    block_size: int = Field(32, description="int4-weight-only: input rows sharing one scale (16, 32, 64, 128 "
                                            "or 256); smaller is more accurate and larger on disk")
    symmetric: bool = Field(False, description="int4-weight-only, rtn and gptq: no zero point (hqq always "
                                               "uses one)")
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]] = Field(
        None, description="int4-weight-only, rtn and gptq: MatMulNBits compute type on CPU: 0 or unset as "
                          "the graph (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest, least exact)")
    # nf4 / fp4 only
    double_quant: bool = Field(True, description="nf4 / fp4: quantize the per-block scales too (8-bit, blocks "
                                                 "of 256), saving about 0.4 bits per weight")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="nf4 / fp4: the type weights are dequantized to for each matmul; float32 on "
                               "CPUs, bfloat16 or float16 on GPUs")
    # int8-static only
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="int8-static: how a range is chosen from the calibration activations")
    percentile: float = Field(99.999, gt=50, le=100, description="int8-static, method percentile: the percentile "
                                                                 "of |activation| kept inside the range")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="int8-static: activation type; uint8 is the fast path on x86 CPUs (u8s8 kernels)")
    activation_symmetric: bool = Field(False, description="int8-static: zero point fixed at 0 for activations")
    include: list[str] = Field(
        default_factory=list, description="int8-static: quantize only nodes matching these patterns")
    quantize_outputs: bool = Field(
        False, description="int8-static: also quantize the outputs of quantized operators (off: their outputs "
                           "carry transformer outliers into the residual stream)")
    smooth_alpha: Optional[float] = Field(
        None, ge=0, le=1, description="int8-static: SmoothQuant strength; moves activation outliers into the "
                                      "weights before calibration (0.5 to 0.9; off when unset)")
    preprocess: bool = Field(True, description="int8-static: type every tensor with ONNX Runtime's shape "
                                               "inference first (needed for fused graphs)")
    fallback: Optional[FallbackConfig] = Field(
        None, description="int8-static: leave the most harmful nodes in float until the output cosine on "
                          "calibration data reaches a target")


class Quantize(Stage):
    type = "quantize"
    summary = ("Quantize: int8 dynamic, static with calibration (ONNX) or weight-only; int4 weight-only (ONNX); "
               "nf4 / fp4 (torch, bitsandbytes)")
    config_model = QuantizeConfig
    accepts = ("onnx", "torch")
    needs_calibration = "with scheme int8-static, or int4-weight-only with algorithm gptq"

    def check(self, config: QuantizeConfig, input_kind, task):
        for schemes, fields in ((("int8-static",), STATIC_ONLY), (("int4-weight-only",), INT4_ONLY),
                                (BNB_SCHEMES, BNB_ONLY)):
            given = sorted(set(fields) & config.model_fields_set)
            if config.scheme not in schemes and given:
                return f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to {' / '.join(schemes)} only"
        if config.scheme in BNB_SCHEMES:
            if input_kind == "onnx":
                return (f"{config.scheme} quantizes torch models through bitsandbytes; for a 4-bit ONNX model "
                        "use scheme int4-weight-only after export_onnx")
            given = sorted({"per_channel", "reduce_range", "op_types"} & config.model_fields_set)
            if given:
                return f"{', '.join(given)} do not apply to nf4 / fp4 (bitsandbytes scales blocks of 64 weights)"
        gptq = config.scheme == "int4-weight-only" and config.algorithm == "gptq"
        if config.calibration is not None and config.scheme != "int8-static" and not gptq:
            return "calibration applies to int8-static and to int4-weight-only with algorithm gptq"
        if config.scheme == "int4-weight-only":
            if input_kind == "torch":
                return "int4-weight-only quantizes ONNX models; add an export_onnx stage before it"
            if gptq and config.calibration is None:
                return "algorithm gptq needs `calibration:` data"
            if config.block_size not in (16, 32, 64, 128, 256):
                return f"block_size must be 16, 32, 64, 128 or 256 (got {config.block_size})"
            if config.algorithm == "hqq" and "symmetric" in config.model_fields_set:
                return "symmetric applies to rtn and gptq; hqq always fits a zero point"
            if config.algorithm == "hqq" and "accuracy_level" in config.model_fields_set:
                return "accuracy_level applies to rtn and gptq; ONNX Runtime's hqq quantizer does not set it"
        if config.scheme == "int8-static":
            if input_kind == "torch":
                return "int8-static quantizes ONNX models; add an export_onnx stage before it"
            if config.calibration is None:
                return "int8-static needs `calibration:` data to measure activation ranges"
            if config.method != "minmax" and config.calibration.padding != "max_length":
                return (f"method {config.method} builds histograms that need equal-shaped batches; "
                        "set calibration.padding: max_length")
        if input_kind == "torch" and config.op_types:
            return "op_types applies to ONNX models; for torch models int8 quantizes nn.Linear"
        if input_kind == "torch" and config.reduce_range:
            return "reduce_range applies to ONNX models; torch's dynamic int8 kernels do not use it"
        return None

    def check_order(self, config: QuantizeConfig, earlier):
        quantized = [c for c in earlier if c.type == "quantize"]
        if quantized and config.scheme in BNB_SCHEMES:
            return f"the model is already quantized by an earlier stage ({quantized[-1].scheme}); nf4 / fp4 " \
                   "quantize float weights"
        return None

    def backends(self, config, input_kind):
        if config.scheme in BNB_SCHEMES:
            return ["bitsandbytes", "accelerate"]
        if config.scheme == "int4-weight-only":
            return ["onnxruntime.quantization.matmul_nbits_quantizer"]
        if config.scheme == "int8-weight-only":
            return ["onnx"] if input_kind == "onnx" else ["safetensors"]
        return ["onnxruntime.quantization"] if input_kind == "onnx" else ["torch.ao.quantization"]

    def unavailable(self, config, input_kind):
        if config.scheme in BNB_SCHEMES:
            from .bnb_4bit import bnb_unavailable

            return bnb_unavailable()
        return None

    def run(self, config: QuantizeConfig, artifact, ctx: StageContext):
        if config.scheme in BNB_SCHEMES:
            from .bnb_4bit import quantize_bnb_4bit

            return quantize_bnb_4bit(config, artifact, ctx)
        if config.scheme == "int4-weight-only":
            from .int4_onnx import int4_weight_only_onnx

            return int4_weight_only_onnx(config, artifact, ctx)
        if config.scheme == "int8-static":
            from .onnx_static import quantize_static_onnx

            return quantize_static_onnx(config, artifact, ctx)
        if config.scheme == "int8-weight-only":
            from .weight_only import weight_only_onnx, weight_only_torch

            if isinstance(artifact, OnnxModel):
                return weight_only_onnx(config, artifact, ctx)
            return weight_only_torch(config, artifact, ctx)
        if isinstance(artifact, OnnxModel):
            return _quantize_onnx(config, artifact, ctx)
        return _quantize_torch(config, artifact, ctx)


def match_nodes(names: list[str], patterns: list[str], field: str) -> list[str]:
    """Node names matching any pattern; a pattern that matches nothing is a recipe error."""
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError(f"quantize.{field}: no node matches {unmatched}; node names look like {names[:3]}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def graph_float_type(model) -> int:
    """The float type a graph computes in, read from its first float output. Fused graphs hold
    com.microsoft ops (Attention, SkipLayerNormalization) that ONNX shape inference cannot type;
    ONNX Runtime's quantizers take this as the type of such untyped tensors."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return next((o.type.tensor_type.elem_type for o in model.graph.output
                 if o.type.tensor_type.elem_type in floats), onnx.TensorProto.FLOAT)


def _quantize_onnx(config: QuantizeConfig, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
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


def _quantize_torch(config: QuantizeConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    from ..checkpoint import TRANSFORMS_FILE, load_torch_model

    if artifact.transforms:
        raise UserError(f"quantize int8-dynamic: the model is already quantized ({artifact.transforms[-1]['name']})")
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
