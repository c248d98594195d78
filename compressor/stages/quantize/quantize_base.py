"""What every quantize scheme's config shares: the stage type, `exclude`, and the checks the stage asks of it.

Each scheme's config class lives with the module that implements the scheme and adds only the options
that scheme reads, so pydantic refuses an option given to the wrong scheme as an unknown field. The
quantize stage joins the classes into one union on `scheme`; this module sits below both.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from ...artifacts import ArtifactKind
from ..base import StageConfigBase


class QuantizeConfigBase(StageConfigBase):
    """Options every scheme takes. Subclasses add `scheme: Literal[...]` (the union's tag) and their own."""

    type: Literal["quantize"]
    exclude: list[str] = Field(
        default_factory=list, description="node names (ONNX) or module names (torch) to keep in float; "
                                          "shell-style patterns such as '*lm_head*'")

    def problem(self, input_kind: ArtifactKind) -> Optional[str]:
        """Why these options cannot quantize a model of this kind, or None; what plan() reports."""
        return None

    def backends(self, input_kind: ArtifactKind) -> list[str]:
        """Python modules the scheme imports when it runs on this kind of model."""
        raise NotImplementedError

    def unavailable(self) -> Optional[str]:
        """Why an installed backend still cannot run this scheme here, or None."""
        return None
