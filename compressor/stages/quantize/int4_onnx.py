"""int4 weight-only quantization of ONNX MatMul weights into ONNX Runtime's MatMulNBits operator
(com.microsoft): 4-bit weights in blocks of `block_size` input rows, one scale (and zero point
unless symmetric) per block; activations stay in float.

Algorithms:
- rtn: round to nearest per block (ONNX Runtime's default MatMulNBits quantizer);
- hqq: half-quadratic optimisation of each block's scale and zero point, no data (Badri & Shaji,
  2023; ONNX Runtime's implementation).
GPTQ and AWQ run on the torch model (int4_torch.py), before export_onnx, which writes their codes
into MatMulNBits (int4_export.py); int4_gptq.py says why not on the ONNX graph."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal, Optional

from pydantic import Field

from ...artifacts import ArtifactKind, OnnxModel
from ...data import CalibrationConfig
from ...errors import StageFailed, UserError
from ...onnx_graph import match_nodes
from ..base import StageContext
from ..export.export_onnx import copy_tokenizer_files
from .quantize_base import QuantizeConfigBase

log = logging.getLogger(__name__)


class Int4WeightOnlyConfig(QuantizeConfigBase):
    """4-bit weights in blocks, float activations (ONNX Runtime's MatMulNBits, or torch)."""

    scheme: Literal["int4-weight-only"] = Field(
        description="4-bit weights in blocks, float activations (ONNX: ONNX Runtime's MatMulNBits; torch: packed "
                    "codes dequantized per call)")
    algorithm: Literal["rtn", "gptq", "awq", "hqq"] = Field(
        "rtn", description="rtn rounds each block to nearest; gptq (torch) compensates rounding error with "
                           "calibration data, one transformer block at a time on the outputs of the blocks already "
                           "quantized; awq (torch, Llama-style blocks) scales the input channels with the largest "
                           "activations up before rounding; hqq (ONNX) optimises each block's scale and zero point. "
                           "gptq and awq reach ONNX through export_onnx, which keeps their codes")
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="input rows sharing one scale; smaller is more accurate and larger on disk")
    symmetric: bool = Field(False, description="rtn, gptq and awq: no zero point (hqq always uses one)")
    symmetric_grid: Literal["signed-max", "absmax"] = Field(
        "signed-max", description="symmetric torch rtn, gptq and awq: signed-max puts each block's "
                                  "largest-magnitude weight exactly on code 0 and uses all 16 codes (ONNX Runtime's "
                                  "rtn grid, which ONNX rtn always uses); absmax spreads +-max|w| over 15 steps "
                                  "around code 8 (the GPTQ reference's and compressed-tensors' grid)")
    accuracy_level: Optional[Literal[0, 1, 2, 3, 4]] = Field(
        None, description="ONNX rtn: MatMulNBits compute type on CPU: 0 or unset as the graph (fp32), "
                          "1 fp32, 2 fp16, 3 bf16, 4 int8 activations (fastest, least exact)")
    act_order: bool = Field(False, description="gptq: quantize columns by decreasing Hessian diagonal (inputs with "
                                               "the most energy first); block grids are then fitted up front")
    dampening: float = Field(0.01, gt=0, lt=1, description="gptq: added to the Hessian diagonal, as a share of its "
                                                           "mean, so that it can be inverted")
    calibration: Optional[CalibrationConfig] = Field(
        None, description="algorithms gptq and awq only, and required there: the samples whose layer inputs guide "
                          "rounding (see Calibration data)")
    quantize_head: Optional[bool] = Field(
        None, description="torch: quantize an untied output head (lm_head) too. Default: yes for rtn; no for gptq "
                          "and awq, which calibrate the transformer blocks and leave the head float, as "
                          "llm-compressor's recipes do; true rounds it to nearest after the blocks. A head tied "
                          "to the embedding table always stays with the table")
    execution: Literal["auto", "whole", "layerwise"] = Field(
        "auto", description="torch causal LMs: layerwise reads, quantizes and writes one transformer block at a "
                            "time (models larger than memory); auto chooses it when the float32 model would not "
                            "fit; whole loads the model")
    embeddings: Optional[Literal["int8", "int4", "float"]] = Field(
        None, description="torch: the vocabulary matrices. Default int8, one scale per token; int4 rounds the "
                          "token table to nearest in groups of block_size on the scheme's grid; float keeps it. A "
                          "head tied to the table computes with its codes; an untied head that quantize_head leaves "
                          "out of the 4-bit blocks is rounded to nearest in the table's scheme. Large vocabularies "
                          "are much of a small model's weights: left float they keep it far from 4-bit size")

    def grid(self) -> str:
        """The int4 grid of int4_gptq.fit_grid: asymmetric, absmax or signed-max."""
        return self.symmetric_grid if self.symmetric else "asymmetric"

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if "symmetric_grid" in self.model_fields_set and not self.symmetric:
            return "symmetric_grid applies with symmetric: true"
        if "symmetric_grid" in self.model_fields_set and input_kind == "onnx":
            return f"symmetric_grid applies to torch models; ONNX Runtime's {self.algorithm} quantizer fits its own " \
                   "grid (rtn: signed-max)"
        if input_kind == "torch" and self.algorithm == "hqq":
            return "algorithm hqq quantizes ONNX models (ONNX Runtime's quantizer); add an export_onnx stage " \
                   "before it, or use rtn or gptq on torch"
        if input_kind == "onnx" and self.algorithm in ("gptq", "awq"):
            return f"algorithm {self.algorithm} quantizes the torch model block by block; put this stage before " \
                   "export_onnx, which writes its codes into MatMulNBits"
        if input_kind == "onnx" and self.execution != "auto":
            return "execution applies to torch models"
        if input_kind == "onnx" and self.embeddings is not None:
            return "embeddings applies to torch models; ONNX Runtime's MatMulNBits quantizer leaves the embedding " \
                   "Gather float (quantize the torch model, then export_onnx)"
        if input_kind == "onnx" and self.quantize_head is not None:
            return "quantize_head applies to torch models; on ONNX name the head's MatMul in `exclude` to keep it float"
        if input_kind == "torch" and "accuracy_level" in self.model_fields_set:
            return "accuracy_level applies to ONNX models (MatMulNBits' compute type)"
        if self.algorithm in ("gptq", "awq") and self.calibration is None:
            return f"algorithm {self.algorithm} needs `calibration:` data"
        if self.algorithm not in ("gptq", "awq") and self.calibration is not None:
            return f"calibration applies to algorithms gptq and awq; {self.algorithm} uses no data"
        if self.algorithm != "gptq" and self.model_fields_set & {"act_order", "dampening"}:
            return f"act_order and dampening apply to algorithm gptq, not {self.algorithm}"
        # model_fields_set: the defaults are fine for hqq, only an explicit setting is refused
        if self.algorithm == "hqq" and "symmetric" in self.model_fields_set:
            return "symmetric applies to rtn, gptq and awq; hqq always fits a zero point"
        if self.algorithm == "hqq" and "accuracy_level" in self.model_fields_set:
            return "accuracy_level applies to rtn; ONNX Runtime's hqq quantizer does not set it"
        return None

    def backends(self, input_kind: ArtifactKind) -> list[str]:
        return ["onnxruntime.quantization.matmul_nbits_quantizer"] if input_kind == "onnx" else ["safetensors"]


