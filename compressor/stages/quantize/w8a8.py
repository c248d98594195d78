"""8-bit weights and activations on torch models: `fp8` (E4M3, the scheme GPU servers run on Hopper and Ada)
and `w8a8-int8` (SmoothQuant, then GPTQ or round-to-nearest int8 weights, int8 activations).

fp8 weights are rounded to nearest, per output channel (default), per tensor, or per 128 x 128 block
(llm-compressor's FP8_BLOCK); activations are quantized per token at run time (default; per token and group
of 128 with block weights) or with one scale per layer calibrated on data (`activations: static`). No data is
needed for dynamic activations. w8a8-int8 smooths the norm-fed projections first (smoothquant.py), then
quantizes each weight per output channel, with GPTQ block by block on calibration text (default) or by
rounding, and quantizes activations per token (or static per tensor).

The result is a torch folder of 8-bit codes and float32 scales (w8a8_layers.W8A8Linear), evaluated on the CPU
by simulating the kernel and on capable GPUs with torch's scaled matmul (FP8); export_compressed_tensors
writes it in the `float-quantized` / `int-quantized` layout vLLM loads. The output head, routers and the
embedding table stay float by default, as llm-compressor's recipes leave them."""

from __future__ import annotations

import json
import logging
from typing import Literal, Optional

from pydantic import Field

from ...anatomy import architecture_of, excluded_by, open_for_compression, record_coverage
from ...artifacts import ArtifactKind, TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_tokenizer, module_to_change
from ...data import CalibrationConfig, calibration_batches
from ...errors import UserError
from ...kv_cache import cached_attention, fp8_scales, install_fp8_kv, observed_kv
from ...torch_transforms import FP8, W8A8_INT8, swap_modules
from ...w8a8_layers import BLOCK, divisor, expand_scale, quantize_weight, w8a8_linear_class
from ..base import StageContext, refuse_quantized_checkpoint
from ..blockwise.sequential import compress_sequentially, split_by_blocks
from .embedding_tables import float_parameter_share
from .int4_gptq import gptq_quantize
from .quantize_base import QuantizeConfigBase
from .smoothquant import smooth

log = logging.getLogger(__name__)


class _EightBitConfig(QuantizeConfigBase):
    activations: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic quantizes activations per token at run time (no data needed for them); "
                               "static uses one scale per layer, the largest |input| seen on `calibration` data")
    quantize_head: bool = Field(
        False, description="quantize an untied output head (lm_head) too; default no, as llm-compressor's FP8 and "
                           "W8A8 recipes leave it. A head tied to the embedding table always stays float")
    kv_cache: Literal["float", "fp8"] = Field(
        "float", description="fp8 stores each attention layer's cached keys and values in E4M3 with one static "
                             "scale each (k_scale / v_scale, max |x| / 448 on `calibration` data), as vLLM's "
                             "kv_cache_dtype fp8 and compressed-tensors' kv_cache_scheme do; evaluated with the "
                             "cache quantized. float leaves the cache in the model's precision")
    calibration: Optional[CalibrationConfig] = Field(
        None, description="the samples for static activation and KV cache scales (and, for w8a8-int8, smoothing "
                          "and gptq); see Calibration data")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if input_kind == "onnx":
            return f"{self.scheme} quantizes torch models; put this stage before export (ONNX FP8 Q/DQ is not " \
                   "written yet)"
        if self.needs_calibration() and self.calibration is None:
            return f"{self.scheme} with {self.calibration_reason()} needs `calibration:` data"
        if not self.needs_calibration() and self.calibration is not None:
            return f"calibration applies to static activations{self.calibration_uses()}; this stage uses no data"
        return None

    def backends(self, input_kind: ArtifactKind) -> list[str]:
        return ["safetensors"]

    def needs_calibration(self) -> bool:
        return bool(self._data_uses())

    def _data_uses(self) -> list[str]:
        return [use for use, on in (("static activations", self.activations == "static"),
                                    ("an fp8 kv_cache", self.kv_cache == "fp8")) if on]

    def calibration_reason(self) -> str:
        return " and ".join(self._data_uses())

    def calibration_uses(self) -> str:
        return " and an fp8 kv_cache"


