"""export_compressed_tensors: a torch result written in the compressed-tensors layout, the format
llm-compressor writes and transformers (with the `compressed-tensors` package) and vLLM load.

What is written, per quantized nn.Linear `L` ("pack-quantized", compressed-tensors 0.19):
- `L.weight_packed` int32 [out, in * bits / 32]: signed codes q stored as q + 2^(bits-1), packed
  along the input axis, the first value in the lowest bits;
- `L.weight_scale` [out, groups] (int4, groups of `group_size` inputs) or [out, 1] (int8, one per
  output channel), `L.weight_shape` int64 [out, in], and for asymmetric int4
  `L.weight_zero_point` int32, the signed zero points packed the same way along the output axis;
- weight = (q - zero point) * scale, which is compress's (code - zero) * scale with q = code - 8
  (int4) or q = the int8 value: the same numbers, so nothing is rounded again.
config.json gets a `quantization_config` (quant_method compressed-tensors, one config group
targeting Linear, every Linear left in float listed in `ignore`).

An fp8 / w8a8-int8 result (8-bit weights and activations) is written `float-quantized` / `int-quantized`:
`L.weight` holds the 8-bit values themselves (float8_e4m3fn or int8), `L.weight_scale` their scales and,
for static activations, `L.input_scale`; the config group names the weights' and the input activations'
strategies. compress's scales and codes are compressed-tensors' own (w8a8_layers.py), so transformers'
reload, which quantizes activations per call, computes the same logits. A float model (pruned or not) is
written as plain safetensors with an informational `sparsity_config` (dense storage, its 2:4 or
unstructured pattern and sparsity) and no quantization groups.

After writing, the folder is reloaded with transformers and its logits compared with the model it
came from: what compress evaluates afterwards is what a server loads."""

from __future__ import annotations

import json
import logging
import shutil
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from ...anatomy import (architecture_of, checkpoint_name, fused_experts_layout, is_fused_experts,
                        overrides_linear_forward)
from ...artifacts import TorchModel
from ...checkpoint import TRANSFORMS_FILE, copy_checkpoint_files, empty_model, load_torch_model, quantization_method
from ...embeddings import dequantized_table, is_quantized_embedding
from ...errors import StageFailed, UserError
from ...kv_cache import SCALES, cached_attention
from ...linear_layers import conv1d_names, is_linear_like, out_in_weight, shape_of
from ...torch_transforms import EIGHT_BIT_ACTIVATIONS, FP8, INT4_WEIGHT_ONLY, INT8_WEIGHT_ONLY
from ...w8a8_layers import BLOCK, is_w8a8_linear
from ..base import Stage, StageConfigBase, StageContext
from .export_onnx import max_abs_difference

log = logging.getLogger(__name__)

FORMAT_VERSION = "0.19.0"  # the compressed-tensors release whose layout this writes
WRITABLE_SCHEMES = (INT4_WEIGHT_ONLY, INT8_WEIGHT_ONLY) + EIGHT_BIT_ACTIVATIONS
# Share of zeros above which a float model's sparsity is recorded as unstructured.
SPARSE_ENOUGH = 0.05


class ExportCompressedTensorsConfig(StageConfigBase):
    type: Literal["export_compressed_tensors"]
    atol: float = Field(1e-4, gt=0, description="max abs difference allowed between the reloaded folder's logits "
                                                "and the model it was written from")


