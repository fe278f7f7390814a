"""The package's structure as docs/design.md states it: shardopt's modules import one another
without a loop (counting imports inside functions and under ``TYPE_CHECKING``), so each layer
depends only on the layers below it; and every shardopt optimizer is one class."""

from __future__ import annotations

import ast
import pathlib
from graphlib import CycleError, TopologicalSorter

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "shardopt"


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Per shardopt module, the shardopt modules it imports anywhere in its source."""
    modules = {_module(path): path for path in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = package.split(".")
                target = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    graph[name].add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module]
                graph[name].update(n for n in names if n in modules)
    return graph


def test_no_import_loop() -> None:
    graph = import_graph()
    assert "shardopt.comm" in graph["shardopt.optimizer"]  # the graph sees relative imports
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import loop: {' -> '.join(error.args[1])}")
