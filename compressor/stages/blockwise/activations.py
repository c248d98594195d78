"""The calibration batches' hidden states between transformer blocks, for the block-by-block walks
(sequential.py, awq.py): kept in memory, or, when they would take more than a quarter of the memory
available, written to disk one batch per file and read back when a block needs them. Each batch's
states are replaced by the block's outputs as soon as they are computed, so the store never holds
two generations: its size is tokens x hidden size x 4 bytes, checked against the free disk before
any block runs."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator, Optional

from ... import fit
from ...errors import UserError

SPILL_SHARE = 0.25  # of MemAvailable: past it, the hidden states go to disk


def hidden_of_call(args: tuple, kwargs: dict):
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(args: tuple, kwargs: dict, hidden) -> tuple[tuple, dict]:
    """The same call with new hidden states, whether they were passed by position or by name."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


class BlockInputs:
    """Per calibration batch, what the current block is called with. The hidden states live in memory
    or, with a `folder`, in one safetensors file per batch; the other arguments (masks, rotary
    embeddings: small) stay in memory."""

    def __init__(self, folder: Optional[Path] = None):
        self.folder = folder
        self._rest: list[tuple[tuple, dict]] = []
        self._hidden: list = []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def add(self, args: tuple, kwargs: dict) -> None:
        index = len(self._rest)
        self._rest.append(with_hidden(args, kwargs, None))
        self._hidden.append(None)
        self.replace(index, hidden_of_call(args, kwargs))

    def __len__(self) -> int:
        return len(self._rest)

    def replace(self, index: int, hidden) -> None:
        if self.folder is None:
            self._hidden[index] = hidden
            return
        from safetensors.torch import save_file

        save_file({"hidden": hidden.contiguous()}, str(self._path(index)))

    def call(self, index: int) -> tuple[tuple, dict]:
        args, kwargs = self._rest[index]
        if self.folder is None:
            hidden = self._hidden[index]
        else:
            from safetensors.torch import load_file

            hidden = load_file(str(self._path(index)))["hidden"]
        return with_hidden(args, kwargs, hidden)

    def calls(self) -> Iterator[tuple[tuple, dict]]:
        for index in range(len(self)):
            yield self.call(index)

    def advance(self, block) -> None:
        """Run every batch through `block` and keep its outputs as what the next block is called with."""
        for index in range(len(self)):
            args, kwargs = self.call(index)
            output = block(*args, **kwargs)
            self.replace(index, output[0] if isinstance(output, tuple) else output)

    def close(self) -> None:
        self._hidden.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"batch-{index:05d}.safetensors"


def activation_bytes(feeds: list[dict], hidden_size: int) -> int:
    """float32 hidden states of every calibration token at one point of the model."""
    return sum(int(feed["input_ids"].size) for feed in feeds) * hidden_size * 4


def block_inputs_store(feeds: list[dict], hidden_size: Optional[int], spill_dir: Optional[Path], stage: str,
                       details: Optional[dict] = None) -> BlockInputs:
    """Memory when the hidden states fit a quarter of what is available (or nothing says where to spill);
    else `spill_dir`, once its disk is known to hold them (refused up front with the numbers, not after
    an hour of calibration)."""
    need = activation_bytes(feeds, hidden_size) if hidden_size else 0
    available = fit.memory_available()
    if spill_dir is None or not need or not available or need <= SPILL_SHARE * available:
        if details is not None and need:
            details["calibration_activations"] = f"memory ({need / 1e9:.2f} GB)"
        return BlockInputs()
    spill_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(spill_dir).free
    if need > free:
        raise UserError(f"{stage}: the calibration activations need {need / 1e9:.1f} GB on disk (tokens x hidden size "
                        f"{hidden_size} x 4 bytes; more than {SPILL_SHARE:.0%} of the {available / 1e9:.1f} GB of "
                        f"memory available) and {spill_dir} has {free / 1e9:.1f} GB free; lower calibration.samples "
                        "or max_length, or give --out on a larger disk")
    if details is not None:
        details["calibration_activations"] = f"disk ({need / 1e9:.2f} GB; memory available {available / 1e9:.1f} GB)"
    return BlockInputs(spill_dir)
