"""int8 weight-only quantization: weights stored as int8 with one scale per output channel,
activations and arithmetic stay in float. No calibration; the safe choice for language models,
whose activations carry outliers that per-tensor int8 cannot hold."""

from __future__ import annotations

import copy
import json
import logging
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from ...anatomy import describe, excluded_by, open_for_compression, record_coverage
from ...artifacts import ArtifactKind, OnnxModel, TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_torch_model
from ...errors import UserError
from ...onnx_graph import match_nodes
from ...torch_transforms import INT8_WEIGHT_ONLY, int8_linear_class, per_channel_int8, swap_modules
from ..base import StageContext
from .embedding_tables import float_parameter_share, quantize_embedding_table
from ..export.export_onnx import copy_tokenizer_files
from ...streamed import LayerwiseModel
from ..blockwise.layerwise import choose_execution, new_writer
from .quantize_base import QuantizeConfigBase

log = logging.getLogger(__name__)


class Int8WeightOnlyConfig(QuantizeConfigBase):
    """int8 weights with one scale per output channel, float activations (ONNX and torch)."""

    scheme: Literal["int8-weight-only"] = Field(
        description="int8 weights, one scale per output channel (always), float activations (ONNX and torch)")
    op_types: Optional[list[str]] = Field(
        None, description="ONNX only: operator types to quantize; MatMul is the only one this scheme rewrites, "
                          "so a list without it quantizes nothing; default: [MatMul]")
    execution: Literal["auto", "whole", "layerwise"] = Field(
        "auto", description="torch causal LMs: layerwise reads, quantizes and writes one transformer block at a "
                            "time (models larger than memory); auto chooses it when the float32 model would not "
                            "fit; whole loads the model")
    embeddings: Optional[Literal["int8", "float"]] = Field(
        None, description="torch: the token embedding table. Default int8, one scale per token (a head tied to it "
                          "computes with the same codes); float keeps it")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if input_kind == "onnx" and self.embeddings is not None:
            return "embeddings applies to torch models; on ONNX the embedding Gather stays float"
        if input_kind == "torch" and self.op_types:
            return "op_types applies to ONNX models; for torch models int8-weight-only quantizes nn.Linear"
        if input_kind == "onnx" and self.execution != "auto":
            return "execution applies to torch models"
        return None

    def backends(self, input_kind: ArtifactKind) -> list[str]:
        return ["onnx"] if input_kind == "onnx" else ["safetensors"]


def quantize_weight_only(config: Int8WeightOnlyConfig, artifact, ctx: StageContext):
    if isinstance(artifact, OnnxModel):
        return weight_only_onnx(config, artifact, ctx)
    return weight_only_torch(config, artifact, ctx)


# ---------------------------------------------------------------------------------------------
# ONNX: int8 initializers behind per-axis DequantizeLinear, a standard-ONNX form any runtime reads


def weight_only_onnx(config: Int8WeightOnlyConfig, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(artifact.path))
    excluded = set(match_nodes([node.name for node in model.graph.node], config.exclude, "exclude"))
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    chosen = []
    if "MatMul" in (config.op_types or ["MatMul"]):  # the only operator this scheme rewrites
        for name, init in inits.items():
            users = readers.get(name, [])
            # Only a 2-D float weight read solely as the right-hand side of MatMuls not excluded.
            if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT and users and all(
                    u.op_type == "MatMul" and u.input[1] == name and u.name not in excluded for u in users):
                chosen.append(name)
    if not chosen:
        raise UserError("quantize int8-weight-only: no MatMul with a constant float weight to quantize")
    before_params = 0
    for index, name in enumerate(chosen):
        weight = numpy_helper.to_array(inits[name])
        before_params += weight.size
        quantized, scale = per_channel_int8(weight, axis=1)  # MatMul B is [in, out]
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero_point")])
        model.graph.node.insert(0, helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"], [name],
            name=f"compress_dequantize_{index}", axis=1))
    out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
    external = artifact.needs_external_data()
    onnx.save(model, str(out.path), save_as_external_data=external,
              location=out.path.name + ".data" if external else None)
    copy_tokenizer_files(artifact.folder, ctx.workdir)
    ctx.details.update({"backend": "onnx", "quantized_weights": len(chosen), "quantized_parameters": before_params,
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(out.size_mb(), 3)})
    return out


