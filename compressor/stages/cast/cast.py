"""cast: float16 / bfloat16 weights and arithmetic, checked against the float32 model.

- torch: the module cast to the dtype and saved as half-precision safetensors (half the size on
  disk); compress_transforms.json records the cast, so that loading runs the model in that dtype
  (transformers would otherwise be asked for float32 and upcast it);
- ONNX (float16 only): ONNX Runtime's converter (onnxruntime.transformers.float16) rewrites
  initializers and operators to float16, keeping the graph's inputs and outputs float32 where
  `keep_io_types` says so, and leaving in float32 the operators ONNX Runtime's list marks as
  unsafe in float16 plus those in `keep_float32`.

Afterwards both forms are compared with the model they came from on a couple of sentences: the
largest output difference, relative to the largest output magnitude, must stay within `rtol`.

A torch causal LM larger than memory is cast layer by layer (`execution`, cast_layerwise.py): tensors
streamed from its shards, and the comparison run with one transformer block in memory at a time."""

from __future__ import annotations

import json
import logging
from typing import Literal, Optional

from pydantic import Field

from ...artifacts import OnnxModel, TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, module_to_change
from ...errors import StageFailed, UserError
from ...torch_transforms import CAST
from ..base import Stage, StageConfigBase, StageContext, refuse_quantized_checkpoint
from .cast_layerwise import cast_layerwise
from ..export.export_onnx import copy_tokenizer_files, output_difference
from ..blockwise.layerwise import choose_execution

log = logging.getLogger(__name__)

DEFAULT_RTOL = {"float16": 0.01, "bfloat16": 0.05}  # bfloat16 keeps 8 bits of mantissa, float16 11


class CastConfig(StageConfigBase):
    type: Literal["cast"]
    dtype: Literal["float16", "bfloat16"] = Field(description="float16 (torch and ONNX) or bfloat16 (torch)")
    keep_io_types: bool = Field(True, description="ONNX: graph inputs and outputs stay float32 (a Cast at each), "
                                                  "so callers feed and read float32 as before")
    keep_float32: list[str] = Field(default_factory=list,
                                    description="ONNX: operator types left in float32 besides ONNX Runtime's own "
                                                "list (e.g. [LayerNormalization, Softmax] if float16 overflows there)")
    rtol: Optional[float] = Field(None, gt=0, description="largest output difference from the float32 model, as a "
                                                          "share of its largest output magnitude; default 0.01 for "
                                                          "float16, 0.05 for bfloat16")
    execution: Literal["auto", "whole", "layerwise"] = Field(
        "auto", description="torch causal LMs: layerwise streams the weights from the safetensors shards, casts "
                            "and writes them one transformer block at a time (models larger than memory) and "
                            "checks outputs one block at a time; auto chooses it when the float32 model would not "
                            "fit; whole loads the model")


class Cast(Stage):
    type = "cast"
    summary = "Cast weights and arithmetic to float16 (torch, ONNX) or bfloat16 (torch), checked against float32"
    config_model = CastConfig
    accepts = ("torch", "onnx")
    last_only = True

    def check(self, config: CastConfig, input_kind, task):
        if input_kind == "onnx" and config.dtype == "bfloat16":
            return "bfloat16 applies to torch models (ONNX Runtime's CPU kernels run float32 and float16); use " \
                   "float16 for ONNX models"
        if input_kind == "torch" and ("keep_float32" in config.model_fields_set
                                      or "keep_io_types" in config.model_fields_set):
            return "keep_io_types and keep_float32 apply to ONNX models"
        if input_kind == "onnx" and "execution" in config.model_fields_set:
            return "execution applies to torch models"
        return None

    def check_order(self, config, earlier):
        for index, stage in enumerate(earlier):
            if stage.type == "quantize":
                return f"stages[{index}] (quantize) comes first; cast the float model (quantized weights have " \
                       "their own dtype)"
        return None

    def backends(self, config, input_kind):
        return ["onnx", "onnxruntime.transformers.float16"] if input_kind == "onnx" else ["torch"]

    def run(self, config: CastConfig, artifact, ctx: StageContext):
        if isinstance(artifact, OnnxModel):
            out = _cast_onnx(config, artifact, ctx)
            difference, peak = output_difference(artifact, out, ctx)
        else:
            out, difference, peak = _cast_torch(config, artifact, ctx)
        rtol = config.rtol or DEFAULT_RTOL[config.dtype]
        relative = difference / max(peak, 1e-12)
        ctx.details.update({"dtype": config.dtype, "max_abs_diff": difference, "max_abs_reference": peak,
                            "relative_diff": relative, "rtol": rtol, "size_mb_before": round(artifact.size_mb(), 3),
                            "size_mb_after": round(out.size_mb(), 3)})
        if not relative <= rtol:
            raise StageFailed(f"cast {config.dtype}: outputs differ from float32 by {difference:.3g} ({relative:.2%} "
                              f"of the largest output, rtol {rtol:g}); raise rtol if that is acceptable"
                              + ("" if isinstance(artifact, TorchModel) else ", or keep the overflowing operators in "
                                 "float32 with keep_float32"))
        return out


