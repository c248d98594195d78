"""Sharded safetensors checkpoints read one tensor at a time and written one tensor at a time, so a model
larger than memory can be compressed block by block (layerwise.py).

Reading checks what a half-copied or hand-edited checkpoint gets wrong before any work starts: an index
that names a shard which is not there, a shard cut short (its header promises more bytes than the file
holds), a tensor listed in the index but not in its shard, and weights in more than one float dtype."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

from .errors import UserError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_BYTES = 2 * 1024 ** 3  # the size transformers' save_pretrained starts a new shard at (its default is 5 GB)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


def _header(path: Path) -> dict:
    """A safetensors file's JSON header, checked against the file's length."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        length = struct.unpack("<Q", raw)[0]
        if length > size - 8:
            raise UserError(f"{path}: truncated or not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise UserError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if 8 + length + end > size:
        raise UserError(f"{path}: truncated: its tensors need {8 + length + end:,} bytes, the file has {size:,} "
                        "(an interrupted copy or download?)")
    return header


class ShardedCheckpoint:
    """The tensors of a Hugging Face folder (`model.safetensors` or an index and its shards), by name."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError):
                raise UserError(f"{index}: not a safetensors index (no weight_map)") from None
        elif (self.folder / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise UserError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.shard_of: dict[str, str] = {}
        self.headers: dict[str, dict] = {}
        shards = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        for shard in shards:
            path = self.folder / shard
            if not path.is_file():
                raise UserError(f"{index}: names shard {shard}, which is not in {self.folder}")
            self.headers[shard] = _header(path)
        if weight_map:
            for name, shard in weight_map.items():
                if name not in self.headers[shard]:
                    raise UserError(f"{index}: lists {name} in {shard}, which does not hold it")
            self.shard_of = dict(weight_map)
        else:
            self.shard_of = {name: SINGLE_FILE for name in self.headers[SINGLE_FILE]}
        self._open: dict[str, object] = {}

    def info(self, name: str) -> dict:
        return self.headers[self.shard_of[name]][name]

    def names(self, prefix: str = "") -> list[str]:
        return [name for name in self.shard_of if name.startswith(prefix)]

    def float_dtype(self) -> str:
        """The one float dtype of the weights (e.g. BF16); mixed float dtypes are refused."""
        found: dict[str, str] = {}
        for name in self.shard_of:
            dtype = self.info(name)["dtype"]
            if dtype in FLOAT_DTYPES:
                found.setdefault(dtype, name)
        if len(found) > 1:
            examples = ", ".join(f"{name} is {dtype}" for dtype, name in found.items())
            raise UserError(f"{self.folder}: weights in more than one float dtype ({examples}); layer-by-layer "
                            "compression writes each tensor back in the checkpoint's dtype and needs one")
        return next(iter(found), "F32")

    def nbytes(self, names: Optional[list[str]] = None) -> int:
        total = 0
        for name in names if names is not None else self.shard_of:
            info = self.info(name)
            total += info["data_offsets"][1] - info["data_offsets"][0]
        return total

    def tensor(self, name: str):
        """One tensor, read from its shard (memory-mapped; only this tensor's bytes are touched)."""
        from safetensors import safe_open

        shard = self.shard_of[name]
        if shard not in self._open:
            self._open[shard] = safe_open(str(self.folder / shard), framework="pt")
        return self._open[shard].get_tensor(name)

    def close(self) -> None:
        self._open.clear()


class ShardWriter:
    """Write tensors into `model-0000N-of-0000M.safetensors` shards of about `shard_bytes` and an index,
    as save_pretrained does. Shards are written under temporary names and renamed, with the index last,
    only by `finish()`: a killed run leaves no folder that looks like a finished checkpoint."""

    def __init__(self, folder: Path, shard_bytes: int = SHARD_BYTES):
        self.folder, self.shard_bytes = Path(folder), shard_bytes
        self.folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, object] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], int]] = []  # (temporary file, names, bytes)

    def add(self, name: str, tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous()
        self.pending_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.written):05d}.partial"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.written.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> dict[str, str]:
        """Rename the shards into place and write the index; returns the weight map."""
        if self.pending or not self.written:
            self._flush()
        count = len(self.written)
        weight_map, total = {}, 0
        for number, (path, names, size) in enumerate(self.written, start=1):
            final = SINGLE_FILE if count == 1 else f"model-{number:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / final)
            weight_map.update({name: final for name in names})
            total += size
        if count > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            partial = self.folder / (INDEX_FILE + ".partial")
            partial.write_text(json.dumps(index, indent=2) + "\n")
            os.replace(partial, self.folder / INDEX_FILE)
        return weight_map


def read_state(folder: Path) -> dict:
    """Every tensor of a folder's safetensors (one file or shards) as one state dict."""
    checkpoint = ShardedCheckpoint(folder)
    return {name: checkpoint.tensor(name) for name in checkpoint.names()}
