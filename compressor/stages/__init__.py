"""Stage registry: every stage type is listed here explicitly, never discovered by name."""

from __future__ import annotations

from .base import Stage, StageContext
from .export.build_engine import BuildEngine
from .cast.cast import Cast
from .export.compressed_tensors import ExportCompressedTensors
from .export.export_aoti import ExportAoti
from .export.export_onnx import ExportOnnx
from .lora.merge_lora import MergeLora
from .export.optimize_onnx import OptimizeOnnx
from .prune.prune import Prune
from .quantize.quantize import Quantize
from .prune.sparsify import Sparsify

REGISTRY: dict[str, Stage] = {stage.type: stage for stage in (MergeLora(), ExportOnnx(), OptimizeOnnx(), Prune(),
                                                           Quantize(), Cast(), ExportCompressedTensors(),
                                                           BuildEngine(), Sparsify(), ExportAoti())}

__all__ = ["REGISTRY", "Stage", "StageContext"]