class ExportCompressedTensors(Stage):
    type = "export_compressed_tensors"
    summary = "Write a torch result (int4 / int8 weight-only, or sparse float) in the compressed-tensors layout"
    config_model = ExportCompressedTensorsConfig
    accepts = ("torch",)
    last_only = True

    def check_order(self, config, earlier):
        for index, stage in enumerate(earlier):
            scheme = getattr(stage, "scheme", None)
            if stage.type == "quantize" and scheme not in WRITABLE_SCHEMES:
                return f"compressed-tensors holds int4 / int8 weight-only, fp8 and w8a8-int8 models; stages[{index}] " \
                       f"quantizes to {scheme}"
            if stage.type == "quantize" and scheme == "int4-weight-only" and not stage.symmetric:
                return "write asymmetric int4 in compressed-tensors only where a loader reads it: transformers " \
                       f"4.57 with compressed-tensors 0.19 cannot (zero-point shape); set symmetric: true in " \
                       f"stages[{index}]"
        return None

    def backends(self, config, input_kind):
        return ["safetensors", "compressed_tensors"]

    def run(self, config: ExportCompressedTensorsConfig, artifact: TorchModel, ctx: StageContext) -> TorchModel:
        import torch
        from safetensors.torch import save_file

        module = load_torch_model(artifact, ctx.allow_pickle, ctx.trust_remote_code)
        transforms = artifact.transforms
        if transforms and not (len(transforms) == 1 and transforms[0].get("stored")
                               and transforms[0]["name"] in WRITABLE_SCHEMES):
            raise UserError(f"export_compressed_tensors: {transforms[-1].get('name')} has no compressed-tensors form; "
                            "int4-weight-only, int8-weight-only, fp8 and w8a8-int8 do")
        if not transforms:
            existing = quantization_method(artifact.path)
            if existing:
                raise UserError(f"{artifact.path}: holds {existing} weights; compressed-tensors is written from "
                                "compress's int4 / int8 weight-only results or float weights")
        transform = transforms[0] if transforms else None
        if transform is not None and transform["name"] == INT4_WEIGHT_ONLY and not transform["symmetric"]:
            raise UserError("export_compressed_tensors: asymmetric int4 has no loader here (transformers 4.57 with "
                            "compressed-tensors 0.19 cannot read its zero points); quantize with symmetric: true")
        if transform is not None:
            _refuse_unloadable(empty_model(artifact.path, artifact.task, ctx.trust_remote_code), transform["layers"])
            _refuse_interleaved_experts(module)
        if transform is not None and transform["name"] in EIGHT_BIT_ACTIVATIONS:
            _refuse_unmatched_activations(module)
        architecture = architecture_of(module)
        tensors, quantized, dequantized = {}, set(), set()
        table = (transform or {}).get("embeddings")
        with torch.no_grad():
            for name, layer in module.named_modules():
                kind = type(layer).__name__
                stored = checkpoint_name(architecture, name)  # experts under their checkpoints' names
                if is_quantized_embedding(layer) or (table and name == table["head"]):
                    # The groups quantize Linear layers with one scheme: the table goes in float (its dequantized
                    # codes, the values compress computes with), and the head quantized with it too (a tied one
                    # is the table; transformers ties it on load)
                    if is_quantized_embedding(layer):
                        tensors[f"{stored}.weight"] = dequantized_table(layer).contiguous()
                    elif not table["head_tied"]:
                        tensors[f"{stored}.weight"] = layer.dequantized_weight(torch.float32).contiguous()
                        if layer.bias is not None:
                            tensors[f"{stored}.bias"] = layer.bias.detach().contiguous()
                    dequantized.add(name)
                    continue
                if kind == "Int4WeightOnlyLinear":
                    tensors.update(_int4_tensors(stored, layer, transform["symmetric"]))
                elif kind == "Int8WeightOnlyLinear":
                    tensors.update(_int8_tensors(stored, layer))
                elif is_w8a8_linear(layer):
                    tensors.update(_w8a8_tensors(stored, layer))
                else:
                    continue
                quantized.add(name)
                if layer.bias is not None:
                    tensors[f"{stored}.bias"] = layer.bias.detach().contiguous()
            state = module.state_dict()
            for key, value in state.items():
                owner, _, leaf = key.rpartition(".")
                if owner not in quantized | dequantized and not key.endswith("rotary_emb.inv_freq"):
                    tensors[f"{checkpoint_name(architecture, owner)}.{leaf}"] = value.detach().contiguous()
        linears = [name for name, layer in module.named_modules() if is_linear_like(layer) or name in quantized
                   or (table and name == table["head"])]
        ignore = [name for name in linears if name not in quantized]
        sparsity = _sparsity(module, ignore) if transform is None else {}
        out = ctx.workdir / "model"
        out.mkdir(parents=True)
        _drop_tied_copies(tensors)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        copy_checkpoint_files(artifact.path, out)
        (out / TRANSFORMS_FILE).unlink(missing_ok=True)
        config_file = out / "config.json"
        model_config = json.loads(config_file.read_text())
        model_config["quantization_config"] = quantization_config(transform, ignore, sparsity)
        model_config["dtype"] = "float32"
        if "lm_head" in quantized:  # its own packed weights: tying it to the float embeddings would be wrong
            model_config["tie_word_embeddings"] = False
        config_file.write_text(json.dumps(model_config, indent=2) + "\n")
        result = TorchModel(out, artifact.task)
        try:
            diff = _reload_difference(artifact, module, result, (transform or {}).get("kv_cache"), tensors, ctx)
        except UserError:
            shutil.rmtree(out, ignore_errors=True)
            raise
        ctx.details.update({"format": storage_format(transform),
                            "quantized_linear_layers": len(quantized), "ignored_linear_layers": len(ignore),
                            "reload_max_abs_diff": diff, "atol": config.atol,
                            "size_mb_before": round(artifact.size_mb(), 3), "size_mb_after": round(result.size_mb(), 3),
                            **({"sparsity": sparsity} if sparsity else {})})
        if table:
            also = f" and the head {table['head']}" if table["head"] else ""
            ctx.notes.append(f"export_compressed_tensors: the {table['scheme']} embedding table {table['name']}{also} "
                             "are written float (their dequantized values): compressed-tensors gives Linear layers "
                             "one scheme and has no quantized embedding")
            ctx.details["embeddings"] = "float (dequantized)"
        if not diff <= config.atol:
            raise StageFailed(f"export_compressed_tensors: transformers reloads the folder with logits {diff:.3g} away "
                              f"from the model it was written from (atol {config.atol:g})")
        return result


