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

    def backends(self, config: Any, input_kind: ArtifactKind) -> list[str]:
        """Python modules this stage imports when it runs, checked by plan() before heavy work."""
        return []

    def run(self, config: Any, artifact: Artifact, ctx: StageContext) -> Artifact:
        raise NotImplementedError
