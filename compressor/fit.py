"""What fits in memory: a checkpoint's size against what the kernel says is available, to choose how a
model is held (float32 or the checkpoint's own half-precision dtype; whole or block by block)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import UserError
from .shards import ShardedCheckpoint

# Evaluation holds the baseline and the result side by side (the benchmark alternates them), plus
# activations: float32 copies of both must fit, with room to spare, or the checkpoint's dtype is used.
EVALUATION_FACTOR = 2.5
HALF_DTYPES = {"BF16": "bfloat16", "F16": "float16"}


@functools.cache
def memory_available() -> int:
    """Bytes the kernel reports available (MemAvailable), or 0 where /proc/meminfo is missing: read once per
    process, so that every choice of a run is made against the same figure. A reading taken after the
    baseline is loaded would be lower by its size and could hold the result differently from the baseline
    (the factors above already count both sides)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def parameter_count(checkpoint: ShardedCheckpoint) -> int:
    import math

    return sum(math.prod(checkpoint.info(name)["shape"]) for name in checkpoint.names())


@dataclass(frozen=True)
class Holding:
    """How a float checkpoint is held to be evaluated: in `dtype` (None: float32), whole or `streamed` one
    block at a time (streamed.py), and why, when that is not float32 in memory."""

    dtype: Optional[str] = None
    streamed: bool = False
    why: str = ""


def evaluation_holding(folder: Path, task: str = "text-generation") -> Holding:
    """float32 when float32 copies of the baseline and the result fit (weights x EVALUATION_FACTOR); else a
    bfloat16/float16 checkpoint in its own dtype when that fits; else, for a causal LM, streamed block by
    block in the stored dtype. Checkpoints that are not single-dtype safetensors, or that hold quantized
    layers (compress_transforms.json), are loaded as before."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")) or (folder / "compress_transforms.json").exists():
        return Holding()
    try:
        checkpoint = ShardedCheckpoint(folder)
        stored_code = checkpoint.float_dtype()
    except UserError:  # mixed dtypes or no weights file: float32 as before; inspect_checkpoint names the problem
        return Holding()
    params, available = parameter_count(checkpoint), memory_available()
    as_float32 = params * 4 * EVALUATION_FACTOR
    if not available or as_float32 <= available:
        return Holding()
    stored = HALF_DTYPES.get(stored_code)
    as_stored = params * (2 if stored else 4) * EVALUATION_FACTOR
    if stored and as_stored <= available:
        return Holding(stored, False, (
            f"{folder.name} is stored in {stored}; as float32 the baseline and the result would need about "
            f"{as_float32 / 1e9:.1f} GB (weights x {EVALUATION_FACTOR:g}), more than the {available / 1e9:.1f} GB "
            f"available, so both were loaded and evaluated in {stored}, as stored"))
    if task != "text-generation":
        return Holding(stored)
    held = stored or "float32"
    return Holding(stored, True, (
        f"{folder.name} does not fit in memory even as stored ({held}: about {as_stored / 1e9:.1f} GB for the "
        f"baseline and the result, {available / 1e9:.1f} GB available), so both were evaluated block by block: "
        "each forward pass reads every transformer block from disk, runs it and drops it (the latency figures "
        "are those of that streaming, not of the model in memory)"))