class Fp8Config(_EightBitConfig):
    """FP8 E4M3 weights and activations (torch; written for vLLM by export_compressed_tensors)."""

    scheme: Literal["fp8"] = Field(
        description="FP8 (E4M3) weights and activations (torch): weights per channel, tensor or 128x128 block, "
                    "activations per token at run time or static per tensor; simulated on the CPU, torch's "
                    "scaled matmul on GPUs of compute capability 8.9+")
    weights: Literal["channel", "tensor", "block"] = Field(
        "channel", description="one weight scale per output channel (llm-compressor's FP8_DYNAMIC), per tensor, "
                               "or per 128 x 128 block (FP8_BLOCK, whose activations are then scaled per token "
                               "and group of 128 inputs)")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if self.weights == "block" and self.activations == "static":
            return "block weights go with dynamic activations (per token and group of 128, as FP8_BLOCK)"
        return super().problem(input_kind)


class W8A8Int8Config(_EightBitConfig):
    """int8 weights per output channel and int8 activations, after SmoothQuant (torch)."""

    scheme: Literal["w8a8-int8"] = Field(
        description="int8 weights per output channel and int8 activations (torch), after SmoothQuant; weights by "
                    "gptq or rtn, activations per token at run time or static per tensor")
    algorithm: Literal["gptq", "rtn"] = Field(
        "gptq", description="gptq compensates each weight's rounding error with calibration data, block by block; "
                            "rtn rounds to nearest")
    smoothing_strength: Optional[float] = Field(
        0.8, ge=0, le=1, description="SmoothQuant's alpha: the share of the activations' outlier range moved into "
                                     "the weights (0.8, llm-compressor's W8A8 example); null skips smoothing")
    dampening: float = Field(0.01, gt=0, lt=1, description="gptq: added to the Hessian diagonal, as a share of its "
                                                           "mean, so that it can be inverted")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        if self.algorithm != "gptq" and "dampening" in self.model_fields_set:
            return "dampening applies to algorithm gptq"
        return super().problem(input_kind)

    def _data_uses(self) -> list[str]:
        return [w for w, on in (("smoothing", self.smoothing_strength is not None),
                                ("algorithm gptq", self.algorithm == "gptq")) if on] + super()._data_uses()

    def calibration_uses(self) -> str:
        return ", smoothing, gptq and an fp8 kv_cache"


def _layout(config) -> tuple[str, str, str]:
    """(format, weight strategy, activation strategy) of the layers this config writes."""
    fmt = "fp8" if config.scheme == "fp8" else "int8"
    weights = config.weights if config.scheme == "fp8" else "channel"
    if config.activations == "static":
        activations = "tensor"
    else:
        activations = "group" if weights == "block" else "token"
    return fmt, weights, activations