def _cast_torch(config: CastConfig, artifact: TorchModel, ctx: StageContext) -> tuple[TorchModel, float, float]:
    """(the cast model, largest output difference from the float32 model, largest output)."""
    if artifact.transforms:
        raise UserError(f"cast: the model is already transformed ({artifact.transforms[-1]['name']}); cast the float "
                        "model")
    refuse_quantized_checkpoint(artifact, "cast converts")
    execution, why = choose_execution(artifact.path, artifact.task, config.execution, "cast")
    ctx.details.update({"execution": execution, "execution_reason": why})
    if execution == "layerwise":
        return cast_layerwise(config.dtype, artifact, ctx)
    out = _cast_whole(config, artifact, ctx)
    return (out, *output_difference(artifact, out, ctx))


def _cast_whole(config: CastConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    import torch

    module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code).to(getattr(torch, config.dtype))
    _record_cast_share(module, getattr(torch, config.dtype), ctx)
    out = ctx.workdir / "model"
    module.save_pretrained(out, safe_serialization=True)
    copy_checkpoint_files(artifact.path, out)
    transform = {"name": CAST, "dtype": config.dtype}
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    return TorchModel(out, artifact.task, transforms=[transform], module=module.eval())


def _record_cast_share(module, dtype, ctx: StageContext) -> None:
    """The share of the model's floating-point parameters now in `dtype` (each shared tensor once): every one,
    experts' fused tensors included, since `.to()` casts every tensor; a module keeping float32 on purpose
    shows here and in a note rather than as a silent half-cast model."""
    total, cast, kept = 0, 0, []
    for name, parameter in module.named_parameters():  # a tied tensor is listed once
        if not parameter.is_floating_point():
            continue
        total += parameter.numel()
        if parameter.dtype == dtype:
            cast += parameter.numel()
        else:
            kept.append(name)
    ctx.details["cast_parameter_share"] = round(cast / max(total, 1), 4)
    if kept:
        ctx.notes.append(f"cast: {len(kept)} parameter tensors stay {module.get_parameter(kept[0]).dtype} "
                         f"(first: {kept[0]}): their module keeps its own dtype")


def _cast_onnx(config: CastConfig, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(artifact.path))
    try:
        blocked = sorted(set(DEFAULT_OP_BLOCK_LIST) | set(config.keep_float32))
        converted = convert_float_to_float16(model, keep_io_types=config.keep_io_types, op_block_list=blocked)
    except Exception as exc:  # the converter raises bare exceptions and assertions
        raise StageFailed(f"cast float16: ONNX Runtime's converter failed: {type(exc).__name__}: {exc}") from None
    out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
    onnx.save_model(converted, str(out.path), save_as_external_data=artifact.needs_external_data(),
                    location=out.path.name + ".data")
    copy_tokenizer_files(artifact.folder, ctx.workdir)
    return out
