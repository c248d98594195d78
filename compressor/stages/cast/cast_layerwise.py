"""cast layer by layer (layerwise.py): every tensor is streamed from the checkpoint's shards, floating ones
are converted to float16 / bfloat16 and written to new shards, so a model larger than memory never is
whole in it. The float32 model and the cast result are then compared on the whole path's sentences, each
run with one block in memory at a time (streamed.py)."""

from __future__ import annotations

import json

from ...artifacts import TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_tokenizer
from ...data import encode
from ...torch_transforms import CAST
from ..base import StageContext
from ..export.export_onnx import VALIDATION_TEXTS
from ...streamed import LayerwiseModel, largest_difference, streamed_logits
from ..blockwise.layerwise import new_writer, stream_tensors


def cast_layerwise(dtype_name: str, artifact: TorchModel, ctx: StageContext) -> tuple[TorchModel, float, float]:
    """(the cast model in ctx.workdir/model, largest output difference from float32, largest output)."""
    import torch

    dtype = getattr(torch, dtype_name)
    model = LayerwiseModel(artifact.path, artifact.task, ctx.trust_remote_code)  # checks the shards, reads nothing
    out = ctx.workdir / "model"
    expected = model.checkpoint.nbytes() * dtype.itemsize // model.storage_dtype.itemsize
    writer = new_writer(out, expected, "cast")
    stream_tensors(model, writer, lambda _name, tensor: _converted(tensor, dtype), ctx.progress,
                   f"cast {dtype_name}: block by block")
    writer.finish()
    _save_config(model, out, dtype_name)
    copy_checkpoint_files(artifact.path, out)  # tokenizer and generation files; the config is written above
    transform = {"name": CAST, "dtype": dtype_name}
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform])
    difference, peak = _output_difference(artifact, result, dtype, ctx)
    ctx.details["output_check"] = "the whole path's sentences, float32 and cast model each run one block at a time"
    return result, difference, peak


def _converted(tensor, dtype):
    """As the whole path converts: the loaded float32 weight cast to the dtype (via float32, so a float16
    checkpoint cast to bfloat16 rounds as it would there); integer tensors unchanged."""
    import torch

    return tensor.to(torch.float32).to(dtype) if tensor.is_floating_point() else tensor


def _save_config(model: LayerwiseModel, out, dtype_name: str) -> None:
    """config.json naming the dtype the weights are stored in, as save_pretrained writes it."""
    config = model.module.config
    config.dtype = dtype_name
    config.architectures = [type(model.module).__name__]
    config.save_pretrained(out)


def _output_difference(source: TorchModel, result: TorchModel, dtype, ctx: StageContext) -> tuple[float, float]:
    """The whole path's check (export_onnx.output_difference) on the same sentences, the float32 model and
    the cast one each run with one block in memory at a time."""
    import torch

    encoded = encode(load_tokenizer(source.path), list(VALIDATION_TEXTS), max_length=32)
    feed = {name: torch.from_numpy(encoded[name]) for name in ("input_ids", "attention_mask")}  # a causal LM's
    reference = streamed_logits(LayerwiseModel(source.path, source.task, ctx.trust_remote_code), feed,
                                torch.float32)
    candidate = streamed_logits(LayerwiseModel(result.path, result.task, ctx.trust_remote_code), feed, dtype)
    return largest_difference(reference, candidate, feed["attention_mask"])
