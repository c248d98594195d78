"""What every stage declares (config model, artifact kinds, data and backend needs) and gets (a context)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional, get_args

from pydantic import BaseModel, ConfigDict

from ..artifacts import Artifact, ArtifactKind
from ..checkpoint import quantization_method
from ..errors import UserError
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


class ConfigVariant(NamedTuple):
    """One class a stage's config takes, and the values of the field that select it (none when it is the only one)."""

    model: type[StageConfigBase]
    tag: str = ""
    values: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """e.g. "scheme nf4 / fp4"; empty for a stage with one config class."""
        return f"{self.tag} {' / '.join(self.values)}" if self.tag else ""


class Stage:
    """A capability that turns one artifact into another. Subclasses fill in the class attributes."""

    type: ClassVar[str]
    summary: ClassVar[str]
    # A StageConfigBase subclass, or Annotated[Union[...], Field(discriminator=...)] of them (quantize: one
    # class per scheme)
    config_model: ClassVar[Any]
    accepts: ClassVar[tuple[ArtifactKind, ...]]
    needs_calibration: ClassVar[bool | str] = False  # a string says when
    last_only: ClassVar[bool] = False  # writes a serving format no other stage reads: it ends the recipe

    @classmethod
    def config_variants(cls) -> list[ConfigVariant]:
        """Each class the config takes: the model alone, or every member of a union with its tag values."""
        if isinstance(cls.config_model, type):
            return [ConfigVariant(cls.config_model)]
        union, *metadata = get_args(cls.config_model)
        tag = next(m.discriminator for m in metadata if getattr(m, "discriminator", None))
        return [ConfigVariant(model, tag, get_args(model.model_fields[tag].annotation)) for model in get_args(union)]

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

    def splits_calibration(self, config: Any, input_kind: ArtifactKind) -> bool:
        """Whether this config's calibration walks the blocks with sequential.compress_sequentially, whose
        batches can be split across processes (`compress run --nproc N`, distributed.py)."""
        return False

    def backends(self, config: Any, input_kind: ArtifactKind) -> list[str]:
        """Python modules this stage imports when it runs, checked by plan() before heavy work."""
        return []

    def unavailable(self, config: Any, input_kind: ArtifactKind) -> Optional[str]:
        """Why an installed backend still cannot run this config here (a GPU-only build, say), or None;
        plan() stops with exit 3 on it."""
        return None

    def run(self, config: Any, artifact: Artifact, ctx: StageContext) -> Artifact:
        raise NotImplementedError

    def baseline(self, config: Any, source: Artifact, task: str, runner_args: dict) -> Optional[tuple[Any, float, str]]:
        """For a recipe's first stage: (runner, size in MB, description) of what its result should be judged
        against when that is not the checkpoint itself, or None for the checkpoint."""
        return None

    def baseline_key(self, config: Any) -> Optional[str]:
        """For a recipe's first stage: what makes its baseline differ from the checkpoint's, or None; recipes
        compared together must have equal keys."""
        return None


def refuse_after_quantize(earlier: list[Any], what: str) -> Optional[str]:
    """For stages that need float torch weights: why they cannot follow a quantize stage, or None."""
    index = next((i for i, c in enumerate(earlier) if c.type == "quantize"), None)
    if index is None:
        return None
    return f"{what} float weights, but stages[{index}] (quantize) comes first; move this stage before it"


def refuse_quantized_checkpoint(artifact: Any, what: str) -> None:
    """Raise when the checkpoint folder itself holds quantized weights (bitsandbytes, compress int8)."""
    method = quantization_method(artifact.path)
    if method:
        raise UserError(f"{artifact.path}: holds quantized weights ({method}); {what} float weights, so give "
                        "the float checkpoint it came from")
