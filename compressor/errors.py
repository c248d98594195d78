"""Error classes that map to the CLI's exit codes; only cli.py turns them into output."""

from __future__ import annotations


class CompressError(Exception):
    """Base for errors the user can act on; each subclass carries its exit code."""

    exit_code = 4


class UserError(CompressError):
    """A problem with the recipe, checkpoint, data or flags (exit 2): one line, no traceback."""

    exit_code = 2


class BackendMissing(CompressError):
    """A backend or device the recipe needs is not usable here (exit 3)."""

    exit_code = 3


class StageFailed(UserError):
    """A stage ran but its own check failed (for example export outputs differ beyond atol)."""
