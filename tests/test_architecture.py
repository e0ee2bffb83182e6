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
    "review": 4,
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


def violations(path: Path, own: str) -> list[str]:
    """The imports of ``path`` (a module of the part ``own``) that break the layering rule."""
    found = []
    for module in _imports(path):
        part = _part(module)
        if part is None or part == own or part == "":  # `from segability import __version__` only
            continue
        if part not in LAYERS:
            found.append(f"{own} imports {module}, a part with no layer")
        elif LAYERS[part] > LAYERS[own]:
            found.append(f"{own} (layer {LAYERS[own]}) imports {module} (layer {LAYERS[part]})")
        elif own == "datasets" and part != "core":
            found.append(f"datasets may depend on the core only, imports {module}")
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down_only(path):
    assert violations(path, path.relative_to(SRC).parts[0].removesuffix(".py")) == []


def test_the_checker_catches_a_deliberately_bad_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import torch\n"
        "from segability.analysis import analyze\n"  # fine for estimation (layer 3)
        "from segability.cli.app import app\n"  # the CLI is above everything
        "def f():\n    import segability.report.html\n"  # imports inside functions count too
    )
    assert violations(bad, "estimation") == [
        "estimation (layer 3) imports segability.cli.app (layer 5)",
        "estimation (layer 3) imports segability.report.html (layer 4)",
    ]
    assert violations(bad, "cli") == []
    assert violations(bad, "datasets") == [
        "datasets may depend on the core only, imports segability.analysis",
        "datasets (layer 2) imports segability.cli.app (layer 5)",
        "datasets (layer 2) imports segability.report.html (layer 4)",
    ]

def test_the_architecture_page_documents_every_column_of_the_result_folder():
    from segability.analysis.results import SCHEMAS

    page = (SRC.parents[1] / "docs" / "architecture.md").read_text()
    folder = page[page.index("## The result folder") :]
    for schema in SCHEMAS.values():
        assert f"`{schema.file}`" in folder, schema.file
        for column in schema.names:
            assert f"`{column}`" in folder, f"{schema.file}: {column}"
