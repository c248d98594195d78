"""The options of quantize scheme int8-static (implemented in onnx_static.py).

Kept apart from onnx_static.py because that module imports ONNX Runtime when it loads, and a recipe
must parse, and `compress stages` list its options, on a machine without it.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ...artifacts import ArtifactKind
from ...data import CalibrationConfig
from ..base import StageConfigBase
from .quantize_base import QuantizeConfigBase


class FallbackConfig(StageConfigBase):
    """Accuracy-aware fallback for int8-static: keep the most harmful nodes in float."""

    max_nodes: int = Field(ge=1, le=1_000_000, description="at most this many nodes are left in float")
    min_cosine: float = Field(
        0.99, gt=0, le=1, description="stop once the worst calibration sample's output cosine against fp32 "
                                      "reaches this")


class Int8StaticConfig(QuantizeConfigBase):
    """int8 weights and activations, activation ranges measured on calibration data (ONNX, QDQ)."""

    scheme: Literal["int8-static"] = Field(
        description="int8 weights and activations with ranges from calibration data (ONNX only, QDQ format)")
    calibration: Optional[CalibrationConfig] = Field(
        None, description="required: the samples activation ranges are measured on (see Calibration data)")
    per_channel: bool = Field(True, description="one weight scale per output channel instead of per tensor")
    reduce_range: bool = Field(False, description="7-bit weights, for CPUs without VNNI where int8 overflows")
    op_types: Optional[list[str]] = Field(
        None, description="operator types to quantize (e.g. [MatMul, Attention]); default: [MatMul]")
    method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="how a range is chosen from the calibration activations")
    percentile: float = Field(99.999, gt=50, le=100, description="method percentile: the percentile of "
                                                                 "|activation| kept inside the range")
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="activation type; uint8 is the fast path on x86 CPUs (u8s8 kernels)")
    activation_symmetric: bool = Field(False, description="zero point fixed at 0 for activations")
    include: list[str] = Field(default_factory=list, description="quantize only nodes matching these patterns")
    quantize_outputs: bool = Field(
        False, description="also quantize the outputs of quantized operators (off: their outputs carry "
                           "transformer outliers into the residual stream)")
    smooth_alpha: Optional[float] = Field(
        None, ge=0, le=1, description="SmoothQuant strength; moves activation outliers into the weights "
                                      "before calibration (0.5 to 0.9; off when unset)")
    preprocess: bool = Field(True, description="type every tensor with ONNX Runtime's shape inference first "
                                               "(needed for fused graphs)")
    fallback: Optional[FallbackConfig] = Field(
        None, description="leave the most harmful nodes in float until the output cosine on calibration data "
                          "reaches a target")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if input_kind == "torch":
            return "int8-static quantizes ONNX models; add an export_onnx stage before it"
        if self.calibration is None:
            return "int8-static needs `calibration:` data to measure activation ranges"
        if self.method != "minmax" and self.calibration.padding != "max_length":
            return (f"method {self.method} builds histograms that need equal-shaped batches; "
                    "set calibration.padding: max_length")
        return None

    def backends(self, input_kind: ArtifactKind) -> list[str]:
        return ["onnxruntime.quantization"]
