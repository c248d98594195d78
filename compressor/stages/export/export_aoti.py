"""export_aoti: a torch checkpoint to an AOTInductor package (`model.pt2`), PyTorch's own deployable
artifact for CPU and CUDA: torch.export captures the forward pass, AOTInductor compiles it into kernels
and packs them with the weights, and torch loads the package without transformers or the model's code.
It is the GPU artifact that runs where TensorRT cannot be installed.

The package takes the tokenizer's tensors (input_ids, attention_mask, and token_type_ids where an encoder
takes them) with batch and sequence dynamic unless fixed, and returns the task's main output. A causal
LM's forward is exported without the KV cache (use_cache=False): full-sequence logits for perplexity,
not a decoder. Afterwards the package is loaded as a deployment would load it and compared with the
float32 torch model on a couple of sentences."""

from __future__ import annotations

import inspect
import logging
import time
from typing import Literal, Optional

from pydantic import Field

from ... import aoti
from ...artifacts import AotiModel, TorchModel
from ...checkpoint import copy_checkpoint_files, module_to_change
from ...errors import StageFailed, UserError
from ...runners import MAIN_OUTPUT
from ..base import Stage, StageConfigBase, StageContext, refuse_after_quantize, refuse_quantized_checkpoint
from ..cast.cast import DEFAULT_RTOL
from .export_onnx import output_difference

log = logging.getLogger(__name__)

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
EXAMPLE_SHAPE = (2, 16)  # traced with more than one row and token, so neither axis is specialised to 1


class ExportAotiConfig(StageConfigBase):
    type: Literal["export_aoti"]
    device: Literal["cpu", "cuda"] = Field("cpu", description="where the package runs: its kernels are compiled "
                                                               "for CPU (C++) or for the CUDA GPU here (Triton)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weights and arithmetic of the package; inputs stay int64, the output is read as "
                               "float32")
    static_axes: Optional[dict[Literal["batch_size", "sequence_length"], int]] = Field(
        None, description="fix these axes to a size (e.g. {batch_size: 1}); default: batch and sequence dynamic")
    max_sequence_length: Optional[int] = Field(
        None, gt=1, le=16_777_216,
        description="longest sequence the package accepts; default the model's max_position_embeddings")
    rtol: Optional[float] = Field(None, gt=0, description="largest output difference from the float32 torch model, "
                                                          "as a share of its largest output magnitude; default 1e-4 "
                                                          "for float32, 0.01 for float16, 0.05 for bfloat16")


class ExportAoti(Stage):
    type = "export_aoti"
    summary = "Compile a torch model into an AOTInductor package (.pt2) for CPU or CUDA, run without the model's code"
    config_model = ExportAotiConfig
    accepts = ("torch",)
    last_only = True

    def output_kind(self, config, input_kind):
        return "aoti"

    def check(self, config: ExportAotiConfig, input_kind, task):
        limit = config.max_sequence_length
        fixed = (config.static_axes or {}).get("sequence_length")
        if limit and fixed and fixed > limit:
            return f"static_axes.sequence_length {fixed} exceeds max_sequence_length {limit}"
        return None

    def check_order(self, config, earlier):
        return refuse_after_quantize(earlier, "export_aoti compiles")

    def check_shapes(self, config: ExportAotiConfig, shapes):
        limit = config.max_sequence_length
        for purpose, (_, length) in shapes.items():
            if limit and length > limit:
                return f"max_sequence_length {limit} is shorter than the {purpose}'s {length} tokens"
        return None

    def backends(self, config, input_kind):
        return ["torch"]

    def unavailable(self, config: ExportAotiConfig, input_kind) -> Optional[str]:
        return aoti.aoti_problem(config.device)

    def cache_salt(self, config: ExportAotiConfig) -> dict:
        # CUDA kernels are compiled and tuned for the GPU here; torch's version is in every key already.
        return {"gpu": aoti.gpu_name()} if config.device == "cuda" else {}

    def run(self, config: ExportAotiConfig, artifact: TorchModel, ctx: StageContext) -> AotiModel:
        if artifact.transforms:
            raise UserError(f"export_aoti compiles float torch models, not one with transforms "
                            f"{[t['name'] for t in artifact.transforms]}; compile the float model")
        refuse_quantized_checkpoint(artifact, "export_aoti compiles")
        out = AotiModel(ctx.workdir / "model.pt2", artifact.task)
        module = module_to_change(artifact, ctx.allow_pickle, ctx.trust_remote_code)
        metadata = compile_package(module, artifact.task, config, out, ctx)
        copy_checkpoint_files(artifact.path, ctx.workdir)
        del module  # the reference below loads the float32 model afresh
        difference, peak = output_difference(artifact, out, ctx)
        rtol = config.rtol or {"float32": 1e-4, **DEFAULT_RTOL}[config.dtype]
        relative = difference / max(peak, 1e-12)
        ctx.details.update({"backend": f"aoti-{config.device}-{config.dtype}", "inputs": metadata["inputs"],
                            "dynamic": metadata["dynamic"], "export_seconds": metadata["export_seconds"],
                            "compile_seconds": metadata["compile_seconds"], "torch": metadata["torch"],
                            "gpu": metadata["gpu"], "size_mb": round(out.size_mb(), 3), "max_abs_diff": difference,
                            "relative_diff": relative, "rtol": rtol})
        if artifact.task == "text-generation":
            ctx.notes.append("export_aoti: the package computes full-sequence logits without a KV cache "
                             "(use_cache=False); it serves scoring and perplexity, not token-by-token decoding")
        if not relative <= rtol:
            raise StageFailed(f"export_aoti: the package's outputs differ from the float32 model by {difference:.3g} "
                              f"({relative:.2%} of the largest output, rtol {rtol:g}); raise rtol if the dtype "
                              "explains it")
        return out


