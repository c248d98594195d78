"""What every stage declares (config model, artifact kinds, data and backend needs) and gets (a context)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

from pydantic import BaseModel, ConfigDict

from ..artifacts import Artifact, ArtifactKind
from ..progress import Progress, Silent

log = logging.getLogger(__name__)


class StageConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class StageContext:
    """Everything a stage may use besides its input: where to write, how many threads, safety flags."""

    workdir: Path
    task: str
    threads: int = 2
    allow_pickle: bool = False
    trust_remote_code: bool = False
    details: dict[str, Any] = field(default_factory=dict)  # what the stage reports about itself
    notes: list[str] = field(default_factory=list)  # what the report's reader must not miss
    progress: Progress = field(default_factory=Silent)  # for stages with long loops
    # [batch, sequence] the run feeds the result: {"benchmark": (batch_size, seq_len), "evaluation": ...}
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)


class Stage:
    """A capability that turns one artifact into another. Subclasses fill in the class attributes."""

    type: ClassVar[str]
    summary: ClassVar[str]
    config_model: ClassVar[type[StageConfigBase]]
    accepts: ClassVar[tuple[ArtifactKind, ...]]
    needs_calibration: ClassVar[bool | str] = False  # a string says when

    def output_kind(self, config: Any, input_kind: ArtifactKind) -> ArtifactKind:
        return input_kind

    def check(self, config: Any, input_kind: ArtifactKind, task: str) -> Optional[str]:
        """Return why this config cannot run on this input and task, or None; called by plan()."""
        return None

    def check_order(self, config: Any, earlier: list[Any]) -> Optional[str]:
        """Return why this stage cannot follow the `earlier` stage configs, or None; called by plan()."""
        return None

    def check_shapes(self, config: Any, shapes: dict[str, tuple[int, int]]) -> Optional[str]:
        """Return why this config cannot take the [batch, sequence] shapes the run will feed, or None."""
        return None

    def cache_salt(self, config: Any) -> dict:
        """What besides input, config and package versions decides this stage's output (e.g. the GPU an
        engine is built for); part of its stage-cache key."""
        return {}

    def backends(self, config: Any, input_kind: ArtifactKind) -> list[str]:
        """Python modules this stage imports when it runs, checked by plan() before heavy work."""
        return []

    def unavailable(self, config: Any, input_kind: ArtifactKind) -> Optional[str]:
        """Why an installed backend still cannot run this config here (a GPU-only build, say), or None;
        plan() stops with exit 3 on it."""
        return None

    def run(self, config: Any, artifact: Artifact, ctx: StageContext) -> Artifact:
        raise NotImplementedError


def refuse_after_quantize(earlier: list[Any], what: str) -> Optional[str]:
    """For stages that need float torch weights: why they cannot follow a quantize stage, or None."""
    index = next((i for i, c in enumerate(earlier) if c.type == "quantize"), None)
    if index is None:
        return None
    return f"{what} float weights, but stages[{index}] (quantize) comes first; move this stage before it"


def refuse_quantized_checkpoint(artifact: Any, what: str) -> None:
    """Raise when the checkpoint folder itself holds quantized weights (bitsandbytes, compress int8)."""
    from ..checkpoint import quantization_method
    from ..errors import UserError

    method = quantization_method(artifact.path)
    if method:
        raise UserError(f"{artifact.path}: holds quantized weights ({method}); {what} float weights, so give "
                        "the float checkpoint it came from")
