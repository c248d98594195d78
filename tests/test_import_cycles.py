"""The compressor package has no import cycle: dependencies point down (cli -> pipeline -> stages ->
runners/artifacts -> errors), and a helper two modules need lives below both.

Imports inside functions count too: a lazy import hides a cycle from Python at load time, not from
the design. The graph is read with `ast`, nothing is imported, so the check needs no heavy library."""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "compressor"


def modules_of(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__.py)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(package: Path) -> tuple[dict[str, dict[str, int]], dict[str, Path]]:
    """module -> {module it imports: line of the first such import}, over imports at any depth."""
    modules = modules_of(package)
    root = package.name
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        # Relative imports resolve against the module's package: itself for an __init__.py.
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = base.split(".")
                    target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                # `from . import engine` names a module; `from .engine import build` names a member.
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            for candidate in candidates:
                # The root __init__ only holds the version; `from . import x` would otherwise make every
                # such module depend on it.
                if candidate in modules and candidate not in (name, root):
                    graph[name].setdefault(candidate, node.lineno)
    return graph, modules


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or round a loop (Tarjan); singletons left out."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


def shortest_loop(graph: dict[str, dict[str, int]], group: list[str]) -> list[str]:
    """One concrete loop through the group's first module, as a list that starts and ends with it."""
    start, members = group[0], set(group)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for imported in sorted(graph[module]):
            if imported == start:
                loop = [module]
                while loop[-1] != start:
                    loop.append(came_from[loop[-1]])
                return [start] + loop[::-1][1:] + [start]
            if imported in members and imported not in came_from:
                came_from[imported] = module
                queue.append(imported)
    return group + [start]  # unreachable for a strongly connected group


def describe(package: Path) -> list[str]:
    """One paragraph per cycle: its members, and one loop with the file:line of each import."""
    graph, modules = import_graph(package)
    paragraphs = []
    for group in strongly_connected(graph):
        loop = shortest_loop(graph, group)
        steps = [f"  {a} imports {b} at {modules[a].relative_to(package.parent)}:{graph[a][b]}"
                 for a, b in zip(loop, loop[1:])]
        paragraphs.append(f"cycle of {len(group)}: {', '.join(group)}\n" + "\n".join(steps))
    return paragraphs


def test_compressor_has_no_import_cycle():
    cycles = describe(PACKAGE)
    assert not cycles, ("import cycles among compressor modules; dependencies point down (cli -> pipeline -> "
                        "stages -> runners/artifacts -> errors): move what both sides need into a module below "
                        "both, or the import to the module that owns it\n" + "\n".join(cycles))


def test_the_check_sees_a_cycle_through_an_import_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "low.py").write_text("from .sub.high import thing\n")
    (package / "sub" / "high.py").write_text("def thing():\n    from .. import low\n    return low\n")
    (package / "leaf.py").write_text("import os\n")
    cycles = describe(package)
    assert len(cycles) == 1 and cycles[0].startswith("cycle of 2: pkg.low, pkg.sub.high"), cycles
    assert "pkg.sub.high imports pkg.low at pkg/sub/high.py:2" in cycles[0]
