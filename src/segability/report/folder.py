"""Reading a result folder for the report: its tables, settings, findings and ``maps.npz``.

The report is a shell over the files of a result folder (see ``docs/architecture.md``, "The result
folder"); this module reads them with pandas/NumPy. Optional files may be absent: their fields are
then ``None``. A folder whose run has not merged its tables raises :class:`IncompleteRunError`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from segability.analysis.results import (
    ERRORS,
    HISTORY,
    IMAGES,
    LAYERS,
    QC,
    SHARD_DIR,
    UNITS,
    MapsArchive,
    empty_table,
    read_table,
)

__all__ = [
    "ResultFolder",
    "IncompleteRunError",
    "Finding",
    "read_result_folder",
    "parse_findings",
    "MapStore",
]

# Columns of images.parquet defined by the contract; any other column is caller metadata.
STANDARD_IMAGE_COLUMNS = tuple(IMAGES.names)
ERRORS_FILE = ERRORS.file
MapStore = MapsArchive  # the report's name for the lazy maps archive of analysis.results


class IncompleteRunError(ValueError):
    """A result folder whose run has not finished merging its tables (resume the run)."""


@dataclass(frozen=True)
class Finding:
    """A statement of "What this run shows" and the images it is about.

    Attributes:
        text: the statement.
        images: which rows of ``images.parquet`` the statement's numbers come from, as
            ``{column: (value, ...)}`` (values compared as text; ``{}``: every image), or None
            when the statement does not say (then the report claims nothing about it).
    """

    text: str
    images: dict[str, tuple[str, ...]] | None = None


@dataclass
class ResultFolder:
    """The files of a result folder, read into memory (``maps.npz`` stays on disk).

    Attributes:
        root: the folder.
        layers: ``layers.parquet`` (one row per image and layer).
        images: ``images.parquet`` (one row per image).
        settings: ``settings.json`` (empty dict when absent).
        units: ``units.parquet`` or None.
        maps_path: path of ``maps.npz`` or None.
        qc: ``qc.csv`` or None.
        history: ``history.csv`` or None.
        timing: ``timing.json`` or None.
        findings: statements of ``findings.json`` (empty when absent).
        errors: ``errors.csv`` (one row per failed file: ``file``, ``error``, ...) or None.
    """

    root: Path
    layers: pd.DataFrame
    images: pd.DataFrame
    settings: dict[str, Any] = field(default_factory=dict)
    units: pd.DataFrame | None = None
    maps_path: Path | None = None
    qc: pd.DataFrame | None = None
    history: pd.DataFrame | None = None
    timing: dict[str, Any] | None = None
    findings: list[Finding] = field(default_factory=list)
    errors: pd.DataFrame | None = None

    @property
    def has_labels(self) -> bool:
        """True when at least one layer score was computed against a label."""
        return bool(self.layers["sa"].notna().any())

    @property
    def analysed(self) -> bool:
        """True when at least one image was analysed (``layers.parquet`` has rows)."""
        return len(self.layers) > 0

    @property
    def metadata_columns(self) -> list[str]:
        """Columns of ``images.parquet`` added by the caller (e.g. ``group``, ``severity``)."""
        return [c for c in self.images.columns if c not in STANDARD_IMAGE_COLUMNS]


def _require(df: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{name} lacks the column(s) {missing}; it has {list(df.columns)}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path.name} is not valid JSON: {err}") from err


def _selector(value: Any, source: str) -> dict[str, tuple[str, ...]] | None:
    if value is None:
        return None
    if value == "all":
        return {}
    if not isinstance(value, dict) or not value:
        raise ValueError(
            f'{source}: "images" must be "all" or an object {{column: [values]}}, got {value!r}'
        )
    out = {}
    for column, values in value.items():
        if isinstance(values, (str, int, float, bool)):
            values = [values]
        if not isinstance(values, Sequence) or not values:
            raise ValueError(
                f"{source}: images[{column!r}] must be a value or a non-empty list of values"
            )
        out[str(column)] = tuple(str(v) for v in values)
    return out


def parse_findings(value: Any, source: str = "findings") -> list[Finding]:
    """Validate findings: a list of statements, or ``{"findings": [...]}``.

    A statement is a string, or ``{"text": "...", "images": {column: [values]}}`` naming the rows of
    ``images.parquet`` its numbers come from (e.g. ``{"group": ["clean"]}``; ``"all"`` for every
    image). The report then says over how many images each statement holds and draws the charts
    of those images too.

    Raises:
        ValueError: not a list of statements, or a malformed ``images`` selector.

    Example:
        >>> parse_findings({"findings": ["Mean SA tracks Dice.",
        ...                              {"text": "SA peaks late.", "images": {"group": "clean"}}]})
        [Finding(text='Mean SA tracks Dice.', images=None), Finding(text='SA peaks late.', images={'group': ('clean',)})]
    """
    if isinstance(value, dict) and "findings" in value:
        value = value["findings"]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{source} must be a list of statements, got {type(value).__name__}")
    out = []
    for item in value:
        if isinstance(item, Finding):
            finding = item
        elif isinstance(item, str):
            finding = Finding(item)
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            finding = Finding(item["text"], _selector(item.get("images"), source))
        else:
            raise ValueError(
                f'{source} must be a list of strings or {{"text": ..., "images": ...}} objects; found {item!r:.80}'
            )
        if finding.text.strip():
            out.append(finding)
    return out


def _incomplete(root: Path, missing: str) -> IncompleteRunError:
    shards = (root / SHARD_DIR).is_dir()
    why = f"{SHARD_DIR}/ is there but {missing} is not" if shards else f"{missing} is missing"
    return IncompleteRunError(
        f"result_dir {str(root)!r} holds an incomplete run ({why}): the run stopped before its "
        "tables were merged. Finish it with analyze(..., resume=True) (CLI: segability analyze "
        "--resume) and build the report again."
    )


def read_result_folder(root: str | Path) -> ResultFolder:
    """Read a result folder (``layers.parquet``, ``images.parquet`` and the optional files).

    A folder of a run in which every image failed (``errors.csv`` with empty or absent tables) is
    read with empty tables; the report then says so and lists the failures.

    Args:
        root: the folder written by ``SAResult.save`` (or a batch run).

    Returns:
        The folder's tables; optional files that are absent are ``None``.

    Raises:
        FileNotFoundError: the folder does not exist, or holds neither tables nor ``errors.csv``.
        IncompleteRunError: (a ValueError) ``layers.parquet`` or ``images.parquet`` is missing, or
            the tables are absent while ``shards/`` is there: the run has not been merged.
        ValueError: a file lacks a column the contract requires, or is malformed.

    Example:
        >>> folder = read_result_folder("runs/demo")  # doctest: +SKIP
        >>> folder.layers.columns.tolist()[:3]  # doctest: +SKIP
        ['image', 'layer', 'depth']
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"result_dir {str(root)!r} is not a directory")
    layers_path, images_path = root / "layers.parquet", root / "images.parquet"
    errors = None
    if (root / ERRORS_FILE).is_file():
        errors = _read_errors(root / ERRORS_FILE)
    if not layers_path.is_file() and not images_path.is_file():
        if errors is None:
            if (root / SHARD_DIR).is_dir():
                raise _incomplete(root, "layers.parquet")
            raise FileNotFoundError(
                f"{root} has no layers.parquet: is it a segability result folder?"
            )
        layers, images = empty_table(LAYERS), empty_table(IMAGES)
    else:
        if not layers_path.is_file():
            raise _incomplete(root, "layers.parquet")
        # tables from outside scripts may lack columns other than the keys: filled with defaults
        layers = read_table(layers_path, LAYERS, fill=True)
        if not images_path.is_file():
            raise _incomplete(root, "images.parquet")
        images = read_table(images_path, IMAGES, fill=True)

    settings: dict[str, Any] = {}
    if (root / "settings.json").is_file():
        settings = _read_json(root / "settings.json")
        if not isinstance(settings, dict):
            raise ValueError("settings.json must hold a JSON object")

    units = None
    if (root / UNITS.file).is_file():
        units = read_table(root / UNITS.file, UNITS, fill=True)
        if units.empty:
            units = None

    qc = read_table(root / QC.file, QC, fill=True) if (root / QC.file).is_file() else None
    history = read_table(root / HISTORY.file, HISTORY, fill=True) if (root / HISTORY.file).is_file() else None

    timing = None
    if (root / "timing.json").is_file():
        timing = _read_json(root / "timing.json")
        if not isinstance(timing, dict):
            timing = {"timing": timing}

    findings: list[Finding] = []
    if (root / "findings.json").is_file():
        findings = parse_findings(_read_json(root / "findings.json"), "findings.json")

    maps_path = root / "maps.npz"
    return ResultFolder(
        root=root,
        layers=layers,
        images=images,
        settings=settings,
        units=units,
        maps_path=maps_path if maps_path.is_file() else None,
        qc=qc,
        history=history,
        timing=timing,
        findings=findings,
        errors=errors,
    )


def _read_errors(path: Path) -> pd.DataFrame:
    return read_table(path, ERRORS, fill=True)