def quantize_w8a8(config, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    import torch
    from safetensors.torch import save_model

    what = f"quantize {config.scheme}"
    if artifact.transforms:
        raise UserError(f"{what}: the model is already quantized ({artifact.transforms[-1]['name']}); quantize once")
    refuse_quantized_checkpoint(artifact, f"{what} needs")  # a bitsandbytes or compressed-tensors folder
    module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
    parts = open_for_compression(module)  # Conv1D as Linear, fused experts one Linear each
    layers = parts.select([], config.exclude, what, head=config.quantize_head and not parts.head_tied)
    fmt, weights, activations = _layout(config)
    ragged = [name for name, layer in layers.items() if layer.in_features % BLOCK]
    if activations == "group" and ragged:
        raise UserError(f"{what}: block weights scale activations per group of {BLOCK} inputs, and {ragged[:3]} "
                        f"have inputs that are not a multiple of {BLOCK}; use weights: channel")
    feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path)) if config.calibration else None
    codes: dict[str, tuple] = {}
    gptq = config.scheme == "w8a8-int8" and config.algorithm == "gptq"

    def quantize_layer(name, layer, stats=None) -> None:
        if gptq and stats is not None and stats.kind == "hessian":
            k = layer.in_features
            quantized, scales, _ = gptq_quantize(layer.weight, stats.hessian(), k, "absmax", config.dampening,
                                                 bits=8)
            q = (quantized.to(torch.int16) - 128).to(torch.int8)
            scale = scales[:, :1].clone()
        else:
            q, scale = quantize_weight(layer.weight, fmt, weights)
        input_scale = None
        if activations == "tensor":
            if stats is None or not stats.absmax > 0:
                raise UserError(f"{what}: no calibration token reached {name}, so it has no static input scale; "
                                "calibrate with all_experts: true or more samples, or use dynamic activations")
            input_scale = stats.absmax / divisor(fmt)
        codes[name] = (q, scale, input_scale)
        # later blocks calibrate on this layer as it will compute (its weights; activations stay float there)
        layer.weight.copy_((q.float() * expand_scale(scale, q.shape, weights)).to(layer.weight.dtype))

    with torch.no_grad():
        if config.scheme == "w8a8-int8" and config.smoothing_strength is not None:
            ctx.details.update(smooth(module, parts, feeds, artifact.task, config.smoothing_strength, what,
                                      ctx.progress))
        if gptq or activations == "tensor":
            inside, outside = split_by_blocks(module, layers)
            compress_sequentially(module, inside, feeds, artifact.task, "hessian" if gptq else "absmax", what,
                                  quantize_layer, ctx.progress, spill_dir=ctx.workdir / "activations",
                                  details=ctx.details, all_experts=config.calibration.all_experts)
            # outside the blocks (an encoder's pooler and classifier, a head asked for): their inputs come from
            # one pass over the calibration data with the blocks already quantized
            seen = _input_peaks(module, outside, feeds, artifact.task) if activations == "tensor" else {}
            for name, layer in outside.items():
                quantize_layer(name, layer, seen.get(name))
        else:
            for name in ctx.progress.track(list(layers), len(layers), f"{what}: rounding"):
                quantize_layer(name, layers[name])
    names = list(layers)
    linear = w8a8_linear_class()
    code_of = {id(layers[name]): codes.pop(name) for name in names}
    swap_modules(module, names, lambda old: linear.from_codes(old, *code_of[id(old)][:2], fmt, weights, activations,
                                                              code_of[id(old)][2]))
    kv_layers = _fp8_kv_cache(module, feeds, what, ctx) if config.kv_cache == "fp8" else []
    out = ctx.workdir / "model"
    out.mkdir()
    copy_checkpoint_files(artifact.path, out)
    save_model(module, str(out / "model.safetensors"), metadata={"format": "pt"})
    transform = {"name": FP8 if fmt == "fp8" else W8A8_INT8, "layers": names, "weights": weights,
                 "activations": activations, "stored": True}
    if kv_layers:
        transform["kv_cache"] = {"format": "fp8", "attention": kv_layers}
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform], module=module.eval())
    ctx.details.update({"backend": "torch", "format": fmt, "weights": weights, "activations": activations,
                        "quantized_linear_layers": len(names),
                        "kept_in_float": [n for n in (parts.head,) if n is not None and n not in layers],
                        "float_parameter_share": float_parameter_share(module, parts.total_parameters),
                        "evaluated_as": "simulated on the CPU (8-bit values, float32 matmul)",
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(result.size_mb(), 3)})
    if config.scheme == "w8a8-int8":
        ctx.details["algorithm"] = config.algorithm
    if config.calibration is not None:
        ctx.details["calibration_samples"] = config.calibration.samples
    record_coverage(parts, names, what, ctx, excluded_by(parts, layers))
    return result


def _fp8_kv_cache(module, feeds: list[dict], what: str, ctx: StageContext) -> list[str]:
    """Calibrate per-layer FP8 scales for the cached keys and values on the quantized model, then make its
    attention layers quantize what enters the cache with them (kv_cache.py). Returns the layers' names."""
    import torch

    from ...data import torch_inputs

    attention = cached_attention(module)
    if not attention:
        raise UserError(f"{what}: kv_cache fp8 found no attention layer with a key / value cache in "
                        f"{architecture_of(module)} (it looks for attention modules with k_proj / v_proj or "
                        "qkv_proj, as compressed-tensors does); use kv_cache: float")
    with observed_kv(attention) as peaks, torch.no_grad():
        for feed in ctx.progress.track(feeds, len(feeds), f"{what}: KV cache scales"):
            module(**torch_inputs(feed), use_cache=False)
    scales = fp8_scales(peaks, what)
    install_fp8_kv(module, list(attention), scales)
    keys, values = [s[0] for s in scales.values()], [s[1] for s in scales.values()]
    ctx.details["kv_cache"] = {"format": "fp8", "attention_layers": len(scales),
                               "tokens_seen": min(p[2] for p in peaks.values()),
                               "k_scale_range": [min(keys), max(keys)], "v_scale_range": [min(values), max(values)]}
    return list(scales)


def _input_peaks(module, layers: dict, feeds: list[dict], task: str) -> dict:
    """Per layer, its inputs' statistics (largest |x| and tokens seen) over the calibration batches, from
    forward hooks on one pass of the whole model."""
    import torch

    from ...data import torch_inputs
    from ..blockwise.sequential import LayerInputs

    stats = {name: LayerInputs(layer.in_features, "absmax") for name, layer in layers.items()}
    handles = [layer.register_forward_pre_hook(lambda _m, args, n=name: stats[n].add(args[0]))
               for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for feed in feeds:
                inputs = torch_inputs(feed)
                module(**inputs, use_cache=False) if task == "text-generation" else module(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: s for name, s in stats.items() if s.rows}
