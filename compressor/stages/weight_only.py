"""int8 weight-only quantization: weights stored as int8 with one scale per output channel,
activations and arithmetic stay in float. No calibration; the safe choice for language models,
whose activations carry outliers that per-tensor int8 cannot hold."""

from __future__ import annotations

import copy
import fnmatch
import json
import logging

import numpy as np

from ..artifacts import OnnxModel, TorchModel
from ..errors import UserError
from .base import StageContext
from .export_onnx import copy_tokenizer_files
from .quantize import match_nodes

log = logging.getLogger(__name__)

TRANSFORM = "int8-weight-only"


def per_channel_int8(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per slice along `axis` (the output channels)."""
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    peak = np.abs(weight).max(axis=reduce, keepdims=True)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    quantized = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return quantized, scale.reshape(-1)


# ---------------------------------------------------------------------------------------------
# ONNX: int8 initializers behind per-axis DequantizeLinear, a standard-ONNX form any runtime reads


def weight_only_onnx(config, artifact: OnnxModel, ctx: StageContext) -> OnnxModel:
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(artifact.path))
    excluded = set(match_nodes([node.name for node in model.graph.node], config.exclude, "exclude"))
    inits = {i.name: i for i in model.graph.initializer}
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    chosen = []
    if "MatMul" in (config.op_types or ["MatMul"]):  # the only operator this scheme rewrites
        for name, init in inits.items():
            users = readers.get(name, [])
            # Only a 2-D float weight read solely as the right-hand side of MatMuls not excluded.
            if len(init.dims) == 2 and init.data_type == onnx.TensorProto.FLOAT and users and all(
                    u.op_type == "MatMul" and u.input[1] == name and u.name not in excluded for u in users):
                chosen.append(name)
    if not chosen:
        raise UserError("quantize int8-weight-only: no MatMul with a constant float weight to quantize")
    before_params = 0
    for index, name in enumerate(chosen):
        weight = numpy_helper.to_array(inits[name])
        before_params += weight.size
        quantized, scale = per_channel_int8(weight, axis=1)  # MatMul B is [in, out]
        model.graph.initializer.remove(inits[name])
        model.graph.initializer.extend([
            numpy_helper.from_array(quantized, f"{name}_int8"),
            numpy_helper.from_array(scale, f"{name}_scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{name}_zero_point")])
        model.graph.node.insert(0, helper.make_node(
            "DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"], [name],
            name=f"compress_dequantize_{index}", axis=1))
    out = OnnxModel(ctx.workdir / "model.onnx", artifact.task, with_past=artifact.with_past)
    external = artifact.needs_external_data()
    onnx.save(model, str(out.path), save_as_external_data=external,
              location=out.path.name + ".data" if external else None)
    copy_tokenizer_files(artifact.folder, ctx.workdir)
    ctx.details.update({"backend": "onnx", "quantized_weights": len(chosen), "quantized_parameters": before_params,
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(out.size_mb(), 3)})
    return out


# ---------------------------------------------------------------------------------------------
# torch: Linear layers swapped for a module holding int8 weights; saved as int8 in safetensors


def _int8_linear_class():
    import torch
    import torch.nn.functional as F

    class Int8WeightOnlyLinear(torch.nn.Module):
        """nn.Linear with an int8 weight and a float scale per output channel; dequantized per call."""

        def __init__(self, in_features: int, out_features: int, bias: bool):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
            self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None

        @classmethod
        def from_linear(cls, linear):
            module = cls(linear.in_features, linear.out_features, linear.bias is not None)
            quantized, scale = per_channel_int8(linear.weight.detach().float().numpy(), axis=0)
            module.weight_int8.copy_(torch.from_numpy(quantized))
            module.weight_scale.copy_(torch.from_numpy(scale))
            if linear.bias is not None:
                module.bias.data.copy_(linear.bias.detach().float())
            return module

        def forward(self, x):
            weight = self.weight_int8.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
            return F.linear(x, weight, self.bias)

    return Int8WeightOnlyLinear


def _swap(module, names: list[str], build) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, build(getattr(parent, child)))


def weight_only_torch(config, artifact: TorchModel, ctx: StageContext) -> TorchModel:
    import torch
    from safetensors.torch import save_model

    from ..checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, load_torch_model

    if artifact.transforms:
        raise UserError("quantize int8-weight-only: the model is already quantized "
                        f"({artifact.transforms[-1]['name']}); quantize once")
    module = load_torch_model(artifact, allow_pickle=ctx.allow_pickle, trust_remote_code=ctx.trust_remote_code)
    names = [name for name, child in module.named_modules() if isinstance(child, torch.nn.Linear)
             and not any(fnmatch.fnmatchcase(name, p) for p in config.exclude)]
    if not names:
        raise UserError("quantize int8-weight-only: no nn.Linear left to quantize after `exclude`")
    linear = _int8_linear_class()
    module = copy.deepcopy(module)  # the baseline may share the loaded module; it keeps its float weights
    _swap(module, names, linear.from_linear)
    out = ctx.workdir / "model"
    out.mkdir()
    copy_checkpoint_files(artifact.path, out)
    # save_model drops the duplicate of weights that stay tied (embeddings and an excluded lm_head).
    save_model(module, str(out / "model.safetensors"), metadata={"format": "pt"})
    transform = {"name": TRANSFORM, "layers": names, "stored": True}
    (out / TRANSFORMS_FILE).write_text(json.dumps({"transforms": [transform]}, indent=2))
    result = TorchModel(out, artifact.task, transforms=[transform], module=module)
    ctx.details.update({"backend": "torch", "quantized_linear_layers": len(names),
                        "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(result.size_mb(), 3)})
    return result


def load_weight_only_torch(artifact: TorchModel, transform: dict, trust_remote_code: bool):
    """Rebuild the model from its config, swap in the int8 layers, and load the stored tensors."""
    import torch
    from safetensors.torch import load_model
    from transformers import AutoConfig

    from ..checkpoint import model_class

    config = AutoConfig.from_pretrained(artifact.path, trust_remote_code=trust_remote_code)
    module = model_class(artifact.task).from_config(config, trust_remote_code=trust_remote_code,
                                                    dtype=torch.float32)
    linear = _int8_linear_class()
    _swap(module, transform["layers"], lambda old: linear(old.in_features, old.out_features, old.bias is not None))
    missing, unexpected = load_model(module, str(artifact.path / "model.safetensors"), strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise UserError(f"{artifact.path / 'model.safetensors'}: does not match its int8-weight-only layout "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return module.eval()
