"""Reading a result folder for the report, and the tables the report's views are made of.

The report is a shell over the files of a result folder (see ``docs/architecture.md``, "The result
folder"); this module reads them with pandas/NumPy only, so a report can be built from a folder
without importing torch. Optional files may be absent: their fields are then ``None``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = [
    "ResultFolder",
    "read_result_folder",
    "layer_order",
    "layer_roles",
    "layer_summary",
    "unit_means",
    "quality_table",
    "MapStore",
    "ESTIMATE_COLUMNS",
    "FLAG_COLUMNS",
]

LAYER_COLUMNS = ("image", "layer", "depth", "sa", "sa_pred")
IMAGE_COLUMNS = ("image",)
UNIT_COLUMNS = ("image", "layer", "unit", "sa", "sa_pred")
HISTORY_COLUMNS = ("epoch", "layer", "sa")
# Columns of images.parquet defined by the contract; any other column is caller metadata.
STANDARD_IMAGE_COLUMNS = (
    "image",
    "dice",
    "mean_sa",
    "mean_sa_pred",
    "input_sa",
    "input_sa_pred",
    "reason",
)
# qc.csv is written by the quality gate; these names are recognised, first match wins.
ESTIMATE_COLUMNS = (
    "estimated_dice",
    "estimate",
    "estimated_quality",
    "quality",
    "predicted_dice",
)
FLAG_COLUMNS = ("flag", "flagged", "gate", "status")
_FLAG_TRUE = {"true", "yes", "1", "flag", "flagged", "fail", "failed", "reject", "review"}

Role = Literal["encoder", "decoder"]
_ENCODER_WORDS = {
    "encoder",
    "enc",
    "encoders",
    "down",
    "downs",
    "downsample",
    "downsampling",
    "contract",
    "contracting",
    "contraction",
}
_DECODER_WORDS = {
    "decoder",
    "dec",
    "decoders",
    "up",
    "ups",
    "upsample",
    "upsampling",
    "upcat",
    "upconv",
    "expand",
    "expanding",
    "expansion",
}


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
    findings: list[str] = field(default_factory=list)

    @property
    def has_labels(self) -> bool:
        """True when at least one layer score was computed against a label."""
        return bool(self.layers["sa"].notna().any())

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


def parse_findings(value: Any, source: str = "findings") -> list[str]:
    """Validate findings: a list of strings, or ``{"findings": [...]}``.

    Example:
        >>> parse_findings({"findings": ["Mean SA tracks Dice (Spearman 0.81)."]})
        ['Mean SA tracks Dice (Spearman 0.81).']
    """
    if isinstance(value, dict) and "findings" in value:
        value = value["findings"]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(f"{source} must be a list of strings, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise ValueError(f"{source} must be a list of strings; found {bad[:3]!r}")
    return [v for v in value if v.strip()]


def read_result_folder(root: str | Path) -> ResultFolder:
    """Read a result folder (``layers.parquet``, ``images.parquet`` and the optional files).

    Args:
        root: the folder written by ``SAResult.save``.

    Returns:
        The folder's tables; optional files that are absent are ``None``.

    Raises:
        FileNotFoundError: the folder or ``layers.parquet`` does not exist.
        ValueError: a file lacks a column the contract requires, or is malformed.

    Example:
        >>> folder = read_result_folder("runs/demo")  # doctest: +SKIP
        >>> folder.layers.columns.tolist()[:3]  # doctest: +SKIP
        ['image', 'layer', 'depth']
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"result_dir {str(root)!r} is not a directory")
    layers_path = root / "layers.parquet"
    if not layers_path.is_file():
        raise FileNotFoundError(f"{root} has no layers.parquet: is it a segability result folder?")
    layers = pd.read_parquet(layers_path)
    _require(layers, LAYER_COLUMNS, "layers.parquet")
    layers = layers.astype({"image": str, "layer": str})

    images_path = root / "images.parquet"
    if images_path.is_file():
        images = pd.read_parquet(images_path)
        _require(images, IMAGE_COLUMNS, "images.parquet")
        images = images.astype({"image": str})
    else:  # rebuild the means the contract defines from layers.parquet
        images = _images_from_layers(layers)

    settings: dict[str, Any] = {}
    if (root / "settings.json").is_file():
        settings = _read_json(root / "settings.json")
        if not isinstance(settings, dict):
            raise ValueError("settings.json must hold a JSON object")

    units = None
    if (root / "units.parquet").is_file():
        units = pd.read_parquet(root / "units.parquet")
        _require(units, UNIT_COLUMNS, "units.parquet")
        units = units.astype({"image": str, "layer": str})

    qc = None
    if (root / "qc.csv").is_file():
        qc = pd.read_csv(root / "qc.csv", dtype={"image": str}, keep_default_na=True)
        _require(qc, ("image",), "qc.csv")

    history = None
    if (root / "history.csv").is_file():
        history = pd.read_csv(root / "history.csv", dtype={"layer": str})
        _require(history, HISTORY_COLUMNS, "history.csv")

    timing = None
    if (root / "timing.json").is_file():
        timing = _read_json(root / "timing.json")
        if not isinstance(timing, dict):
            timing = {"timing": timing}

    findings: list[str] = []
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
    )