def _reload_difference(artifact, module, result, kv_cache: Optional[dict], tensors: dict, ctx) -> float:
    """Largest |logit| difference between the folder as it loads and the model it came from. With an FP8 KV
    cache, its scales are first checked as written (one k_scale and v_scale per layer, the values compress
    evaluated with), and the loaded model must quantize its cache: through compressed-tensors' hook where
    transformers' loader installs it, else through compress's from the written scales (kv_cache.py)."""
    import torch

    if kv_cache:
        layers = cached_attention(module)
        for name in kv_cache["attention"]:
            for scale in SCALES:
                stored = tensors.get(f"{name}.{scale}")
                if stored is None or not torch.equal(stored, getattr(layers[name], scale)):
                    raise StageFailed(f"export_compressed_tensors: {name}.{scale} was not written as evaluated")
        loaded = cached_attention(load_torch_model(result))
        if any(hasattr(layer, "kv_cache") for layer in loaded.values()):
            ctx.details["kv_cache"] = "fp8, run by transformers' compressed-tensors loader"
        elif all(hasattr(layer, "k_scale") for layer in loaded.values()):
            ctx.details["kv_cache"] = "fp8, run by compress from the written scales"
            ctx.notes.append("export_compressed_tensors: transformers with compressed-tensors here loads the folder "
                             "with its KV cache float (compressed-tensors' hook looks for an attention argument "
                             "transformers now calls `cache`); compress quantizes the cache from the written "
                             "kv_cache_scheme and scales when it loads the folder, as vLLM does")
        else:
            raise StageFailed("export_compressed_tensors: the reloaded folder does not quantize its KV cache")
    return max_abs_difference(artifact, result, ctx)


def _refuse_unloadable(skeleton, quantized: list[str]) -> None:
    """Layers compressed-tensors' loaders cannot run once quantized, named before anything is written."""
    if conv1d_names(skeleton):
        raise UserError("export_compressed_tensors: quantized GPT-2-style Conv1D models are not written in "
                        "compressed-tensors yet (its groups target Linear layers, and GPT-2's weights are stored "
                        "transposed); write the float model, or keep compress's own int4 / int8 result")
    modules = dict(skeleton.named_modules())
    custom = sorted({type(modules[name]).__name__ for name in quantized
                     if name in modules and overrides_linear_forward(modules[name])})
    if custom:
        raise UserError(f"export_compressed_tensors: {architecture_of(skeleton)}'s {', '.join(custom)} layers compute "
                        "with their own forward on `weight`, which compressed-tensors' loader replaces with packed "
                        "tensors, so transformers could not run the folder; keep compress's own int4 / int8 result, "
                        "or write the float model")


def _refuse_interleaved_experts(module) -> None:
    """GPT-OSS keeps its experts as fused tensors with gate and up interleaved (and biases): transformers
    has no per-expert layers to load quantized experts into (on the tiny GPT-OSS the reload was 0.65 off)."""
    if any(fused_experts_layout(m) == "interleaved" or getattr(m, "layout", None) == "interleaved"
           for m in module.modules()):
        raise UserError(f"export_compressed_tensors: {architecture_of(module)} keeps its experts as fused tensors "
                        "(gate and up interleaved, with biases), which transformers' compressed-tensors loader cannot "
                        "fill from quantized per-expert layers; keep compress's own result, or write the float model")


