"""The layering rule of docs/architecture.md, checked on the source: lower layers never import higher ones."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "segability"

# Top-level part of segability -> layer number (docs/architecture.md).
LAYERS = {
    "core": 0,
    "capture": 1,
    "analysis": 2,
    "datasets": 2,
    "estimation": 3,
    "report": 4,
    "io": 4,
    "models": 4,
    "train": 4,
    "demo": 4,
    "batch": 4,
    "prune": 4,
    "integrations": 4,
    "cli": 5,
    "errors": 0,
    "progress": 4,
    "compress": 4,
}


def _part(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "segability":
        return None
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
    return found


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if p.parent != SRC or p.name != "__init__.py")


def test_every_part_has_a_layer():
    parts = {(p.relative_to(SRC).parts[0]).removesuffix(".py") for p in _sources()}
    assert parts - set(LAYERS) == set(), "add new parts of the package to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_only(path):
    own = path.relative_to(SRC).parts[0].removesuffix(".py")
    for module in _imports(path):
        part = _part(module)
        if part is None or part == own:
            continue
        if part == "":  # `from segability import __version__` only
            continue
        assert LAYERS[part] <= LAYERS[own], f"{own} (layer {LAYERS[own]}) imports {module} (layer {LAYERS[part]})"
        if own == "datasets":
            assert part == "core", f"datasets may depend on the core only, imports {module}"


def test_the_checker_catches_an_upward_import(tmp_path):
    bad = tmp_path / "x.py"
    bad.write_text("from segability.cli.app import app\n")
    assert "segability.cli.app" in _imports(bad)
    assert LAYERS[_part("segability.cli.app")] > LAYERS["core"]
