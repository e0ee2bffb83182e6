"""Reading a result folder for the report, and the tables the report's views are made of.

The report is a shell over the files of a result folder (see ``docs/architecture.md``, "The result
folder"); this module reads them with pandas/NumPy. Optional files may be absent: their fields are
then ``None``. Layer roles (encoder/decoder) come from the estimation layer's one rule,
:func:`segability.estimation.selection.layer_roles`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segability.estimation.selection import Role, layer_roles

__all__ = [
    "ResultFolder",
    "IncompleteRunError",
    "Finding",
    "read_result_folder",
    "parse_findings",
    "select_images",
    "describe_images",
    "layer_order",
    "layer_roles",
    "Role",
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

# qc.csv columns that are the gate's own (qc.csv wins over images.parquet for these); every other
# column both tables have is a measured value, taken from images.parquet.
GATE_COLUMNS = (*ESTIMATE_COLUMNS, *FLAG_COLUMNS, "lower", "upper", "flag_reason")
# qc.csv columns for the gate's bookkeeping, not shown in the report.
INTERNAL_QC_COLUMNS = ("input_sa_source",)
ERRORS_FILE = "errors.csv"
SHARD_DIR = "shards"


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


def select_images(images: pd.DataFrame, selector: dict[str, tuple[str, ...]] | None) -> pd.Series:
    """Boolean mask of the rows of ``images`` a finding's selector names (all rows for None).

    Raises:
        ValueError: the selector names a column ``images`` does not have.

    Example:
        >>> df = pd.DataFrame({"image": ["a", "b", "c"], "group": ["clean", "blur", "clean"]})
        >>> select_images(df, {"group": ("clean",)}).tolist()
        [True, False, True]
    """
    mask = pd.Series(True, index=images.index)
    for column, values in (selector or {}).items():
        if column not in images.columns:
            raise ValueError(
                f"findings: images selects by {column!r}, a column images.parquet does not have "
                f"(it has {list(images.columns)})"
            )
        mask &= images[column].astype(str).isin(values)
    return mask


def describe_images(ids: Iterable[str], images: pd.DataFrame, group: str = "group") -> str:
    """Which images a number is over, in words: their count and, with a ``group`` column, groups.

    Example:
        >>> df = pd.DataFrame({"image": list("abcd"), "group": ["clean", "blur", "blur", "clean"]})
        >>> describe_images(["a", "d"], df), describe_images(list("abcd"), df)
        ('2 images (group clean)', '4 images (all 2 groups: clean 2, blur 2)')
    """
    ids = list(dict.fromkeys(str(i) for i in ids))
    n = len(ids)
    noun = "image" if n == 1 else "images"
    total = images["image"].nunique() if "image" in images.columns else n
    if group not in images.columns or n == 0:
        return f"{n} {noun}" + (
            " (all)" if n == total and n > 1 else f" of {total}" if n < total else ""
        )
    groups = images.drop_duplicates("image").set_index("image")[group].astype(str)
    counts = groups.reindex(ids).value_counts(sort=False, dropna=False)
    all_groups = groups.nunique()
    if len(counts) == 1:
        return f"{n} {noun} ({group} {counts.index[0]})"
    listed = ", ".join(f"{g} {c}" for g, c in counts.items())
    scope = (
        f"all {all_groups} {group}s"
        if len(counts) == all_groups
        else f"{len(counts)} of {all_groups} {group}s"
    )
    return f"{n} {noun} ({scope}: {listed})"


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
        layers = pd.DataFrame({c: pd.Series(dtype=object) for c in LAYER_COLUMNS})
        images = pd.DataFrame({c: pd.Series(dtype=object) for c in STANDARD_IMAGE_COLUMNS})
    else:
        if not layers_path.is_file():
            raise _incomplete(root, "layers.parquet")
        layers = pd.read_parquet(layers_path)
        if len(layers.columns) == 0:  # an empty table written without columns
            layers = pd.DataFrame({c: pd.Series(dtype=object) for c in LAYER_COLUMNS})
        _require(layers, LAYER_COLUMNS, "layers.parquet")
        layers = layers.astype({"image": str, "layer": str})
        if not images_path.is_file():
            raise _incomplete(root, "images.parquet")
        images = pd.read_parquet(images_path)
        if len(images.columns) == 0:
            images = pd.DataFrame({c: pd.Series(dtype=object) for c in STANDARD_IMAGE_COLUMNS})
        _require(images, IMAGE_COLUMNS, "images.parquet")
        images = images.astype({"image": str})

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
        if units.empty:
            units = None

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
    try:
        errors = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:  # a zero-byte file: no failure recorded
        return pd.DataFrame({"file": pd.Series(dtype=str), "error": pd.Series(dtype=str)})
    _require(errors, ("file", "error"), ERRORS_FILE)
    return errors


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


def _qc_columns(qc: pd.DataFrame) -> pd.DataFrame:
    """qc.csv with the report's column names: ``reason`` -> ``flag_reason``; the gate's input SA
    under the name of what it was measured against (older qc.csv files call the label-free
    ``input_sa_pred`` ``input_sa`` and say which in ``input_sa_source``)."""
    qc = (
        qc.drop_duplicates("image").rename(columns={"reason": "flag_reason"}).reset_index(drop=True)
    )
    if "input_sa" in qc.columns and "input_sa_pred" not in qc.columns:
        source = qc.get("input_sa_source")
        from_label = (
            source.fillna("").astype(str).str.lower().eq("label")
            if source is not None
            else pd.Series(False, index=qc.index)
        )
        value = pd.to_numeric(qc["input_sa"], errors="coerce")
        qc["input_sa_pred"] = value.where(~from_label)
        qc["input_sa"] = value.where(from_label)
    return qc.drop(columns=[c for c in INTERNAL_QC_COLUMNS if c in qc.columns])


def quality_table(folder: ResultFolder) -> tuple[pd.DataFrame, str, str | None]:
    """The quality gate's table: one row per gated image, flagged images first, then by estimate.

    With ``qc.csv``, its rows (the images the gate judged) are joined to ``images.parquet`` on
    ``image``. A column both tables have is kept once: the gate's own values (estimate,
    ``lower``/``upper``, flag, reason, see ``GATE_COLUMNS``) from qc.csv, measured values (Dice, SA,
    metadata) from images.parquet, qc.csv filling only where images.parquet has no value. When
    qc.csv's ``mean_sa_pred`` differs from images.parquet's (the gate averaged other layers), it
    is kept as ``gate_mean_sa_pred``. qc.csv's ``reason`` becomes ``flag_reason``; the estimate is
    the first of :data:`ESTIMATE_COLUMNS` in qc.csv. Without qc.csv every image is listed, ranked
    by ``mean_sa_pred`` (worst first).

    Returns:
        The table, the name of the estimate column, and the flag column (None without one).

    Raises:
        ValueError: no estimate column (neither qc.csv nor ``mean_sa_pred``).

    Example:
        >>> folder = ResultFolder(Path("."), pd.DataFrame(), pd.DataFrame(
        ...     {"image": ["a", "b"], "dice": [0.9, 0.4], "mean_sa_pred": [0.8, 0.3]}),
        ...     qc=pd.DataFrame({"image": ["b", "a"], "estimated_dice": [0.35, 0.85],
        ...                      "flag": [True, False], "dice": [np.nan, np.nan]}))
        >>> quality_table(folder)[0][["image", "estimated_dice", "flag", "dice"]]
          image  estimated_dice   flag  dice
        0     b            0.35   True   0.4
        1     a            0.85  False   0.9
    """
    images = folder.images.drop_duplicates("image").reset_index(drop=True)
    flag: str | None = None
    estimate: str | None = None
    if folder.qc is not None:
        qc = _qc_columns(folder.qc)
        table = qc[["image"]].merge(images, on="image", how="left", sort=False)
        for c in qc.columns:
            if c == "image":
                continue
            theirs = qc[c].reset_index(drop=True)
            if c in GATE_COLUMNS or c not in table.columns:
                table[c] = theirs.to_numpy()
                continue
            ours = table[c]
            if c == "mean_sa_pred":
                a = pd.to_numeric(ours, errors="coerce").to_numpy(float)
                b = pd.to_numeric(theirs, errors="coerce").to_numpy(float)
                both = np.isfinite(a) & np.isfinite(b)
                if not np.allclose(a[both], b[both], rtol=1e-6, atol=1e-9):
                    table["gate_mean_sa_pred"] = b
            table[c] = ours.where(ours.notna(), theirs.to_numpy())
        estimate = next((c for c in ESTIMATE_COLUMNS if c in qc.columns), None)
        flag = next((c for c in FLAG_COLUMNS if c in qc.columns), None)
    else:
        table = images.copy()
    if estimate is None:
        if "mean_sa_pred" not in table.columns:
            raise ValueError(
                "no estimated quality: qc.csv has no estimate and images has no mean_sa_pred"
            )
        estimate = "mean_sa_pred"
    table[estimate] = pd.to_numeric(table[estimate], errors="coerce")
    keys, ascending = [estimate], [True]
    if flag is not None:
        table["_flagged"] = [is_flagged(v) for v in table[flag]]
        keys, ascending = ["_flagged", estimate], [False, True]
    table = table.sort_values(keys, ascending=ascending, na_position="first", kind="stable")
    return table.drop(columns=["_flagged"], errors="ignore").reset_index(drop=True), estimate, flag


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