def _main_output_module(model, task: str, inputs: tuple[str, ...]):
    """The model as a module of positional token tensors returning only the task's main output: what
    torch.export traces, and what a deployment calls."""
    import torch

    class MainOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            kwargs = {name: given[name] for name in inputs}
            if task == "text-generation":
                kwargs["use_cache"] = False  # logits only: a cache would be an output the package cannot return
            return self.model(**kwargs)[MAIN_OUTPUT[task]]

    return MainOutput().eval()


def package_inputs(model, task: str) -> tuple[str, ...]:
    """The tensors the package takes. A causal LM takes input_ids and attention_mask, as its ONNX graph
    does: GPT-2's forward also accepts token_type_ids and adds their embeddings (wte[0] for zeros, which a
    runner would feed), but its tokenizer never makes them, and the model it is compared with gets none."""
    accepted = set(inspect.signature(model.forward).parameters)
    wanted = ("input_ids", "attention_mask") if task == "text-generation" else TOKEN_INPUTS
    return tuple(name for name in wanted if name in accepted)


def compile_package(model, task: str, config: ExportAotiConfig, out: AotiModel, ctx: StageContext) -> dict:
    """torch.export the main-output forward, AOTInductor it into `out`, write its metadata; return the metadata."""
    import torch

    inputs = package_inputs(model, task)
    model = model.to(device=config.device, dtype=getattr(torch, config.dtype)).eval()
    static = config.static_axes or {}
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    limit = config.max_sequence_length or positions
    batch, length = static.get("batch_size", EXAMPLE_SHAPE[0]), static.get("sequence_length", EXAMPLE_SHAPE[1])
    length = min(length, limit) if limit else length
    vocab = getattr(model.config, "vocab_size", 100)
    ids = torch.randint(0, vocab, (batch, length), device=config.device)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    fixed = getattr(torch.export.Dim, "STATIC", None)  # None in torch releases before Dim.STATIC
    axes = {0: fixed if "batch_size" in static else torch.export.Dim("batch", min=1),
            1: fixed if "sequence_length" in static else torch.export.Dim("sequence", min=1, max=limit)}
    wrapper = _main_output_module(model, task, inputs)
    ctx.progress.phase(f"export_aoti: torch.export of the {task} forward")
    started = time.perf_counter()
    try:
        with torch.no_grad():
            program = torch.export.export(wrapper, tuple(example[n] for n in inputs),
                                          dynamic_shapes=tuple(dict(axes) for _ in inputs), strict=False)
    except Exception as exc:  # torch.export raises many types (UserError, constraint violations, unsupported ops)
        raise StageFailed(f"export_aoti: torch.export could not capture the model: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}; fix the axis with static_axes if the "
                          "message names a dynamic dimension") from None
    exported = time.perf_counter()
    ctx.progress.phase(f"export_aoti: AOTInductor compiling for {config.device} (minutes on a large model)")
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(out.path))
    except Exception as exc:  # compiler and Triton failures surface as several exception types
        raise StageFailed(f"export_aoti: AOTInductor could not compile the program: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not out.path.is_file():
        raise StageFailed(f"export_aoti: AOTInductor reported success but wrote no {out.path.name}")
    metadata = {"task": task, "device": config.device, "dtype": config.dtype, "inputs": list(inputs),
                "output": MAIN_OUTPUT[task], "static_axes": dict(static),
                "dynamic": [axis for axis in ("batch_size", "sequence_length") if axis not in static],
                "max_sequence_length": limit, "use_cache": False if task == "text-generation" else None,
                "torch": torch.__version__, "gpu": aoti.gpu_name() if config.device == "cuda" else None,
                "export_seconds": round(exported - started, 2),
                "compile_seconds": round(time.perf_counter() - exported, 2),
                "compiled": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    aoti.write_metadata(out, metadata)
    return metadata
