"""optimize_onnx: ONNX Runtime's transformer graph optimizer (attention, layer-norm, GELU fusions)."""

from __future__ import annotations

import json
import logging
from typing import Literal

from pydantic import Field

from ...artifacts import OnnxModel
from ...errors import StageFailed
from ..base import Stage, StageConfigBase, StageContext
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
        hf_config = json.loads((artifact.folder / "config.json").read_text())
        if family == "auto":
            hf_type = hf_config.get("model_type", "")
            family = FUSION_FAMILY.get(hf_type, "none")
            if family == "none":
                log.info("no fusion family for model_type %r; applying ONNX Runtime graph passes only", hf_type)
        source, prefused = _prefuse_dynamo_graph(artifact, ctx) if family != "none" else (artifact.path, {})
        # Given, not detected: the optimizer reads head counts from reshape constants, which transformers 5
        # writes as -1, and then fuses nothing.
        heads = hf_config.get("num_attention_heads") or hf_config.get("n_head") or 0
        hidden = hf_config.get("hidden_size") or hf_config.get("n_embd") or 0
        optimized = optimize_model(str(source), model_type="bert" if family == "none" else family,
                                   num_heads=heads, hidden_size=hidden, opt_level=config.level,
                                   only_onnxruntime=family == "none", use_gpu=False)
        out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
        optimized.save_model_to_file(str(out.path), use_external_data_format=artifact.needs_external_data())
        copy_tokenizer_files(artifact.folder, ctx.workdir)
        fused = {k: v for k, v in (optimized.get_fused_operator_statistics() or {}).items() if v}
        for name, count in prefused.items():
            fused[name] = max(fused.get(name, 0), count)
        if source != artifact.path:
            source.unlink()
        diff = max_abs_difference(artifact, out, ctx)
        ctx.details.update({"fusion_family": family, "level": config.level, "fused_operators": fused,
                            "max_abs_diff": diff, "atol": config.atol})
        if not diff <= config.atol:
            raise StageFailed(f"optimize_onnx: outputs changed by {diff:.3g} (atol {config.atol:g}); "
                              "try a lower level or model_type: none")
        return out


# onnxscript's names for its fusions -> the operator each one writes, as ORT's optimizer reports them.
ONNXSCRIPT_FUSIONS = {"attention": "Attention", "skip_layer_normalization": "SkipLayerNormalization",
                      "bias_gelu": "BiasGelu", "gelu": "Gelu", "rms_normalization": "SimplifiedLayerNormalization",
                      "skip_rms_normalization": "SkipSimplifiedLayerNormalization", "gqa": "GroupQueryAttention",
                      "rotary_embedding": "RotaryEmbedding"}


def _prefuse_dynamo_graph(artifact: OnnxModel, ctx: StageContext):
    """A graph from the dynamo exporter: fuse with onnxscript's ONNX Runtime rules first, because ORT's own
    optimizer matches only the TorchScript exporter's attention subgraphs. Returns (graph to optimize, counts)."""
    import onnx

    from .onnx_exporter import exporter_of

    if exporter_of(onnx.load(str(artifact.path), load_external_data=False)) != "dynamo":
        return artifact.path, {}
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(artifact.path))
    result = optimize_for_ort(model)
    counts = result[1] if isinstance(result, tuple) else {}
    fused = {ONNXSCRIPT_FUSIONS[name]: n for name, n in counts.items() if n and name in ONNXSCRIPT_FUSIONS}
    path = ctx.workdir / "prefused.onnx"
    ir.save(model, str(path))
    return path, fused
