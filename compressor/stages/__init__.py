"""Stage registry: every stage type is listed here explicitly, never discovered by name."""

from __future__ import annotations

from .base import Stage, StageContext
from .build_engine import BuildEngine
from .cast import Cast
from .compressed_tensors import ExportCompressedTensors
from .export_aoti import ExportAoti
from .export_onnx import ExportOnnx
from .merge_lora import MergeLora
from .optimize_onnx import OptimizeOnnx
from .prune import Prune
from .quantize import Quantize
from .sparsify import Sparsify

REGISTRY: dict[str, Stage] = {stage.type: stage for stage in (MergeLora(), ExportOnnx(), OptimizeOnnx(), Prune(),
                                                           Quantize(), Cast(), ExportCompressedTensors(),
                                                           BuildEngine(), Sparsify(), ExportAoti())}

__all__ = ["REGISTRY", "Stage", "StageContext"]
