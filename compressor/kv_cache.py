"""An FP8 KV cache: one static E4M3 scale per attention layer for the keys and one for the values it caches,
calibrated on data, and the hook that quantizes what enters the cache as a server's FP8 cache stores it.

vLLM (`kv_cache_dtype="fp8"`) and transformers with compressed-tensors (its `kv_cache_scheme`) keep each
attention layer's keys, after rotary positions, and values in E4M3 with per-tensor scales read from
`<attention>.k_scale` and `<attention>.v_scale`. compress computes a scale as max|x| / 448 over the calibration
tokens, keeps the scales as buffers on the attention module (so they are saved with the model), and quantizes
and dequantizes the keys and values on their way into the cache: the same tensors and the same rounding as
compressed-tensors' reload, so what compress evaluates is what the folder computes when a server loads it.

The hook replaces the cache the attention module is handed with a gate whose `update` quantizes first and
then passes on to the real cache (or returns the quantized tensors when there is none, as in a forward pass
without a cache). Every transformers 5 attention that writes through `past_key_values.update` works so; the
modules it applies to are found by compressed-tensors' own rule (an attention class with key / value
projections whose forward takes the cache), so the reload quantizes the same layers.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

from .errors import UserError
from .w8a8_layers import FP8_MAX, fake_quantize_activations

KV_PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "kv_b_proj")  # compressed-tensors' test for a cached attention
SCALES = ("k_scale", "v_scale")
# What attention modules call the cache they are handed: `cache` from transformers 5.2x on (which still takes
# `past_key_values`, deprecated), `past_key_values` / `past_key_value` before.
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")


def _cache_argument(attention) -> Optional[str]:
    try:
        parameters = inspect.signature(attention.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in CACHE_ARGUMENTS if name in parameters), None)


def cached_attention(module) -> dict:
    """{name: attention module} for every attention layer whose keys and values a cache would hold."""
    return {name: child for name, child in module.named_modules()
            if "attention" in type(child).__name__.lower() and any(hasattr(child, p) for p in KV_PROJECTIONS)
            and _cache_argument(child) is not None}


class _CacheGate:
    """Stands in for the cache an attention module is handed: `update` transforms the new keys and values, then
    hands them to the real cache (or back, when the call has none). Anything else is the real cache's."""

    def __init__(self, transform: Callable, cache):
        self._transform, self._cache = transform, cache

    def update(self, key_states, value_states, *args, **kwargs):
        key_states, value_states = self._transform(key_states, value_states)
        if self._cache is None:
            return key_states, value_states
        return self._cache.update(key_states, value_states, *args, **kwargs)

    def __getattr__(self, name):
        cache = self.__dict__.get("_cache")
        if cache is None:
            raise AttributeError(name)
        return getattr(cache, name)


def _gate(attention, transform: Callable):
    argument = _cache_argument(attention)

    def hook(_module, args, kwargs):
        name = next((n for n in CACHE_ARGUMENTS if n in kwargs), argument)  # as the caller named it
        kwargs[name] = _CacheGate(transform, kwargs.get(name))
        return args, kwargs

    return attention.register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def observed_kv(attention: dict) -> Iterator[dict]:
    """Within the block, the largest |key| and |value| each attention layer caches: {name: [k max, v max,
    tokens]}, the keys and values themselves unchanged."""
    import torch

    peaks = {name: [0.0, 0.0, 0] for name in attention}

    def observer(name):
        def observe(keys, values):
            seen = peaks[name]
            seen[0] = max(seen[0], float(keys.detach().abs().amax()))
            seen[1] = max(seen[1], float(values.detach().abs().amax()))
            seen[2] += keys.shape[0] * keys.shape[-2]  # (batch, heads, positions, head dim): tokens cached
            return keys, values
        return observe

    handles = [_gate(layer, observer(name)) for name, layer in attention.items()]
    try:
        with torch.no_grad():
            yield peaks
    finally:
        for handle in handles:
            handle.remove()


def fp8_scales(peaks: dict, what: str) -> dict:
    """{name: (k scale, v scale)} from observed peaks; a layer no token reached has no scale and is refused."""
    empty = [name for name, (k, v, tokens) in peaks.items() if tokens == 0 or not (k > 0 and v > 0)]
    if empty:
        raise UserError(f"{what}: no calibration token reached the KV cache of {empty[:3]}, so it has no FP8 scale; "
                        "calibrate with more samples, or keep kv_cache: float")
    return {name: (k / FP8_MAX, v / FP8_MAX) for name, (k, v, _) in peaks.items()}


def _quantizer(attention):
    def quantize(keys, values):
        return (fake_quantize_activations(keys, "fp8", "tensor", attention.k_scale),
                fake_quantize_activations(values, "fp8", "tensor", attention.v_scale))
    return quantize


def install_fp8_kv(module, names: list[str], scales: Optional[dict] = None) -> None:
    """Give each named attention layer its `k_scale` / `v_scale` buffers (the calibrated values, or ones that a
    state dict loaded afterwards fills) and the hook that quantizes what enters its cache with them."""
    import torch

    attention = cached_attention(module)
    missing = [name for name in names if name not in attention]
    if missing:
        raise UserError(f"an FP8 KV cache was recorded for {missing[:3]}, which are not cached attention layers here")
    for name in names:
        layer = attention[name]
        for index, buffer in enumerate(SCALES):
            value = scales[name][index] if scales else 1.0
            layer.register_buffer(buffer, torch.full((1,), float(value), dtype=torch.float32))
        _gate(layer, _quantizer(layer))


def apply_written_kv_scheme(module, folder: Path) -> int:
    """A compressed-tensors folder whose config asks for an FP8 KV cache (`kv_cache_scheme`), loaded by a
    transformers whose compressed-tensors did not hook the attention (0.20 looks for a `past_key_values`
    argument that transformers 5.2x's attention calls `cache`): quantize the cache here, with the scales the
    folder holds, so that the model computes what a server loading the folder does. Returns the number of
    layers hooked here; 0 where nothing is asked or the loader already quantizes the cache."""
    import json

    config = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    scheme = config.get("kv_cache_scheme")
    if not scheme:
        return 0
    if (scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy"), bool(scheme.get("dynamic"))) != \
            ("float", 8, "tensor", False):
        raise UserError(f"{folder}: kv_cache_scheme {scheme} is not one compress evaluates (8-bit float, one static "
                        "scale per tensor)")
    attention = cached_attention(module)
    if any(hasattr(layer, "kv_cache") for layer in attention.values()):  # compressed-tensors' own hook
        return 0
    from safetensors import safe_open

    wanted = {f"{name}.{scale}" for name in attention for scale in SCALES}
    found = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as handle:
            found.update({key: float(handle.get_tensor(key).reshape(-1)[0]) for key in handle.keys() if key in wanted})
    missing = sorted(wanted - set(found))
    if missing:
        raise UserError(f"{folder}: kv_cache_scheme asks for an FP8 KV cache, but {missing[:2]} are not in its "
                        "weights")
    install_fp8_kv(module, list(attention), {name: (found[f"{name}.k_scale"], found[f"{name}.v_scale"])
                                             for name in attention})
    return len(attention)
