"""Small ONNX graph helpers shared by the ONNX stages and runners: node selection by pattern, the
graph's float type, and completing a tokenizer's feed into the inputs a graph takes.

A leaf: it imports nothing of the pipeline, so stages and runners can both rely on it."""

from __future__ import annotations

import fnmatch

import numpy as np

from .errors import UserError


def match_nodes(names: list[str], patterns: list[str], field: str) -> list[str]:
    """Node names matching any pattern; a pattern that matches nothing is a recipe error."""
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise UserError(f"quantize.{field}: no node matches {unmatched}; node names look like {names[:3]}")
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def graph_float_type(model) -> int:
    """The float type a graph computes in, read from its first float output. Fused graphs hold
    com.microsoft ops (Attention, SkipLayerNormalization) that ONNX shape inference cannot type;
    ONNX Runtime's quantizers take this as the type of such untyped tensors."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    return next((o.type.tensor_type.elem_type for o in model.graph.output
                 if o.type.tensor_type.elem_type in floats), onnx.TensorProto.FLOAT)


def _ort_dtype(type_name: str):
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
            "tensor(int32)": np.int32}.get(type_name, np.float32)


def complete_feed(session_inputs, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs an ONNX graph takes, from a tokenizer's output: drop what it does not take and fill
    in what tokenizers do not produce (position ids, token type ids, empty past key/values)."""
    wanted = {i.name: i for i in session_inputs}
    inputs = {k: v for k, v in feed.items() if k in wanted}
    batch, length = feed["input_ids"].shape
    if "position_ids" in wanted and "position_ids" not in inputs:
        inputs["position_ids"] = np.broadcast_to(np.arange(length, dtype=np.int64), (batch, length)).copy()
    if "token_type_ids" in wanted and "token_type_ids" not in inputs:
        inputs["token_type_ids"] = np.zeros_like(feed["input_ids"])
    for name, meta in wanted.items():
        if name.startswith("past_key_values"):
            heads, head_dim = meta.shape[1], meta.shape[3]
            inputs[name] = np.zeros((batch, heads, 0, head_dim), dtype=_ort_dtype(meta.type))
    return inputs
