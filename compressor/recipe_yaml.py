"""Reading a recipe's YAML as untrusted input: plain trees only (no anchors, aliases or merge keys, a
bounded size and depth), no key given twice, only finite numbers of sane length, and every field's line
kept for error messages. recipe.py validates what this module hands it."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import yaml

from .errors import UserError


def format_path(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


# Shipped recipes are a few KB. The cap keeps a wrong argument (a model file, /dev/zero) from being read whole.
MAX_RECIPE_BYTES = 1 << 20
# Shipped recipes nest 5 levels; the cap stops a deeply nested file before it exhausts Python's recursion.
MAX_NESTING = 32
# The longest number a recipe needs has a few digits; Python refuses to convert ints over 4300 digits anyway.
MAX_NUMBER_CHARS = 100
MERGE_TAG = "tag:yaml.org,2002:merge"
INT_TAG, FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"


class _Refused(Exception):
    """A YAML construct a recipe may not use, at the place (yaml mark) where it starts."""

    def __init__(self, mark, message: str):
        super().__init__(message)
        self.mark, self.message = mark, message


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that composes plain trees only. Aliases let an eight-line file describe a billion values
    (each level repeats the one before nine times), and every step after composing (line numbers,
    construction, validation) walks them expanded; so the first anchor or alias stops composing, before
    anything is built from it. No recipe needs them: a recipe is short enough to write out."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()  # the event of every node kind carries its anchor (an alias: the one it names)
        if event.anchor is not None:
            sign = "*" if isinstance(event, yaml.AliasEvent) else "&"
            raise _Refused(event.start_mark, f"YAML {'alias' if sign == '*' else 'anchor'} {sign}{event.anchor}: "
                                             "anchors and aliases (&name, *name, <<: *name) are not accepted in a "
                                             "recipe; write the values out")
        if self._depth >= MAX_NESTING:
            raise _Refused(event.start_mark, f"nested more than {MAX_NESTING} levels deep; a recipe needs a handful")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _check_tree(loader: _RecipeLoader, node: yaml.Node, path: tuple = ()) -> None:
    """Refuse what YAML would accept silently or pydantic would be handed broken: a key given twice (YAML keeps
    the last one), merge keys, numbers that are not finite or too long to convert."""
    if isinstance(node, yaml.MappingNode):
        first_lines: dict[tuple, int] = {}
        for key, value in node.value:
            if key.tag == MERGE_TAG:
                raise _Refused(key.start_mark, f"{format_path(path)}: merge keys (<<) are not accepted in a recipe; "
                                               "write the fields out")
            if isinstance(key, yaml.ScalarNode):
                _check_number(loader, key, path)
                child = path + (key.value,)
                identity = (key.tag, key.value)  # `1` and `"1"` are different keys
                if identity in first_lines:
                    raise _Refused(key.start_mark, f"{format_path(child)}: duplicate key, first given at line "
                                                   f"{first_lines[identity]}; YAML would silently keep only the "
                                                   "last one, so remove one of them")
                first_lines[identity] = key.start_mark.line + 1
            else:
                child = path + ("?",)
            _check_tree(loader, value, child)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_tree(loader, item, path + (index,))
    elif isinstance(node, yaml.ScalarNode):
        _check_number(loader, node, path)


def _check_number(loader: _RecipeLoader, node: yaml.ScalarNode, path: tuple) -> None:
    if node.tag not in (INT_TAG, FLOAT_TAG):
        return
    if len(node.value) > MAX_NUMBER_CHARS:
        raise _Refused(node.start_mark, f"{format_path(path)}: a number {len(node.value)} characters long; no option "
                                        "takes more than a few digits")
    if node.tag == FLOAT_TAG and not math.isfinite(loader.construct_yaml_float(node)):
        # No option means anything at NaN or infinity: a goal compared with NaN never fails.
        raise _Refused(node.start_mark, f"{format_path(path)}: {node.value} is not a finite number; leave an "
                                        "optional field out instead")


def compose(text: str, source: str) -> tuple[Optional[yaml.Node], object]:
    """The document's node tree (for line numbers) and its data, built from the tree once it passed _check_tree."""
    loader = _RecipeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, None
        _check_tree(loader, node)
        return node, loader.construct_document(node)
    except _Refused as refused:
        raise UserError(f"{source}:{refused.mark.line + 1}: {refused.message}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise UserError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    finally:
        loader.dispose()


def line_index(node: yaml.Node, path: tuple = (), index: dict | None = None) -> dict[tuple, int]:
    """Map each field path in the YAML document to its 1-based line number."""
    index = {} if index is None else index
    index[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = path + (key.value,)
            line_index(value, child, index)
            index[child] = key.start_mark.line + 1  # the key's line, not where its value starts
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            line_index(item, path + (i,), index)
    return index


def read_capped(path: Path) -> bytes:
    with open(path, "rb") as handle:
        content = handle.read(MAX_RECIPE_BYTES + 1)
    if len(content) > MAX_RECIPE_BYTES:
        raise UserError(f"{path}: more than {MAX_RECIPE_BYTES >> 20} MB; a recipe is a short YAML file")
    return content