def int4_weight_only_onnx(config: Int4WeightOnlyConfig, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    # ONNX Runtime's quantizer logs every node at INFO; keep a run's output readable
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = onnx.load(str(artifact.path))
    excluded = match_nodes([node.name for node in model.graph.node], config.exclude, "exclude")
    out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
    if config.algorithm == "rtn":
        algorithm = nbits.DefaultWeightOnlyQuantConfig(
            block_size=config.block_size, is_symmetric=config.symmetric, accuracy_level=config.accuracy_level, bits=4)
    else:
        algorithm = nbits.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=4)
    quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=excluded, algo_config=algorithm)
    try:
        quantizer.process()
    except Exception as exc:  # ONNX Runtime's quantizers raise bare exceptions and assertions
        raise StageFailed(f"quantize int4-weight-only ({config.algorithm}): ONNX Runtime's quantizer failed: "
                          f"{type(exc).__name__}: {exc}") from None
    quantizer.model.save_model_to_file(str(out.path), use_external_data_format=artifact.needs_external_data())
    copy_tokenizer_files(artifact.folder, ctx.workdir)
    graph = onnx.load(str(out.path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    ops = Counter(node.op_type for node in graph.node)
    float_weights = sum(1 for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants)
    if not ops["MatMulNBits"]:
        raise UserError("quantize int4-weight-only: no MatMul was quantized (weights must be constant, with "
                        f"input size a multiple of 16); {float_weights} MatMuls with constant weights remain")
    ctx.details.update({"backend": "onnxruntime MatMulNBits", "algorithm": config.algorithm,
                        "block_size": config.block_size, "symmetric": config.symmetric,
                        "accuracy_level": config.accuracy_level, "quantized_matmuls": ops["MatMulNBits"],
                        "float_weight_matmuls": float_weights, "excluded_nodes": len(excluded),
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(out.size_mb(), 3)})
    return out
