"""nf4 / fp4 weight quantization of torch models through bitsandbytes, saved as a Hugging Face
folder whose config carries the quantization settings, so `from_pretrained` reloads it 4-bit.

The stage quantizes and saves before any forward pass on purpose: on CPUs with AVX-512 BF16,
bitsandbytes repacks 4-bit weights for its CPU kernel on the first forward (absmax in bf16, no
nested statistics) and saving after that would store the repacked, slightly coarser statistics.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import logging
from typing import Literal, Optional

from pydantic import Field

from ...anatomy import architecture_of
from ...artifacts import ArtifactKind, TorchModel
from ...checkpoint import copy_checkpoint_files, empty_model, model_class, quantization_of
from ...errors import BackendMissing, UserError
from ...linear_layers import is_linear_like
from ..base import StageContext
from .quantize_base import QuantizeConfigBase

log = logging.getLogger(__name__)

# bitsandbytes before 0.43.1 loads CUDA libraries at import and has no CPU path for 4-bit.
FIRST_CPU_RELEASE = (0, 43, 1)


class Bnb4bitConfig(QuantizeConfigBase):
    """nf4 / fp4: 4-bit weights in blocks of 64 through bitsandbytes (torch)."""

    scheme: Literal["nf4", "fp4"] = Field(
        description="4-bit normal-float (nf4) or float (fp4) weights in blocks of 64 through bitsandbytes "
                    "(torch only), saved as a Hugging Face folder that from_pretrained reloads; the output "
                    "head (lm_head or classifier) always stays in float")
    double_quant: bool = Field(True, description="quantize the per-block scales too (8-bit, blocks of 256), "
                                                 "saving about 0.4 bits per weight")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the type weights are dequantized to for each matmul; float32 on CPUs, "
                               "bfloat16 or float16 on GPUs")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if input_kind == "onnx":
            return (f"{self.scheme} quantizes torch models through bitsandbytes; for a 4-bit ONNX model "
                    "use scheme int4-weight-only after export_onnx")
        return None

    def backends(self, input_kind: ArtifactKind) -> list[str]:
        return ["bitsandbytes", "accelerate"]

    def unavailable(self) -> Optional[str]:
        return bnb_unavailable()


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def bnb_unavailable() -> Optional[str]:
    """Why bitsandbytes 4-bit cannot run on this machine, or None."""
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return "nf4 / fp4 need the Python package 'bitsandbytes' (pip install bitsandbytes), not installed here"
    if _version_tuple(version) < FIRST_CPU_RELEASE:
        import torch

        if not torch.cuda.is_available():
            return (f"bitsandbytes {version} runs 4-bit on CUDA GPUs only and none is present; install "
                    "bitsandbytes>=0.43.1 for its CPU backend, or run on a GPU machine")
    return None


def skipped_modules(module, patterns: list[str]) -> list[str]:
    """Linear layers (GPT-2's Conv1D included) kept in float: the output embedding (lm_head) always,
    plus `exclude` patterns."""
    linears = [name for name, child in module.named_modules() if is_linear_like(child)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in linears)]
    if unmatched:
        raise UserError(f"quantize.exclude: no linear layer matches {unmatched}; names look like {linears[:3]}")
    skip = [n for n in linears if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    output = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    head = next((n for n, child in module.named_modules() if output is not None and child is output), None)
    # Classification heads are small and decide the label directly: keep them in float too.
    head = head or next((n for n in linears if n.split(".")[0] in ("classifier", "score", "lm_head")), None)
    return sorted(set(skip + ([head] if head else [])))


def quantize_bnb_4bit(config: Bnb4bitConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    import torch
    from transformers import BitsAndBytesConfig

    quantized = quantization_of(artifact)
    if quantized:
        raise UserError(f"quantize {config.scheme}: the model is already quantized ({quantized}); "
                        "start from the float checkpoint")
    # Names to skip come from the float model's structure, which a meta-device instance gives for free.
    skeleton = empty_model(artifact.path, artifact.task, ctx.trust_remote_code)
    fused = next((name for name, parameter in skeleton.named_parameters() if parameter.ndim >= 3), None)
    if fused is not None:
        raise UserError(f"quantize {config.scheme}: bitsandbytes quantizes nn.Linear layers, and this "
                        f"{architecture_of(skeleton)} model keeps its experts fused ({fused}), so they would stay "
                        "float; use int4-weight-only (rtn or gptq), which quantizes every expert")
    problem = bnb_unavailable()
    if problem:
        raise BackendMissing(problem)
    skip = skipped_modules(skeleton, config.exclude)
    settings = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=config.scheme, bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, config.compute_dtype), llm_int8_skip_modules=skip)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        module = model_class(artifact.task).from_pretrained(
            artifact.path, quantization_config=settings, device_map=device, dtype=torch.float32,
            use_safetensors=True, trust_remote_code=ctx.trust_remote_code)
    except RuntimeError as exc:
        if "cuda" in str(exc).lower():
            raise BackendMissing(f"bitsandbytes needs a CUDA GPU for this ({exc})") from None
        raise
    quantized = [name for name, child in module.named_modules() if type(child).__name__ == "Linear4bit"]
    if not quantized:
        raise UserError(f"quantize {config.scheme}: bitsandbytes quantized no layer; check exclude")
    out = ctx.workdir / "model"
    module.save_pretrained(out, safe_serialization=True)
    copy_checkpoint_files(artifact.path, out)
    result = TorchModel(out, artifact.task)  # no module: evaluation reloads the saved folder
    ctx.details.update({"backend": f"bitsandbytes {importlib.metadata.version('bitsandbytes')}",
                        "quantized_linear_layers": len(quantized), "kept_in_float": skip,
                        "device": device, "size_mb_before": round(artifact.size_mb(), 3),
                        "size_mb_after": round(result.size_mb(), 3)})
    if device == "cpu":
        ctx.notes.append("bitsandbytes ran on the CPU: its CPU kernels dequantize blocks for each matmul, so "
                         "this artifact saves memory and disk, not time; 4-bit speed-ups need a GPU")
    return result
