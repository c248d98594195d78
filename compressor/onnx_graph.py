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


def tidy_external_data(path) -> list[str]:
    """Make a saved graph's external data files hold what the graph references and no more, readable as
    model.onnx is. onnx writes external tensors into an existing file without truncating it, so ONNX
    Runtime's quantizer, which saves the float graph under the same name before the quantized one, left a
    4.0 GB file of which the int8 graph used 1.0 GB (docs/BENCHMARKS.md); and onnx creates the files
    readable by their owner alone, which a server running as another user cannot open. Returns what it did."""
    import os
    from pathlib import Path

    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    ends: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entry = {item.key: item.value for item in tensor.external_data}
            end = int(entry.get("offset", 0)) + int(entry.get("length", 0))
            ends[entry["location"]] = max(ends.get(entry["location"], 0), end)
    umask = os.umask(0)
    os.umask(umask)
    done = []
    for location, end in ends.items():
        data = path.parent / location
        if data.stat().st_size > end:
            done.append(f"{location}: {data.stat().st_size / 1e9:.3f} GB cut to the {end / 1e9:.3f} GB referenced")
            os.truncate(data, end)
        data.chmod(0o666 & ~umask)
    return done