# ---------------------------------------------------------------------------------------------
# torch: Linear layers swapped for a module holding int8 weights; saved as int8 in safetensors


def weight_only_torch(config: Int8WeightOnlyConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    from safetensors.torch import save_model

    if artifact.transforms:
        raise UserError("quantize int8-weight-only: the model is already quantized "
                        f"({artifact.transforms[-1]['name']}); quantize once")
    execution, why = choose_execution(artifact.path, artifact.task, config.execution, "quantize int8-weight-only")
    ctx.details.update({"execution": execution, "execution_reason": why})
    if execution == "layerwise":
        return weight_only_layerwise(config, artifact, ctx)
    module = load_torch_model(artifact, allow_pickle=ctx.allow_pickle, trust_remote_code=ctx.trust_remote_code)
    module = copy.deepcopy(module)  # the baseline may share the loaded module; it keeps its float weights
    # GPT-2's Conv1D layers are quantized as the nn.Linear they equal, fused experts one by one
    parts = open_for_compression(module)
    chosen = parts.select([], config.exclude, "quantize int8-weight-only", head=True)
    names = list(chosen)
    linear = int8_linear_class()
    swap_modules(module, names, linear.from_linear)
    table = quantize_embedding_table(module, parts, config, ctx, "quantize int8-weight-only")
    out = ctx.workdir / "model"
    out.mkdir()
    copy_checkpoint_files(artifact.path, out)
    # save_model drops the duplicate of tensors that stay shared (a tied head's codes and the table's).
    save_model(module, str(out / "model.safetensors"), metadata={"format": "pt"})
    transform = {"name": INT8_WEIGHT_ONLY, "layers": names, "stored": True, "embeddings": table}
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform], module=module)
    ctx.details.update({"backend": "torch", "quantized_linear_layers": len(names),
                        "float_parameter_share": float_parameter_share(module, parts.total_parameters),
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(result.size_mb(), 3)})
    record_coverage(parts, names, "quantize int8-weight-only", ctx, excluded_by(parts, chosen))
    return result


def weight_only_layerwise(config: Int8WeightOnlyConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    """The same int8 layers, one transformer block at a time (layerwise.py): read, quantize, write, drop."""
    import torch

    model = LayerwiseModel(artifact.path, artifact.task, ctx.trust_remote_code)
    parts = describe(model.module)
    chosen = parts.select([], config.exclude, "quantize int8-weight-only", head=True)
    names = list(chosen)
    linear = int8_linear_class()
    out = ctx.workdir / "model"
    # int8 codes in place of 2- or 4-byte floats, plus a float32 scale per output channel
    writer = new_writer(out, model.checkpoint.nbytes() // model.storage_dtype.itemsize, "quantize int8-weight-only")
    with torch.no_grad():
        table = _quantize_blocks(model, names, linear, writer, config, ctx)
    writer.finish()
    copy_checkpoint_files(artifact.path, out)
    transform = {"name": INT8_WEIGHT_ONLY, "layers": names, "stored": True, "embeddings": table}
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform])
    ctx.details.update({"backend": "torch", "quantized_linear_layers": len(names),
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(result.size_mb(), 3)})
    record_coverage(parts, names, "quantize int8-weight-only", ctx, excluded_by(parts, chosen))
    return result


def _quantize_blocks(model: LayerwiseModel, names: list[str], linear, writer, config: Int8WeightOnlyConfig,
                     ctx: StageContext) -> Optional[dict]:
    for index in ctx.progress.track(range(len(model.blocks)), len(model.blocks), "int8 weight-only: block by block"):
        prefix = model.block_prefix(index)
        model.load_block(index)
        swap_modules(model.module, [n for n in names if n.startswith(prefix)], linear.from_linear)
        model.write(prefix, writer)
        model.drop(model.blocks[index])
    model.load_outside()
    swap_modules(model.module, [n for n in names if not n.startswith(model.prefix + ".")], linear.from_linear)
    parts = describe(model.module)  # now that the head is loaded
    table = quantize_embedding_table(model.module, parts, config, ctx, "quantize int8-weight-only",
                                     head_tied=parts.head is not None and model.tied(f"{parts.head}.weight"))
    model.write("", writer, outside=True)
    return table