def _images_from_layers(layers: pd.DataFrame) -> pd.DataFrame:
    inner = layers[layers["layer"] != "input"].groupby("image", sort=False)
    out = (
        inner[["sa", "sa_pred"]].mean().rename(columns={"sa": "mean_sa", "sa_pred": "mean_sa_pred"})
    )
    inp = layers[layers["layer"] == "input"].set_index("image")[["sa", "sa_pred"]]
    out = out.join(inp.rename(columns={"sa": "input_sa", "sa_pred": "input_sa_pred"}))
    return out.reset_index()


def layer_order(layers: pd.DataFrame) -> list[str]:
    """Layer names in forward order (by ``depth``; ties keep the order of the file).

    Example:
        >>> df = pd.DataFrame({"layer": ["b", "input", "a"], "depth": [2, 0, 1]})
        >>> layer_order(df)
        ['input', 'a', 'b']
    """
    first = layers.drop_duplicates("layer").reset_index(drop=True)
    first = first.assign(_pos=np.arange(len(first)))
    return first.sort_values(["depth", "_pos"], kind="stable")["layer"].tolist()


def _role(name: str) -> Role | None:
    words = [re.sub(r"\d+$", "", w) for w in re.split(r"[^0-9a-zA-Z]+|(?<=[a-z])(?=[A-Z])", name)]
    roles = {
        "encoder" if w in _ENCODER_WORDS else "decoder"
        for w in (w.lower() for w in words)
        if w in _ENCODER_WORDS or w in _DECODER_WORDS
    }
    return roles.pop() if len(roles) == 1 else None


def layer_roles(names: Iterable[str]) -> dict[str, Role | None]:
    """Tell encoder from decoder layers by their names, when the names say it.

    A name is split into words at dots, underscores and case changes, trailing digits dropped;
    ``encoder``/``enc``/``down``... mark the encoder, ``decoder``/``dec``/``up``/``upcat``... the
    decoder. A name with words of both kinds, or of neither, gets ``None``.

    Example:
        >>> layer_roles(["down_1.conv", "upcat_4", "model.0.conv"])
        {'down_1.conv': 'encoder', 'upcat_4': 'decoder', 'model.0.conv': None}
    """
    return {n: _role(n) for n in names}


def _iqr(x: pd.Series) -> tuple[float, float]:
    v = x.to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (np.nan, np.nan)
    q1, q3 = np.percentile(v, [25, 75])
    return (float(q1), float(q3))


def layer_summary(layers: pd.DataFrame) -> pd.DataFrame:
    """Per layer, in forward order: mean, quartiles and count of ``sa`` and ``sa_pred`` over images.

    Columns: ``layer``, ``depth``, ``channels``, ``shape``, ``sa_mean``, ``sa_q1``, ``sa_q3``,
    ``sa_pred_mean``, ``sa_pred_q1``, ``sa_pred_q3``, ``n_images``, ``n_undefined`` (images whose
    ``sa_pred`` is undefined).

    Example:
        >>> df = pd.DataFrame({"image": ["a", "b"], "layer": ["c", "c"], "depth": [1, 1],
        ...                    "sa": [0.2, 0.4], "sa_pred": [0.5, np.nan]})
        >>> layer_summary(df)[["layer", "sa_mean", "sa_pred_mean", "n_undefined"]].round(3)
          layer  sa_mean  sa_pred_mean  n_undefined
        0     c      0.3           0.5            1
    """
    rows = []
    for name in layer_order(layers):
        sub = layers[layers["layer"] == name]
        row: dict[str, Any] = {"layer": name, "depth": int(sub["depth"].iloc[0])}
        for col in ("channels", "shape"):
            row[col] = sub[col].iloc[0] if col in sub.columns else None
        for score in ("sa", "sa_pred"):
            vals = sub[score].astype(float)
            row[f"{score}_mean"] = float(vals.mean()) if vals.notna().any() else np.nan
            row[f"{score}_q1"], row[f"{score}_q3"] = _iqr(vals)
        row["n_images"] = int(sub["image"].nunique())
        row["n_undefined"] = int(sub["sa_pred"].isna().sum())
        rows.append(row)
    return pd.DataFrame(rows)


