"""prune (torch -> torch).

kind unstructured: magnitude, Wanda and SparseGPT, at a sparsity target or in N:M patterns. Zeros
are written into the weights, so they survive save_pretrained and ONNX export; the sparsity
reported is measured from the saved files.

kind structured: whole attention heads and FFN channels are removed (prune_structured.py), with an
optional distillation to recover accuracy (prune_recover.py); parameters and MACs are reported
before and after, and the saved folder is reloaded with from_pretrained as a check."""

from __future__ import annotations

import copy
import logging
from typing import Literal, Optional

from pydantic import Field, model_validator

from ... import distributed
from ...anatomy import excluded_by, open_for_compression, record_coverage, restore_layout
from ...artifacts import TorchModel
from ...checkpoint import copy_checkpoint_files, load_tokenizer, load_torch_model, module_to_change
from ...data import CalibrationConfig, calibration_batches
from ...errors import StageFailed, UserError
from ...sparsity import PATTERNS, layer_sparsity, prune_magnitude
from ..base import Stage, StageConfigBase, StageContext, refuse_after_quantize, refuse_quantized_checkpoint
from ..blockwise.layerwise import choose_execution
from .prune_calibrated import prune_with_calibration
from .prune_layerwise import prune_layerwise
from .prune_recover import RecoverConfig, distill
from .prune_structured import check_reload, prune_structured, size_and_macs

log = logging.getLogger(__name__)

UNSTRUCTURED_ONLY = ("method", "sparsity", "pattern", "targets", "ignore", "block_size", "dampening", "execution")
STRUCTURED_ONLY = ("heads", "channels", "importance", "round_to", "recover")


class PruneConfig(StageConfigBase):
    type: Literal["prune"]
    kind: Literal["unstructured", "structured"] = Field(
        "unstructured", description="unstructured: individual weights set to zero (tensors keep their shape); "
                                    "structured: whole attention heads and FFN channels removed (tensors shrink)")
    method: Literal["magnitude", "wanda", "sparsegpt"] = Field(
        "wanda", description="magnitude: smallest |w|; wanda: smallest |w| x input-activation norm; sparsegpt: "
                             "second-order pruning that updates the remaining weights (both need calibration)")
    sparsity: Optional[float] = Field(
        None, gt=0, lt=1, description="share of weights set to zero in each targeted layer (default 0.5; "
                                      "fixed by the pattern for 2:4 and 4:8)")
    pattern: Literal["unstructured", "2:4", "4:8"] = Field(
        "unstructured", description="2:4 / 4:8: in every group of 4 (8) consecutive input weights of a row, "
                                    "keep 2 (4): the layout sparse tensor cores accelerate")
    scope: Literal["per-layer", "global"] = Field(
        "per-layer", description="one threshold per layer, or one ranking across all layers (global: "
                                 "unstructured magnitude only)")
    targets: list[str] = Field(default_factory=lambda: ["*"],
                               description="nn.Linear module names to prune; shell-style patterns")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head", "*embed*", "classifier", "score", "*pooler*"],
                              description="module names never pruned (output heads and embeddings by default)")
    calibration: Optional[CalibrationConfig] = Field(
        None, description="wanda / sparsegpt: the samples whose activations guide pruning")
    block_size: int = Field(128, gt=0, le=65_536,
                            description="sparsegpt: columns pruned together before updating the rest")
    dampening: float = Field(0.01, gt=0, lt=1, description="sparsegpt: added to the Hessian diagonal, as a share "
                                                           "of its mean, for a stable inverse")
    heads: Optional[float] = Field(
        None, ge=0, lt=1, description="structured: share of attention heads removed per layer (whole KV groups "
                                      "under grouped-query attention)")
    channels: Optional[float] = Field(
        None, ge=0, lt=1, description="structured: share of FFN intermediate channels removed per layer")
    importance: Literal["magnitude", "activations"] = Field(
        "magnitude", description="structured: rank heads and channels by weight norms, or by weights x "
                                 "input activations on the calibration data")
    round_to: int = Field(8, ge=1, le=65_536, description="structured: kept FFN channels are rounded to a multiple "
                                                          "of this (fast kernels want aligned widths); 1 to keep "
                                                          "the exact share")
    recover: Optional[RecoverConfig] = Field(
        None, description="structured: distil the pruned model towards the original on the calibration data "
                          "({steps, lr, temperature, weight_decay})")
    execution: Literal["auto", "whole", "layerwise"] = Field(
        "auto", description="unstructured, causal LMs: layerwise reads, prunes and writes one transformer block "
                            "at a time (models larger than memory); auto chooses it when the float32 model "
                            "would not fit; whole loads the model")

    @model_validator(mode="after")
    def _fields_match_kind(self) -> "PruneConfig":
        wrong = UNSTRUCTURED_ONLY if self.kind == "structured" else STRUCTURED_ONLY
        given = [name for name in wrong if name in self.model_fields_set]
        if given:
            raise ValueError(f"{', '.join(given)} do not apply to kind {self.kind}")
        if self.kind == "structured" and not (self.heads or self.channels):
            raise ValueError("kind structured needs `heads` and/or `channels` (the share of each to remove)")
        return self

    @model_validator(mode="after")
    def _pattern_fixes_sparsity(self) -> "PruneConfig":
        group = PATTERNS[self.pattern]
        if group and self.sparsity is not None and abs(self.sparsity - (1 - group[0] / group[1])) > 1e-9:
            raise ValueError(f"pattern {self.pattern} means sparsity {1 - group[0] / group[1]}; leave sparsity unset")
        return self

    @property
    def target_sparsity(self) -> float:
        group = PATTERNS[self.pattern]
        return 1 - group[0] / group[1] if group else (self.sparsity if self.sparsity is not None else 0.5)


