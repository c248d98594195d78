"""What `compress validate` and `compress run` check of a recipe beyond its schema: the files and
folders it names (data sources, dataset cards, adapters) exist and can be opened. Nothing is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Optional

from pydantic import BaseModel

from . import fixtures
from .data import DataConfig, source_problem
from .errors import UserError
from .recipe import Recipe
from .recipe_yaml import format_path
from .stages.lora.merge_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterSpec

def _named_configs(value, path: tuple = ()) -> Iterator[tuple[tuple, BaseModel]]:
    """Every config inside a recipe (data sources, adapters, ...) with its field path."""
    if isinstance(value, BaseModel):
        yield path, value
        for name in type(value).model_fields:
            yield from _named_configs(getattr(value, name), path + (name,))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _named_configs(item, path + (index,))


def _adapter_problem(spec: AdapterSpec) -> Optional[str]:
    """What merge_lora would refuse in an adapter folder before loading anything (merge_lora.read_adapters)."""
    if spec.fixture is not None:
        return None if spec.fixture in fixtures.ADAPTERS else \
            f"no adapter fixture {spec.fixture!r}; built-in: {', '.join(fixtures.ADAPTERS)}"
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        found = "not a folder" if folder.exists() else "not found"
        relative = "" if folder.is_absolute() else "; relative paths are read from the working directory"
        return f"{folder}: {found} (an adapter is a PEFT folder{relative})"
    for needed in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / needed).is_file():
            return (f"{folder / needed}: missing; a PEFT LoRA adapter folder holds {ADAPTER_CONFIG} and "
                    f"{ADAPTER_WEIGHTS}")
    try:
        json.loads((folder / ADAPTER_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{folder / ADAPTER_CONFIG}: not readable JSON ({exc})"
    return None


def check_sources(recipe: Recipe) -> None:
    """Every data source (a file or folder, or a dataset card) and adapter folder the recipe names exists and
    can be opened, so that a wrong path stops `compress validate`, not a run minutes in. Nothing is read."""
    problems = []
    for path, config in _named_configs(recipe):
        if isinstance(config, DataConfig):
            problem, field = source_problem(config), ("dataset" if config.dataset is not None else "path")
        elif isinstance(config, AdapterSpec):
            problem, field = _adapter_problem(config), ("fixture" if config.fixture is not None else "path")
        else:
            continue
        if problem:
            problems.append(f"{recipe.where(*path, field)}: {format_path(path + (field,))}: {problem}")
    if problems:
        raise UserError("recipe names files that cannot be read:\n  " + "\n  ".join(problems))