def unit_means(units: pd.DataFrame, score: str) -> pd.DataFrame:
    """Mean unit SA over images: one row per (layer, unit), ranked within the layer (1 = best).

    Example:
        >>> u = pd.DataFrame({"image": ["a", "b", "a", "b"], "layer": ["l"] * 4,
        ...                   "unit": [0, 0, 1, 1], "sa": [0.2, 0.4, 0.9, 0.7],
        ...                   "sa_pred": [0.1] * 4})
        >>> unit_means(u, "sa")[["layer", "unit", "sa", "rank"]]
          layer  unit   sa  rank
        0     l     1  0.8     1
        1     l     0  0.3     2
    """
    if score not in ("sa", "sa_pred"):
        raise ValueError(f"score must be 'sa' or 'sa_pred', got {score!r}")
    means = units.groupby(["layer", "unit"], sort=False)[["sa", "sa_pred"]].mean().reset_index()
    means = means.sort_values(
        ["layer", score, "unit"], ascending=[True, False, True], kind="stable"
    )
    means["rank"] = means.groupby("layer", sort=False).cumcount() + 1
    return means.reset_index(drop=True)


def quality_table(folder: ResultFolder) -> tuple[pd.DataFrame, str, str | None]:
    """One row per image, sorted by estimated quality (worst first).

    With ``qc.csv``, its columns are joined to ``images.parquet`` on ``image`` (qc's values win;
    its ``reason`` becomes ``flag_reason``); the estimate is the first of :data:`ESTIMATE_COLUMNS`
    found in qc.csv, else ``mean_sa_pred``.

    Returns:
        The table, the name of the estimate column, and the flag column (None without one).

    Raises:
        ValueError: no estimate column (neither qc.csv nor ``mean_sa_pred``).
    """
    images = folder.images.copy()
    flag: str | None = None
    estimate: str | None = None
    if folder.qc is not None:
        qc = folder.qc.rename(columns={"reason": "flag_reason"})
        qc = qc.drop_duplicates("image")
        shared = [c for c in qc.columns if c in images.columns and c != "image"]
        images = images.drop(columns=shared).merge(qc, on="image", how="outer", sort=False)
        estimate = next((c for c in ESTIMATE_COLUMNS if c in qc.columns), None)
        flag = next((c for c in FLAG_COLUMNS if c in qc.columns), None)
    if estimate is None:
        if "mean_sa_pred" not in images.columns:
            raise ValueError(
                "no estimated quality: qc.csv has no estimate and images has no mean_sa_pred"
            )
        estimate = "mean_sa_pred"
    images[estimate] = pd.to_numeric(images[estimate], errors="coerce")
    images = images.sort_values(estimate, ascending=True, na_position="first", kind="stable")
    return images.reset_index(drop=True), estimate, flag


def is_flagged(value: Any) -> bool:
    """Whether a qc flag value means the image was flagged.

    Example:
        >>> [is_flagged(v) for v in (True, "review", "ok", 0, None)]
        [True, True, False, False, False]
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return value != 0
    return str(value).strip().lower() in _FLAG_TRUE


class MapStore:
    """Read access to ``maps.npz``: which images were kept and their arrays.

    Opens the file without pickle (``allow_pickle=False``): a report never runs code from a file.

    Args:
        path: the ``maps.npz`` file.

    Example:
        >>> with MapStore("runs/demo/maps.npz") as maps:  # doctest: +SKIP
        ...     maps.image_ids
        ['case_000', 'case_001']
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._npz = np.load(self.path, allow_pickle=False)
        try:
            ids = self._npz["image_ids"] if "image_ids" in self._npz.files else np.array([])
        except ValueError as err:
            self._npz.close()
            raise ValueError(f"{self.path.name}: image_ids must be a string array ({err})") from err
        self.image_ids: list[str] = [str(i) for i in np.asarray(ids).reshape(-1)]
        self._layers: dict[int, list[str]] = {}
        self._units: dict[int, dict[str, list[int]]] = {}
        for key in self._npz.files:
            parts = key.split(":", 2)
            if len(parts) != 3 or not parts[0].isdigit():
                continue
            k, kind, rest = int(parts[0]), parts[1], parts[2]
            if kind == "layer":
                self._layers.setdefault(k, []).append(rest)
            elif kind == "unit" and ":" in rest:
                layer, unit = rest.rsplit(":", 1)
                if unit.lstrip("-").isdigit():
                    self._units.setdefault(k, {}).setdefault(layer, []).append(int(unit))

    def __enter__(self) -> MapStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the file."""
        self._npz.close()

    def index(self, image: str) -> int | None:
        """The k of an image id, or None when its maps were not kept."""
        try:
            return self.image_ids.index(image)
        except ValueError:
            return None

    def get(self, k: int, kind: str, *name: str | int) -> np.ndarray | None:
        """The array ``"{k}:{kind}[:{name}...]"``, or None when absent."""
        key = ":".join([str(k), kind, *map(str, name)])
        return self._npz[key] if key in self._npz.files else None

    def layers(self, k: int) -> list[str]:
        """Layers with a feature segmentation map for the k-th kept image."""
        return list(self._layers.get(k, []))

    def units(self, k: int) -> dict[str, list[int]]:
        """Units with a map for the k-th kept image, per layer."""
        return {layer: sorted(u) for layer, u in self._units.get(k, {}).items()}