def _refuse_unmatched_activations(module) -> None:
    """Where transformers' compressed-tensors loader would not quantize activations as compress evaluated them.
    - Mixture-of-experts: transformers loads the experts as fused tensors and runs them with float inputs (no
      activation quantization inside experts); on qwen3_moe and mixtral the reloaded logits differed by 0.01.
    - Layers called with 2-D inputs (OPT flattens tokens before its MLP): compressed-tensors' per-token
      strategy keeps dimensions 0 and 1, so a (tokens, features) input gets one scale for all tokens."""
    import torch

    if any(is_fused_experts(m) or type(m).__name__ == "LinearExperts" for m in module.modules()):
        raise UserError(f"export_compressed_tensors: transformers loads {architecture_of(module)}'s experts as fused "
                        "tensors and runs them without 8-bit activations, so the folder would not compute what "
                        "compress evaluated; keep compress's own result, or write int4 / int8 weight-only")
    flat = []
    handles = [layer.register_forward_pre_hook(lambda _m, args, n=name: flat.append(n) if args[0].ndim == 2 else None)
               for name, layer in module.named_modules() if is_w8a8_linear(layer)]
    try:
        with torch.no_grad():
            module(input_ids=torch.tensor([[2, 40, 41, 42]]))
    finally:
        for handle in handles:
            handle.remove()
    if flat:
        raise UserError(f"export_compressed_tensors: {architecture_of(module)} calls {flat[0]} (and "
                        f"{len(flat) - 1} more) with (tokens, features) inputs, which compressed-tensors' per-token "
                        "activation quantization scales as one tensor, so the reloaded folder would not compute what "
                        "compress evaluated; keep compress's own result, or write int4 / int8 weight-only")


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned `bits`-bit values (rows x n) packed along the last axis into int32 words, the first
    value in the lowest bits; the last word is padded with zeros."""
    per_word = 32 // bits
    rows, n = values.shape
    padded = np.zeros((rows, -(-n // per_word) * per_word), dtype=np.uint32)
    padded[:, :n] = values
    shifts = (np.arange(per_word, dtype=np.uint32) * bits)[None, None, :]
    words = (padded.reshape(rows, -1, per_word) << shifts).sum(axis=2, dtype=np.uint64).astype(np.uint32)
    return words.view(np.int32)


def _int4_tensors(name: str, layer, symmetric: bool) -> dict:
    import torch

    if layer.in_features % layer.group_size:
        raise UserError(f"export_compressed_tensors: {name} has {layer.in_features} inputs, not a multiple of the "
                        f"int4 block size {layer.group_size}; compressed-tensors needs whole groups (quantize with a "
                        "block_size that divides every layer's input size)")
    codes = layer.codes().numpy().astype(np.uint32)  # q + 8 with q = code - 8: the codes themselves
    tensors = {f"{name}.weight_packed": torch.from_numpy(pack_int32(codes, 4)),
               f"{name}.weight_scale": layer.weight_scale.detach().float().contiguous(),
               f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}
    if not symmetric:  # signed zero points zp = zero - 8, stored as zp + 8, packed along the outputs
        zeros = layer.weight_zero_point.numpy().astype(np.uint32)
        tensors[f"{name}.weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(pack_int32(zeros.T, 4).T))
    return tensors


def _int8_tensors(name: str, layer) -> dict:
    import torch

    values = (layer.weight_int8.numpy().astype(np.int16) + 128).astype(np.uint32)
    return {f"{name}.weight_packed": torch.from_numpy(pack_int32(values, 8)),
            f"{name}.weight_scale": layer.weight_scale.detach().float().reshape(-1, 1).contiguous(),
            f"{name}.weight_shape": torch.tensor([layer.out_features, layer.in_features], dtype=torch.int64)}


def _w8a8_tensors(name: str, layer) -> dict:
    """`float-quantized` / `int-quantized`: the 8-bit weight itself under `weight`, its scales, and a static
    input scale; compress's codes and scales are compressed-tensors' (w8a8_layers.py), written as they are."""
    tensors = {f"{name}.weight": layer.weight_q.contiguous(),
               f"{name}.weight_scale": layer.weight_scale.detach().float().contiguous()}
    if layer.input_scale is not None:
        tensors[f"{name}.input_scale"] = layer.input_scale.detach().float().contiguous()
    return tensors


def storage_format(transform: Optional[dict]) -> str:
    if transform is None:
        return "dense"
    if transform["name"] in EIGHT_BIT_ACTIVATIONS:
        return "float-quantized" if transform["name"] == FP8 else "int-quantized"
    return "pack-quantized"


def _eight_bit_group(transform: dict) -> dict:
    """The config group of an fp8 / w8a8-int8 result: 8-bit weights and input activations of one type."""
    kind = "float" if transform["name"] == FP8 else "int"
    weights = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": transform["weights"],
               "dynamic": False, "group_size": None, "block_structure": None, "actorder": None}
    if transform["weights"] == "block":
        weights["block_structure"] = [BLOCK, BLOCK]
    activations = {"num_bits": 8, "type": kind, "symmetric": True, "strategy": transform["activations"],
                   "dynamic": transform["activations"] != "tensor", "group_size": None, "block_structure": None,
                   "actorder": None}
    if transform["activations"] == "group":
        activations["group_size"] = BLOCK
    return {"targets": ["Linear"], "weights": weights, "input_activations": activations,
            "output_activations": None, "format": storage_format(transform)}


def _kv_cache_scheme(transform: Optional[dict]) -> Optional[dict]:
    """compressed-tensors' `kv_cache_scheme` for an FP8 KV cache (kv_cache.py): E4M3, one static scale per
    layer for keys and one for values, read from `<attention>.k_scale` / `.v_scale` (written with the state)."""
    if not (transform or {}).get("kv_cache"):
        return None
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False,
            "group_size": None, "block_structure": None, "actorder": None}


def _drop_tied_copies(tensors: dict) -> None:
    """safetensors refuses tensors sharing memory: keep the first name of each tied weight (the
    embedding's, which state_dict lists before lm_head; transformers ties them again on load)."""
    seen = set()
    for key in list(tensors):
        pointer = tensors[key].data_ptr()
        if pointer in seen and tensors[key].numel() > 1:
            del tensors[key]
        else:
            seen.add(pointer)


def _sparsity(module, ignore: list[str]) -> dict:
    """Pattern and share of zeros over the float Linear (and Conv1D) weights but lm_head, or {} when
    they are dense. 2:4 runs along each output's inputs."""
    weights = [out_in_weight(layer).detach() for name, layer in module.named_modules()
               if is_linear_like(layer) and name != "lm_head" and shape_of(layer)[0] % 4 == 0]
    for layer in module.modules():  # fused experts: each expert's (outputs, inputs) rows
        layout = fused_experts_layout(layer)
        for fused in ((layer.gate_up_proj, layer.down_proj) if layout is not None else ()):
            # (experts, outputs, inputs): GPT-OSS stores (experts, inputs, outputs)
            per_expert = fused.detach() if layout == "concatenated" else fused.detach().transpose(1, 2)
            weights.append(per_expert.reshape(-1, per_expert.shape[-1]))
    if not weights:
        return {}
    zeros = sum(int((w == 0).sum()) for w in weights)
    share = zeros / sum(w.numel() for w in weights)
    two_four = all(bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()) for w in weights)
    if two_four:
        return {"format": "dense", "sparsity_structure": "2:4", "global_sparsity": round(share, 4),
                "targets": ["Linear"], "ignore": ["lm_head"]}
    if share >= SPARSE_ENOUGH:
        return {"format": "dense", "sparsity_structure": "unstructured", "global_sparsity": round(share, 4),
                "targets": ["Linear"], "ignore": ["lm_head"]}
    return {}


def quantization_config(transform: Optional[dict], ignore: list[str], sparsity: dict) -> dict:
    """config.json's `quantization_config` for compressed-tensors."""
    groups = {}
    if transform is not None and transform["name"] in EIGHT_BIT_ACTIVATIONS:
        groups = {"group_0": _eight_bit_group(transform)}
    elif transform is not None:
        if transform["name"] == INT4_WEIGHT_ONLY:
            weights = {"num_bits": 4, "symmetric": transform["symmetric"], "strategy": "group",
                       "group_size": transform["group_size"]}
        else:
            weights = {"num_bits": 8, "symmetric": True, "strategy": "channel", "group_size": None}
        weights.update({"type": "int", "dynamic": False, "actorder": None})
        groups = {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                              "output_activations": None, "format": "pack-quantized"}}
    return {"quant_method": "compressed-tensors", "format": storage_format(transform),
            "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
            "kv_cache_scheme": _kv_cache_scheme(transform), "global_compression_ratio": None, "sparsity_config": sparsity,
            "version": FORMAT_VERSION}
