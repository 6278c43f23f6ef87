"""The package's layers (docs/design.md): each module imports only from its own layer or
the ones below it, nothing imports an entry point, and no modules import each other in
a cycle. Read from the source, so a new import that breaks the shape fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import PROJECT

PACKAGE = PROJECT / "fashion_sweep"
# Lowest first. A module's layer is its folder's, or its own name's at the top.
LAYERS = [
    {"core", "signals", "threads"},  # torch (or nothing; psutil)
    {"config", "model", "mistakes"},  # Hydra: schemas, checks, errors; the model's import path
    {"tracking"},  # MLflow
    {"preflight"},
    {"run"},  # the recipe
    {"sweeps"},
    {"launchers"},
    {"benchmarks"},
    {"train", "predict", "bench"},  # entry points: hydra.main and argument parsing
]
ENTRY_POINTS = LAYERS[-1]


def name_of(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    return next(rank for rank, names in enumerate(LAYERS) if first in names)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The fashion_sweep modules a file imports (at its top level only, or anywhere
    that runs: function bodies included, `if TYPE_CHECKING:` left out)."""
    found = set()
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fashion_sweep.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fashion_sweep"):
            for alias in node.names:  # `from fashion_sweep.sweeps import study`: a module
                candidate = f"{node.module}.{alias.name}"
                known = (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py")
                found.add(candidate if known.exists() else node.module)
    return found - {"fashion_sweep"}


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: name_of(p))
def test_a_module_imports_only_from_its_layer_or_below(path):
    module = name_of(path)
    if module == "fashion_sweep":
        return
    above = {m for m in imports(path) if layer(m) > layer(module)}
    assert not above, f"{module} (layer {layer(module)}) imports {sorted(above)}"


def test_nothing_imports_an_entry_point():
    for path in MODULES:
        entry = {m for m in imports(path) if m.split(".")[1] in ENTRY_POINTS}
        assert not entry - {name_of(path)}, f"{name_of(path)} imports {sorted(entry)}"


def test_no_modules_import_each_other_in_a_cycle():
    graph = {name_of(p): imports(p, top_level_only=True) for p in MODULES}
    seen, path = set(), []

    def visit(module: str) -> None:
        assert module not in path, " -> ".join([*path[path.index(module) :], module])
        if module in seen:
            return
        path.append(module)
        for other in sorted(graph.get(module, ())):
            visit(other)
        path.pop()
        seen.add(module)

    for module in graph:
        visit(module)
