"""sparsify: 2:4-pruned nn.Linear weights onto the GPU's sparse tensor cores, through PyTorch's
semi-structured sparse tensors (torch.sparse.to_sparse_semi_structured), so that the zeros a
`prune pattern: "2:4"` stage wrote pay off in latency.

The kernels run on CUDA (compute capability 8.0+) in float16 or bfloat16 only, so `plan()` stops with
exit 3 on any other machine, before any model is loaded. A semi-structured tensor has no safetensors
form: the model is saved dense in the chosen dtype (zeros included), with compress_sparse_kernels.json
naming the layers that runners swap to sparse kernels once the model is on the GPU (sparse_kernels.py).
Afterwards the sparse model is compared on a couple of sentences with the float32 model and with the
same weights run dense, which shows that the kernels compute what the dense layers do."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from ... import aoti, sparse_kernels
from ...anatomy import Anatomy, open_for_compression, record_coverage, restore_layout
from ...artifacts import TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_tokenizer, load_torch_model, module_to_change
from ...data import encode
from ...errors import StageFailed, UserError
from ...runners import TorchRunner
from ...torch_transforms import CAST
from ..base import Stage, StageConfigBase, StageContext, refuse_after_quantize, refuse_quantized_checkpoint
from ..cast.cast import DEFAULT_RTOL
from ..export.export_onnx import VALIDATION_TEXTS

log = logging.getLogger(__name__)


class SparsifyConfig(StageConfigBase):
    type: Literal["sparsify"]
    kernels: Literal["semi-structured"] = Field(
        "semi-structured", description="semi-structured: PyTorch's 2:4 sparse tensors on CUDA sparse tensor cores "
                                       "(cuSPARSELt or CUTLASS)")
    dtype: Literal["float16", "bfloat16"] = Field(
        "float16", description="the model's dtype: 2:4 sparse kernels take float16 or bfloat16 weights on CUDA only")
    backend: Literal["auto", "cusparselt", "cutlass"] = Field(
        "auto", description="the kernel library: auto takes cuSPARSELt where torch has it, else CUTLASS")
    rtol: Optional[float] = Field(None, gt=0, description="largest output difference from the float32 model, as a "
                                                          "share of its largest output magnitude; default 0.01 for "
                                                          "float16, 0.05 for bfloat16")


class Sparsify(Stage):
    type = "sparsify"
    summary = "Run 2:4-pruned linear layers on CUDA sparse tensor cores (PyTorch semi-structured sparse tensors)"
    config_model = SparsifyConfig
    accepts = ("torch",)
    last_only = True  # the swapped layers exist only in a runner; a later stage would see dense weights

    def check_order(self, config: SparsifyConfig, earlier: list[Any]) -> Optional[str]:
        problem = refuse_after_quantize(earlier, "sparsify needs")
        if problem:
            return problem
        prunes = [(i, c) for i, c in enumerate(earlier) if c.type == "prune" and c.kind == "unstructured"]
        if not prunes:
            return ('semi-structured kernels need 2:4-sparse weights: add a `prune` stage with `pattern: "2:4"` '
                    "before it")
        index, last = prunes[-1]
        if last.pattern != "2:4":
            return (f"stages[{index}] (prune) writes the {last.pattern} pattern; semi-structured kernels take "
                    'exactly 2:4 (use `pattern: "2:4"`)')
        for later, stage in enumerate(earlier[index + 1:], start=index + 1):
            if stage.type == "merge_lora":
                return f"stages[{later}] (merge_lora) adds dense updates after the 2:4 prune; merge before pruning"
        return None

    def backends(self, config, input_kind):
        return ["torch"]

    def unavailable(self, config: SparsifyConfig, input_kind) -> Optional[str]:
        problem = sparse_kernels.sparse_kernels_problem()
        if problem is None and config.backend == "cusparselt":
            import torch

            if not torch.backends.cusparselt.is_available():
                return "this torch build has no cuSPARSELt; use backend: cutlass or auto"
        return problem

    def cache_salt(self, config) -> dict:
        return {"gpu": aoti.gpu_name()}

    def run(self, config: SparsifyConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
        import torch

        if artifact.transforms:
            raise UserError(f"sparsify: the model is already transformed ({artifact.transforms[-1]['name']}); "
                            "give it the 2:4-pruned float model")
        refuse_quantized_checkpoint(artifact, "sparsify needs")
        module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
        layers, skipped, parts = kernel_layers(module, config.backend)
        if not layers:
            raise StageFailed(f"sparsify: no nn.Linear layer is 2:4 sparse with a shape the kernels take "
                              f"({_first(skipped)}); prune with pattern 2:4 first")
        record_coverage(parts, layers, "sparsify", ctx)
        if parts.expert_groups:
            ctx.details["dense_expert_groups"] = len(parts.expert_groups)
        out = ctx.workdir / "model"
        module = module.to(getattr(torch, config.dtype))
        module.save_pretrained(out, safe_serialization=True)
        copy_checkpoint_files(artifact.path, out)
        # Loading keeps the half-precision weights (the cast record); runners read the kernel record.
        (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [{"name": CAST, "dtype": config.dtype}]},
                                                      indent=2))
        record = {"kernels": config.kernels, "dtype": config.dtype, "backend": config.backend, "layers": layers}
        sparse_kernels.write_record(out, record)
        check = _compare(artifact, module, record, ctx)
        rtol = config.rtol or DEFAULT_RTOL[config.dtype]
        ctx.details.update({"kernels": config.kernels, "dtype": config.dtype, "sparse_layers": len(layers),
                            "dense_layers": skipped, **check, "rtol": rtol})
        if not check["relative_diff"] <= rtol:
            raise StageFailed(f"sparsify: outputs differ from float32 by {check['relative_diff']:.2%} of the largest "
                              f"output (rtol {rtol:g}); raise rtol if that is acceptable")
        return TorchModel(out, artifact.task, transforms=[{"name": CAST, "dtype": config.dtype}])


def _first(skipped: dict[str, str]) -> str:
    if not skipped:
        return "the model has no nn.Linear"
    name, why = next(iter(skipped.items()))
    return f"{name}: {why}" + (f", and {len(skipped) - 1} more" if len(skipped) > 1 else "")


def _compare(artifact: TorchModel, module, record: dict, ctx: StageContext) -> dict:
    """Outputs on a couple of sentences: the float32 model on the GPU, the same half-precision weights run
    dense, and run on the sparse kernels."""
    tokenizer = load_tokenizer(artifact.path)
    feed = encode(tokenizer, list(VALIDATION_TEXTS), max_length=32)
    mask = feed["attention_mask"].astype(bool)

    def outputs(runner):
        result = runner(feed)
        return result[mask] if result.ndim == 3 else result  # padding positions are undefined

    reference = outputs(TorchRunner(load_torch_model(TorchModel(artifact.path, artifact.task)), artifact.task,
                                    device="cuda"))
    sparse_runner = TorchRunner(module, artifact.task, device="cuda")
    dense = outputs(sparse_runner)
    kernel = sparse_kernels.to_semi_structured_(sparse_runner.module, record["layers"], record["backend"])
    sparse = outputs(sparse_runner)
    peak = float(np.max(np.abs(reference)))
    return {"kernel": kernel, "max_abs_diff": float(np.max(np.abs(sparse - reference))),
            "relative_diff": float(np.max(np.abs(sparse - reference))) / max(peak, 1e-12),
            "max_abs_diff_sparse_vs_dense": float(np.max(np.abs(sparse - dense)))}


def kernel_layers(module, backend: str) -> tuple[list[str], dict[str, str], Anatomy]:
    """(the layers the kernels take, {layer: why not} for the others, the model's anatomy), from the model's
    anatomy; `module` is left as it came. The runner swaps layers by name in the model as loaded, where
    fused experts are 3-D tensors (no semi-structured form) and GPT-2's layers are Conv1D (the kernels take
    nn.Linear): both run dense, experts counted in the record's coverage and noted, Conv1D layers listed."""
    parts = open_for_compression(module)
    try:
        dense = {name: "GPT-2's Conv1D: the kernels take nn.Linear" for name in parts.conv1d}
        layers = {name: layer for name, layer in parts.linears.items()
                  if name not in dense and parts.expert_group_of(name) is None}
        chosen, skipped = sparse_kernels.candidate_layers(layers, backend)
    finally:
        restore_layout(module, parts)
    return chosen, {**dense, **skipped}, parts
