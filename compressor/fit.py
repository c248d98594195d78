"""What fits in memory: a checkpoint's size against what the kernel says is available, to choose how a
model is held (float32 or the checkpoint's own half-precision dtype; whole or block by block)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import UserError
from .shards import ShardedCheckpoint

# Evaluation holds the baseline and the result side by side (the benchmark alternates them), plus
# activations: float32 copies of both must fit, with room to spare, or the checkpoint's dtype is used.
EVALUATION_FACTOR = 2.5
HALF_DTYPES = {"BF16": "bfloat16", "F16": "float16"}


def memory_available() -> int:
    """Bytes the kernel reports available (MemAvailable), or 0 where /proc/meminfo is missing."""
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


def evaluation_dtype(folder: Path) -> tuple[Optional[str], str]:
    """(dtype, why) when a half-precision checkpoint must run in its own dtype because float32 copies of the
    baseline and the result would not fit in memory; (None, "") when float32 fits or the checkpoint is not
    a single-dtype bfloat16/float16 safetensors checkpoint."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):
        return None, ""
    try:
        checkpoint = ShardedCheckpoint(folder)
        stored = HALF_DTYPES.get(checkpoint.float_dtype())
    except UserError:  # mixed dtypes or no weights file: float32 as before; inspect_checkpoint names the problem
        return None, ""
    if stored is None:
        return None, ""
    need, available = parameter_count(checkpoint) * 4 * EVALUATION_FACTOR, memory_available()
    if not available or need <= available:
        return None, ""
    return stored, (f"{folder.name} is stored in {stored}; as float32 the baseline and the result would need "
                    f"about {need / 1e9:.1f} GB (weights x {EVALUATION_FACTOR:g}), more than the "
                    f"{available / 1e9:.1f} GB available, so both were loaded and evaluated in {stored}, as stored")
