"""export_onnx: a torch checkpoint to ONNX through PyTorch's exporter (onnx_exporter.py), checked against torch
afterwards."""

from __future__ import annotations

import logging
import shutil
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from ...artifacts import OnnxModel, TorchModel
from ...checkpoint import load_tokenizer
from ...data import encode
from ...errors import StageFailed, UserError
from ...runners import make_runner
from ..base import Stage, StageConfigBase, StageContext, refuse_after_quantize, refuse_quantized_checkpoint
from .int4_export import int4_transform, pack_int4_matmuls, write_dequantized_checkpoint
from .vocabulary_export import pack_vocabulary
from .onnx_exporter import export_checkpoint
from .w8a8_export import MIN_OPSET, eight_bit_transform, insert_qdq, onnx_problem
from .w8a8_export import write_dequantized_checkpoint as write_dequantized_checkpoint_8bit

log = logging.getLogger(__name__)

# Default tolerance of an 8-bit Q/DQ graph against the torch simulation, as a share of the largest output.
EIGHT_BIT_RTOL = 0.01

VALIDATION_TEXTS = (
    "The film is a quiet triumph, funny and sad in equal measure.",
    "A tedious, overlong mess that squanders a talented cast.",
)


class ExportOnnxConfig(StageConfigBase):
    type: Literal["export_onnx"]
    opset: int = Field(18, ge=14, le=21, description="ONNX opset version (the dynamo exporter writes 18 or later)")
    exporter: Literal["torchscript", "dynamo"] = Field(
        "torchscript", description="torchscript: torch.onnx.export(dynamo=False), the graphs ONNX Runtime's "
                                   "optimizer fuses, fast; dynamo: torch.export + onnxscript, PyTorch's default")
    with_past: bool = Field(False, description="text-generation only: export past key/value inputs for decoding")
    static_axes: Optional[dict[Literal["batch_size", "sequence_length"], int]] = Field(
        None, description="fix these dynamic axes to a size (e.g. {batch_size: 1}); default: all axes dynamic")
    atol: float = Field(1e-4, gt=0, description="max abs difference allowed between ONNX Runtime and torch outputs "
                                                "(an fp8 Q/DQ graph: at least 1% of the largest output unless set)")


class ExportOnnx(Stage):
    type = "export_onnx"
    summary = "Export a torch model to ONNX (PyTorch's exporter) and check ONNX Runtime against torch"
    config_model = ExportOnnxConfig
    accepts = ("torch",)

    def output_kind(self, config, input_kind):
        return "onnx"

    def check(self, config: ExportOnnxConfig, input_kind, task):
        if config.with_past and task != "text-generation":
            return "with_past applies to text-generation models only"
        return None

    def check_order(self, config, earlier):
        quantized = [c for c in earlier if c.type == "quantize"]
        if quantized and all(c.scheme == "int4-weight-only" for c in quantized):
            return None  # exported with its own codes in MatMulNBits (int4_export.py)
        if quantized and quantized[-1].scheme in ("fp8", "w8a8-int8"):  # as Q/DQ (w8a8_export.py)
            problem = onnx_problem(quantized[-1])
            if problem is None and "opset" in config.model_fields_set and config.opset < MIN_OPSET:
                return f"8-bit Q/DQ needs opset {MIN_OPSET} or later (float8 types); leave opset unset or set " \
                       f"{MIN_OPSET}+"
            return problem
        problem = refuse_after_quantize(earlier, "export_onnx traces")
        return problem and f"{problem}, and quantize the ONNX model after export (int4 weight-only is the " \
                           "exception: its codes are exported as they are)"

    def backends(self, config, input_kind):
        return ["onnx", "onnxruntime"] + (["onnxscript"] if config.exporter == "dynamo" else [])

    def run(self, config: ExportOnnxConfig, artifact: TorchModel, ctx: StageContext) -> OnnxModel:
        int4 = int4_transform(artifact)
        eight_bit = eight_bit_transform(artifact)
        if eight_bit is not None:
            exported = self._export_eight_bit(config, artifact, eight_bit, ctx)
        elif artifact.transforms and int4 is None:
            raise UserError(f"export_onnx cannot export a torch model with in-memory transforms "
                            f"{artifact.transforms}; export first, then quantize the ONNX model")
        elif int4 is None:
            refuse_quantized_checkpoint(artifact, "export_onnx traces")
            exported = self._export(config, artifact.path, artifact.task, ctx)
        else:
            exported = self._export_int4(config, artifact, int4, ctx)
        if config.static_axes:
            _fix_axes(exported, config.static_axes)
        diff, peak = output_difference(artifact, exported, ctx)
        atol = config.atol
        if eight_bit is not None and "atol" not in config.model_fields_set:
            # ONNX Runtime's float32 sums differ from torch's in the last bit, and a value that close to a rounding
            # boundary of a quantizer lands on the neighbouring 8-bit code: expected, and up to a few E4M3 steps
            atol = max(atol, EIGHT_BIT_RTOL * peak)
        ctx.details.update({"max_abs_diff": diff, "atol": atol, "size_mb": round(exported.size_mb(), 3)})
        if not diff <= atol:
            raise StageFailed(f"export_onnx: ONNX Runtime output differs from torch by {diff:.3g} "
                              f"(atol {atol:g}); raise atol if this is expected, or try another opset")
        return exported

    def _export(self, config: ExportOnnxConfig, checkpoint, task_name: str, ctx: StageContext) -> OnnxModel:
        done = export_checkpoint(checkpoint, task_name, ctx.workdir, exporter=config.exporter, opset=config.opset,
                                 with_past=config.with_past, trust_remote_code=ctx.trust_remote_code,
                                 allow_pickle=ctx.allow_pickle)
        ctx.details.update({"exporter": done["exporter"], "opset": done["opset"], "with_past": config.with_past})
        return OnnxModel(ctx.workdir / "model.onnx", task_name, with_past=config.with_past)

    def _export_rewritten(self, config: ExportOnnxConfig, artifact: TorchModel, write_float, rewrite,
                          ctx: StageContext) -> OnnxModel:
        """Export the float copy `write_float(folder)` saves, then `rewrite(onnx model)` it in place (putting
        the torch stage's own codes back) and save it."""
        import onnx

        source = ctx.workdir / "float-source"
        try:
            layers = write_float(source)
            exported = self._export(config, source, artifact.task, ctx)
        finally:
            shutil.rmtree(source, ignore_errors=True)
        model = onnx.load(str(exported.path))
        rewrite(model, layers)
        onnx.save_model(model, str(exported.path), save_as_external_data=exported.needs_external_data(),
                        location=exported.path.name + ".data")
        return exported

    def _export_int4(self, config: ExportOnnxConfig, artifact: TorchModel, transform: dict,
                     ctx: StageContext) -> OnnxModel:
        """Export the dequantized float copy, then put the torch stage's codes into MatMulNBits."""
        def rewrite(model, written):
            grids, vocabulary = written
            packed = pack_int4_matmuls(model, grids, transform["group_size"], transform["symmetric"])
            ctx.details.update({"int4_matmuls": packed, "int4_from": "the torch stage's codes (not refitted)",
                                "block_size": transform["group_size"], "symmetric": transform["symmetric"]})
            if vocabulary is not None:
                _record_vocabulary(vocabulary, pack_vocabulary(model, vocabulary), transform["embeddings"]["head"], ctx)
            elif transform.get("embeddings"):
                ctx.details["embeddings"] = "float (dequantized)"
        return self._export_rewritten(config, artifact, lambda folder: write_dequantized_checkpoint(
            artifact, transform, folder, ctx), rewrite, ctx)

    def _export_eight_bit(self, config: ExportOnnxConfig, artifact: TorchModel, transform: dict,
                          ctx: StageContext) -> OnnxModel:
        """Export the dequantized float copy, then read each 8-bit layer's weight and input through Q/DQ."""
        if config.opset < MIN_OPSET:  # the default (18) is raised; an explicit lower one was refused when planning
            config = config.model_copy(update={"opset": MIN_OPSET})

        def rewrite(model, layers):
            ctx.details.update({"qdq_matmuls": insert_qdq(model, layers, transform), "qdq_type": "float8e4m3fn",
                                "qdq_from": "the torch stage's codes and calibrated scales"})
        return self._export_rewritten(config, artifact, lambda folder: write_dequantized_checkpoint_8bit(
            artifact, transform, folder, ctx), rewrite, ctx)