class Prune(Stage):
    type = "prune"
    summary = "Zero weights (magnitude, Wanda, SparseGPT; N:M) or remove heads and FFN channels"
    config_model = PruneConfig
    accepts = ("torch",)
    needs_calibration = "with method wanda or sparsegpt"

    def check(self, config: PruneConfig, input_kind, task):
        if config.kind == "structured":
            if config.scope == "global":
                return ("scope: global would give layers different FFN widths or head counts, which a model's "
                        "config cannot describe (from_pretrained could not reload it); use scope per-layer")
            if config.calibration is None and (config.importance == "activations" or config.recover):
                return "importance: activations and recover need `calibration:` data"
            return None
        if config.method != "magnitude" and config.calibration is None:
            return f"method {config.method} needs `calibration:` data (its activations guide pruning)"
        if config.scope == "global" and (config.method != "magnitude" or config.pattern != "unstructured"):
            return "scope: global applies to method magnitude with pattern unstructured"
        return None

    def check_order(self, config, earlier):
        return refuse_after_quantize(earlier, "prune scores and zeroes")

    def splits_calibration(self, config: PruneConfig, input_kind):
        return config.kind == "unstructured" and config.method in ("wanda", "sparsegpt")

    def backends(self, config, input_kind):
        return ["torch"]

    def run(self, config: PruneConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
        import torch

        if artifact.transforms:
            raise UserError(f"prune: the model is already quantized ({artifact.transforms[-1]['name']}); "
                            "prune before quantizing")
        refuse_quantized_checkpoint(artifact, "prune scores and zeroes")
        if config.kind == "structured":  # the unpruned model stays loaded: it teaches the recovery
            original = load_torch_model(artifact, ctx.allow_pickle, ctx.trust_remote_code)
            return self._run_structured(config, artifact, original, copy.deepcopy(original), ctx)
        execution, why = choose_execution(artifact.path, artifact.task, config.execution, "prune")
        ctx.details.update({"execution": execution, "execution_reason": why})
        if execution == "layerwise":
            out, names, in_memory = prune_layerwise(config, artifact, ctx)
            return self._finish(config, TorchModel(out, artifact.task), names, ctx, in_memory)
        module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
        # GPT-2's Conv1D layers pruned as the nn.Linear they equal, fused experts one by one
        parts = open_for_compression(module)
        layers = parts.select(config.targets, config.ignore, "prune", head=True)
        with torch.no_grad():
            if config.method == "magnitude":
                prune_magnitude(layers, config)
            else:
                prune_with_calibration(module, layers, config, artifact, ctx)
        in_memory = layer_sparsity(layers)
        reached = [name for name, (zeros, size) in in_memory.items() if zeros >= 0.9 * config.target_sparsity * size]
        record_coverage(parts, reached, "prune", ctx, excluded_by(parts, layers))
        restore_layout(module, parts)  # saved in the layout the model's class loads
        if not distributed.leads():
            # A process helping process 0 calibrate (distributed.py) keeps the pruned module for a later
            # splitting stage; its files would be discarded (and transformers writes on process 0 only).
            return TorchModel(artifact.path, artifact.task, module=module)
        out = ctx.workdir / "model"
        module.save_pretrained(out, safe_serialization=True)
        copy_checkpoint_files(artifact.path, out)  # tokenizer and the like; save_pretrained wrote config
        return self._finish(config, TorchModel(out, artifact.task, module=module), list(layers), ctx, in_memory)

    def _finish(self, config: PruneConfig, result: TorchModel, names: list[str], ctx: StageContext,
                in_memory: Optional[dict] = None) -> TorchModel:
        ctx.details.update({"method": config.method, "pattern": config.pattern,
                            "target_sparsity": round(config.target_sparsity, 4),
                            **measured_sparsity(result, names, in_memory)})
        return result


    def _run_structured(self, config: PruneConfig, artifact: TorchModel, original, module, ctx) -> TorchModel:
        vocab = module.config.vocab_size
        feeds = calibration_batches(config.calibration, load_tokenizer(artifact.path)) if config.calibration else None
        params_before, macs_before = size_and_macs(module, vocab)
        summary = prune_structured(module, config, artifact.task, feeds)
        params_after, macs_after = size_and_macs(module, vocab)
        if config.recover:
            summary.update(distill(module, original, feeds, artifact.task, config.recover, ctx.progress))
        out = ctx.workdir / "model"
        module.save_pretrained(out, safe_serialization=True)
        copy_checkpoint_files(artifact.path, out)
        reload_diff = check_reload(module, out, artifact.task, vocab)
        if not reload_diff <= 1e-4:
            raise StageFailed(f"prune structured: the saved model reloads with outputs {reload_diff:.3g} away from "
                              "the pruned model")
        ctx.details.update({"kind": "structured", **summary, "params_before": params_before,
                            "params_after": params_after, "params_ratio": round(params_after / params_before, 4),
                            "macs_before": macs_before, "macs_after": macs_after,
                            "macs_ratio": round(macs_after / macs_before, 4), "macs_sequence": 128,
                            "reload_max_abs_diff": reload_diff})
        if config.calibration is not None:
            ctx.details["calibration_samples"] = config.calibration.samples
        return TorchModel(out, artifact.task, module=module)


def measured_sparsity(artifact: TorchModel, names: list[str], in_memory: Optional[dict] = None) -> dict:
    """Zeros per pruned layer and overall, counted in the saved safetensors files. A model saved in another
    layout than it was pruned in (fused experts stacked back) gives its per-layer counts from memory
    (`in_memory`, layer_sparsity), and the files must hold at least as many zeros."""
    from safetensors import safe_open

    wanted = {f"{name}.weight" for name in names}
    per_layer, zeros, total, model_zeros, model_total = {}, 0, 0, 0, 0
    for path in artifact.weight_files():
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                count = int((tensor == 0).sum())
                model_zeros, model_total = model_zeros + count, model_total + tensor.numel()
                if key in wanted and in_memory is None:
                    per_layer[key[: -len(".weight")]] = round(count / tensor.numel(), 4)
                    zeros, total = zeros + count, total + tensor.numel()
    if in_memory is not None:
        per_layer = {name: round(count / size, 4) for name, (count, size) in in_memory.items()}
        zeros, total = sum(c for c, _ in in_memory.values()), sum(n for _, n in in_memory.values())
        if model_zeros < zeros:
            raise UserError(f"prune: the saved files hold {model_zeros} zeros, fewer than the {zeros} pruned")
    missing = sorted(set(names) - set(per_layer))
    if missing:
        raise UserError(f"prune: pruned layers missing from the saved files: {missing[:3]}")
    return {"pruned_layers": len(per_layer), "sparsity_pruned_layers": round(zeros / max(total, 1), 4),
            "sparsity_all_weights": round(model_zeros / max(model_total, 1), 4), "sparsity_by_layer": per_layer}
