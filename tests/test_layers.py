"""The layers, as the imports show them: store/ <- bagnet/ <- cluster/ (the Ray layer) <- jobs/,
with analysis/ on store/ and bagnet/, and bench/ on the libraries. See docs/architecture.md."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("store", "bagnet", "cluster", "jobs", "analysis", "bench")
# package -> top-level modules it must never import (at any depth, inside functions too)
FORBIDDEN = {
    "store": {"torch", "torchvision", "ray", "bagnet", "cluster", "jobs", "analysis", "bench"},
    "bagnet": {"ray", "cluster", "jobs", "analysis", "bench"},
    "cluster": {"jobs", "analysis", "bench"},
    "analysis": {"ray", "cluster", "jobs", "bench"},
    "jobs": {"bench"},
    "bench": {"jobs"},
}
MAX_JOB_LINES = 120


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> list[tuple[ast.stmt, str, bool]]:
    """``(node, top-level module, at module level)`` of every import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` / `if __package__` count as top level
        if isinstance(node, ast.If):
            top_level.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name.split(".")[0], id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node, node.module.split(".")[0], id(node) in top_level))
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_crosses_a_layer(package: str) -> None:
    bad = [f"{path.relative_to(ROOT)}:{node.lineno} imports {module}"
           for path in _sources(package) for node, module, _ in _imports(path)
           if module in FORBIDDEN[package]]
    assert not bad, "\n".join(bad)


def test_only_the_ray_layer_imports_ray() -> None:
    bad = [f"{path.relative_to(ROOT)}:{node.lineno}"
           for package in PACKAGES if package != "cluster"
           for path in _sources(package) for node, module, _ in _imports(path) if module == "ray"]
    assert not bad, "ray imported outside cluster/: " + ", ".join(bad)


def test_imports_inside_functions_say_why() -> None:
    """Imports belong at module top; an import inside a function (an optional heavy dependency)
    carries a comment on its line or the line above saying why."""
    bad = []
    for package in PACKAGES:
        for path in _sources(package):
            lines = path.read_text().splitlines()
            for node, _, top in _imports(path):
                if top:
                    continue
                here, above = lines[node.lineno - 1], lines[node.lineno - 2] if node.lineno > 1 else ""
                if "#" not in here and not above.strip().startswith("#"):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    assert not bad, "imports inside functions without a reason:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", _sources("jobs"), ids=lambda p: p.name)
def test_jobs_are_thin_command_lines(path: Path) -> None:
    tree = ast.parse(path.read_text())
    classes = [n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
    assert not classes, f"{path.name} defines {classes}: configs live in cluster/configs.py"
    assert len(path.read_text().splitlines()) <= MAX_JOB_LINES
