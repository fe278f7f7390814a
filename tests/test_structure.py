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
    assert "shardopt.collectives.comm" in graph["shardopt.elements.optimizer"]  # the graph sees relative imports
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as error:
        pytest.fail(f"import loop: {' -> '.join(error.args[1])}")


# The layers, lowest first: a module imports only from its own layer or lower ones, and the four
# schemes (the third layer) not from one another.
LAYERS = (
    ("algorithms",),
    ("collectives",),
    ("shared",),
    ("elements", "owner", "rows", "slices"),
    ("", "amp", "averaging", "checkpoint", "integrations"),
)


def _place(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if "." in module else ""
    return next((layer, top) for layer, names in enumerate(LAYERS) if top in names)


def test_each_layer_imports_only_from_below() -> None:
    upward = []
    for module, imported in import_graph().items():
        (layer, where) = _place(module)
        for target in imported:
            (target_layer, target_where) = _place(target)
            if target_layer > layer or (target_layer == layer == 3 and target_where != where):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_at_most_a_dozen_modules_at_the_top_and_none_over_500_lines() -> None:
    top = sorted(path.name for path in ROOT.iterdir() if path.suffix == ".py" or (path / "__init__.py").exists())
    assert len(top) <= 12, top
    long = {
        str(path.relative_to(ROOT)): n for path in ROOT.rglob("*.py") if (n := len(path.read_text().splitlines())) > 500
    }
    assert not long, long
