"""optimize_onnx: ONNX Runtime's transformer graph optimizer (attention, layer-norm, GELU fusions)."""

from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import Field

from ..artifacts import OnnxModel
from ..errors import StageFailed
from .base import Stage, StageConfigBase, StageContext
from .export_onnx import copy_tokenizer_files, max_abs_difference

log = logging.getLogger(__name__)

# Hugging Face model_type -> the ORT optimizer's fusion family. Others get ORT graph passes only.
FUSION_FAMILY = {"bert": "bert", "roberta": "bert", "distilbert": "bert", "xlm-roberta": "bert",
                 "electra": "bert", "mpnet": "bert", "gpt2": "gpt2", "gpt_neox": "gpt_neox",
                 "phi": "phi", "qwen3": "qwen3", "bart": "bart", "t5": "t5", "vit": "vit"}


class OptimizeOnnxConfig(StageConfigBase):
    type: Literal["optimize_onnx"]
    level: Literal[0, 1, 2, 99] = Field(
        1, description="ONNX Runtime graph optimization level applied offline: 0 fusions only, 1 basic, "
                       "2 extended, 99 all (2 and 99 add CPU-specific ops that quantization may not handle)")
    model_type: Literal["auto", "bert", "gpt2", "gpt_neox", "phi", "qwen3", "bart", "t5", "vit", "none"] = Field(
        "auto", description="fusion family; auto reads config.json; none applies ORT graph passes only")
    atol: float = Field(1e-3, gt=0, description="max abs difference allowed between the graph before and after")


class OptimizeOnnx(Stage):
    type = "optimize_onnx"
    summary = "Fuse transformer subgraphs with ONNX Runtime's optimizer and check outputs are unchanged"
    config_model = OptimizeOnnxConfig
    accepts = ("onnx",)

    def backends(self, config, input_kind):
        return ["onnxruntime.transformers.optimizer"]

    def run(self, config: OptimizeOnnxConfig, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
        from onnxruntime.transformers.optimizer import optimize_model

        family = config.model_type
        if family == "auto":
            hf_type = json.loads((artifact.folder / "config.json").read_text()).get("model_type", "")
            family = FUSION_FAMILY.get(hf_type, "none")
            if family == "none":
                log.info("no fusion family for model_type %r; applying ONNX Runtime graph passes only", hf_type)
        optimized = optimize_model(str(artifact.path), model_type="bert" if family == "none" else family,
                                   opt_level=config.level, only_onnxruntime=family == "none", use_gpu=False)
        out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
        optimized.save_model_to_file(str(out.path), use_external_data_format=artifact.needs_external_data())
        copy_tokenizer_files(artifact.folder, ctx.workdir)
        fused = {k: v for k, v in (optimized.get_fused_operator_statistics() or {}).items() if v}
        diff = max_abs_difference(artifact, out, ctx)
        ctx.details.update({"fusion_family": family, "level": config.level, "fused_operators": fused,
                            "max_abs_diff": diff, "atol": config.atol})
        if not diff <= config.atol:
            raise StageFailed(f"optimize_onnx: outputs changed by {diff:.3g} (atol {config.atol:g}); "
                              "try a lower level or model_type: none")
        return out