def _record_vocabulary(vocabulary, packed: dict, transform_head: Optional[str], ctx: StageContext) -> None:
    ctx.details["embeddings"] = f"{vocabulary.scheme} (GatherBlockQuantized)"
    if vocabulary.head:
        ctx.details["head"] = (f"{vocabulary.scheme} MatMulNBits" + (", reading the table's codes"
                                                                    if vocabulary.head_tied else ""))
    elif transform_head:
        ctx.details["head"] = "float (dequantized)"
    if packed["float_weights_left"]:  # read by something besides the lookup and the head: kept, and said
        ctx.details["float_vocabulary_left"] = packed["float_weights_left"]
        ctx.notes.append(f"export_onnx: the float {vocabulary.table} is still read by other nodes of the graph "
                         f"({packed['float_weights_left']}) and keeps its float size beside the quantized table")


def _fix_axes(model: OnnxModel, axes: dict[str, int]) -> None:
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

    graph = onnx.load(str(model.path))
    for name, size in axes.items():
        make_dim_param_fixed(graph.graph, name, size)
    fix_output_shapes(graph)
    onnx.save(graph, str(model.path))


def max_abs_difference(reference, candidate, ctx: StageContext) -> float:
    """Largest |torch - candidate| on the task's main output for a couple of real sentences."""
    return output_difference(reference, candidate, ctx)[0]


def output_difference(reference, candidate, ctx: StageContext) -> tuple[float, float]:
    """(largest |reference - candidate|, largest |reference|) on the task's main output for a couple
    of real sentences."""
    tokenizer = load_tokenizer(reference.path if isinstance(reference, TorchModel) else reference.folder)
    expected_runner = make_runner(reference, "reference", threads=ctx.threads, allow_pickle=ctx.allow_pickle)
    actual_runner = make_runner(candidate, "candidate", threads=ctx.threads)
    batch, length = actual_runner.fixed_shape
    texts = list(VALIDATION_TEXTS[: batch or len(VALIDATION_TEXTS)])
    feed = encode(tokenizer, texts, max_length=length or 32, pad_to=length)
    expected, actual = expected_runner(feed), actual_runner(feed)
    mask = feed["attention_mask"].astype(bool)
    if expected.ndim == 3:  # per-token outputs: compare only real tokens, padding is undefined
        expected, actual = expected[mask], actual[mask]
    return float(np.max(np.abs(expected - actual))), float(np.max(np.abs(expected)))


def copy_tokenizer_files(source, target) -> None:
    """Keep config and tokenizer beside a rewritten ONNX file so the folder stays self-contained."""
    for item in source.iterdir():
        if item.suffix != ".onnx" and "onnx_data" not in item.name and item.is_file():
            shutil.copy2(item, target / item.name)
