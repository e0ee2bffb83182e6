"""The result folder: the one owner of its schema, its maps archive, its writes and its reads.

Every file a run writes is described here (``docs/architecture.md`` renders the same list):
:class:`SAResult` saves and :func:`load_result` reads the tables; batch shards, ``qc``, the report
and the estimation go through :func:`write_table` / :func:`read_table`, :func:`encode_maps` /
:func:`decode_maps` and :func:`write_atomic`. A table is checked against its schema on write and
on read (:func:`validate_table`), so a wrong dtype or a missing column fails where it is made.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "INPUT",
    "Column",
    "Schema",
    "LAYERS",
    "IMAGES",
    "UNITS",
    "ERRORS",
    "QC",
    "HISTORY",
    "SCHEMAS",
    "RESULT_FILES",
    "SHARD_DIR",
    "RUN_FILE",
    "SAResult",
    "load_result",
    "validate_table",
    "empty_table",
    "typed",
    "write_table",
    "read_table",
    "table_bytes",
    "encode_maps",
    "decode_maps",
    "MapsArchive",
    "write_atomic",
    "layer_means",
    "class_table",
    "class_names",
    "CLASS_KEYS",
]

INPUT = "input"  # the layer name of the input image itself
SHARD_DIR = "shards"
RUN_FILE = "run.json"  # in shards/: the run's fingerprint, for --resume


@dataclass(frozen=True)
class Column:
    """A column: name, pandas dtype (``"string"``, ``"int64"``, ``"float64"``, ``"bool"``), whether NaN may appear.

    A ``key`` column identifies a row and must be present; a table from an outside script (or an
    older version) that lacks another column is read with that column filled (NaN, ``""``, 0,
    False) by :func:`read_table` with ``fill=True``. An ``optional`` column is written only by
    some runs (never filled in); when present it is checked like the others.
    """

    name: str
    dtype: str
    nullable: bool = False
    doc: str = ""
    key: bool = False
    optional: bool = False  # present only in some runs (the class columns of a multi-class run)

    @property
    def default(self) -> Any:
        return {"string": "", "int64": 0, "bool": False}.get(self.dtype, np.nan)


@dataclass(frozen=True)
class Schema:
    """A table of the result folder: its file name and columns; ``extra`` allows more columns."""

    file: str
    columns: tuple[Column, ...]
    extra: bool = False
    doc: str = ""

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def base_names(self) -> list[str]:
        """The columns every such table has (without the optional ones)."""
        return [c.name for c in self.columns if not c.optional]


_STATUS = Column("status", "string", doc="why a score is undefined: ok, output_not_finite, features_not_finite, "
                 "undefined_prototypes, empty_prediction, not_features, not_called, failed")  # fmt: skip
_REASON = Column("reason", "string", doc="the status in words (empty when ok), with detail such as an error message")
_CLASS = Column("class", "int64", doc="the class scored (multi-class runs only: one row per class)", key=True, optional=True)
_CLASS_NAME = Column("class_name", "string", doc="the class's name (multi-class runs only)", optional=True)
CLASS_KEYS = ("class", "class_name")

LAYERS = Schema(
    "layers.parquet",
    (
        Column("image", "string", doc="image id", key=True),
        _CLASS,
        _CLASS_NAME,
        Column("layer", "string", doc=f"layer name; {INPUT!r} is the input image", key=True),
        Column("depth", "int64", doc=f"forward order; {INPUT!r} = 0", key=True),
        Column("channels", "int64", doc="channels of the features (0 when not scored)"),
        Column("shape", "string", doc="the layer output's shape without batch, e.g. 16x64x64"),
        Column("sa", "float64", True, "SA against the label (NaN without label)"),
        Column("sa_pred", "float64", True, "SA against the network's binarised prediction"),
        _STATUS,
        _REASON,
    ),
    doc="one row per image and layer",
)
IMAGES = Schema(
    "images.parquet",
    (
        Column("image", "string", key=True),
        _CLASS,
        _CLASS_NAME,
        Column("dice", "float64", True, "the network output against the label"),
        Column("mean_sa", "float64", True, "mean of sa over the hidden layers with a defined sa"),
        Column("mean_sa_pred", "float64", True, "mean of sa_pred over the hidden layers with a defined sa_pred"),
        Column("input_sa", "float64", True, f"sa of the {INPUT!r} layer (the raw image) against the label"),
        Column("input_sa_pred", "float64", True, f"sa_pred of the {INPUT!r} layer"),
        _STATUS,
        _REASON,
    ),
    extra=True,
    doc="one row per image; callers add metadata columns (group, severity, file, label_file)",
)
UNITS = Schema(
    "units.parquet",
    (
        Column("image", "string", key=True),
        _CLASS,
        _CLASS_NAME,
        Column("layer", "string", key=True),
        Column("unit", "int64", key=True),
        Column("sa", "float64", True),
        Column("sa_pred", "float64", True),
    ),
    doc="one row per image, layer and unit (when units were analysed)",
)
ERRORS = Schema(
    "errors.csv",
    (
        Column("file", "string", doc="the input file", key=True),
        Column("stage", "string", doc="read, model, analysis or not_run"),
        Column("error", "string", doc="the error type and message"),
        Column("traceback", "string", doc="the worker's traceback (empty when none)"),
    ),
    extra=True,
    doc="one row per input file that could not be analysed",
)
QC = Schema(
    "qc.csv",
    (
        Column("image", "string", key=True),
        _CLASS,
        _CLASS_NAME,
        Column("estimated_dice", "float64", True),
        Column("lower", "float64", True, doc="lower end of the estimate's interval"),
        Column("upper", "float64", True, doc="upper end of the estimate's interval"),
        Column("flag", "bool", doc="sent to a person for review"),
        Column("status", "string", doc="the gate's status: with a mean-SA calibration ok, low_input_sa, "
               "model_fails, no_input_sa, empty_prediction, sa_undefined, failed; with a profile estimator "
               "ok, image_quality, model, shift (FlagStatus), failed"),  # fmt: skip
        _REASON,
    ),
    extra=True,
    doc="the quality gate, one row per image; then the scores it used: mean_sa_pred, input_sa_pred, "
    "input_sa (label-guided, NaN without label), input_sa_source (which of the two the gate read); with a "
    "profile estimator out_of_range and distance (the features' distance to the calibration data)",
)
HISTORY = Schema(
    "history.csv",
    (Column("epoch", "int64", key=True), Column("layer", "string", key=True), Column("sa", "float64", True)),
    extra=True,
    doc="SA per layer during training (and what the trainer adds: depth, sa_pred, val_dice, loss)",
)
SCHEMAS = {s.file: s for s in (LAYERS, IMAGES, UNITS, ERRORS, QC, HISTORY)}
RESULT_FILES = ("layers.parquet", "images.parquet", "units.parquet", "settings.json", "maps.npz")


# ------------------------------------------------------------------------------------ tables
_TRUE = {"true", "1", "1.0", "yes", "y"}


def empty_table(schema: Schema) -> pd.DataFrame:
    """A table with the schema's columns and dtypes and no rows."""
    return typed(pd.DataFrame({c.name: [] for c in schema.columns}), schema)


def typed(df: pd.DataFrame, schema: Schema, *, fill: bool = False) -> pd.DataFrame:
    """``df`` with the schema's columns cast to their dtypes; missing nullable columns added as NaN,
    and with ``fill`` every missing non-key column added with its default."""
    df = df.copy()
    for c in schema.columns:
        if c.name not in df.columns and not c.optional and (c.nullable or (fill and not c.key)):
            df[c.name] = c.default
        if c.name not in df.columns:
            continue
        if c.dtype == "string":
            values = df[c.name]
            if pd.api.types.infer_dtype(values, skipna=False) not in ("string", "empty"):  # else already text
                values = values.where(values.notna(), "").astype(str)
            df[c.name] = values.astype(object)
        elif c.dtype == "bool":
            values = df[c.name]
            if not pd.api.types.is_bool_dtype(values):  # written as text ("True", "yes", "0", ...)
                values = values.map(lambda v: str(v).strip().lower() in _TRUE)
            df[c.name] = values.astype(bool)
        else:
            df[c.name] = df[c.name].astype(c.dtype)
    order = schema.names + [c for c in df.columns if c not in schema.names]
    return df[[c for c in order if c in df.columns]]


def validate_table(df: pd.DataFrame, schema: Schema, *, source: str = "") -> None:
    """Raise ``ValueError`` unless ``df`` has the schema's columns, dtypes and nullability."""
    where = f" in {source}" if source else ""
    missing = [c.name for c in schema.columns if c.name not in df.columns and not c.optional]
    if missing:
        raise ValueError(f"{schema.file}{where} lacks the column(s) {missing}; it has {list(df.columns)}")
    if not schema.extra:
        extra = [c for c in df.columns if c not in schema.names]
        if extra:
            raise ValueError(f"{schema.file}{where} has unknown column(s) {extra}")
    for c in schema.columns:
        if c.name not in df.columns:
            continue
        values = df[c.name]
        if c.dtype == "string":
            ok = pd.api.types.infer_dtype(values, skipna=False) in ("string", "empty")
        elif c.dtype == "bool":
            ok = pd.api.types.is_bool_dtype(values)
        elif c.dtype == "int64":
            ok = pd.api.types.is_integer_dtype(values)
        else:
            ok = pd.api.types.is_float_dtype(values)
        if not ok:
            raise ValueError(f"{schema.file}{where}: column {c.name!r} must hold {c.dtype}, got {values.dtype}")
        if not c.nullable and c.dtype == "float64" and bool(values.isna().any()):
            raise ValueError(f"{schema.file}{where}: column {c.name!r} must not hold NaN")


def table_bytes(df: pd.DataFrame, schema: Schema) -> bytes:
    """The table, checked, as Parquet (or CSV for a ``.csv`` schema) bytes."""
    validate_table(df, schema)
    buf = io.BytesIO()
    if schema.file.endswith(".csv"):
        df.to_csv(buf, index=False)
    else:
        df.to_parquet(buf, index=False)
    return buf.getvalue()


def write_table(df: pd.DataFrame, path: str | os.PathLike, schema: Schema) -> Path:
    """Check ``df`` against ``schema`` and write it atomically to ``path``."""
    return write_atomic(path, table_bytes(df, schema))


def read_table(path: str | os.PathLike, schema: Schema, *, fill: bool = False) -> pd.DataFrame:
    """Read a table of the result folder and check it against its schema.

    A table written by an earlier version without the ``status`` column gets one derived from
    ``reason`` (``ok`` where the reason is empty, else ``unknown``). With ``fill`` (readers of
    tables from outside scripts, such as the report), missing non-key columns take their default;
    missing key columns are an error either way. A zero-byte CSV is an empty table.

    Raises:
        ValueError: a column is missing or holds the wrong type (the message names the file).
    """
    path = Path(path)
    if schema.file.endswith(".csv") and path.stat().st_size == 0:
        return empty_table(schema)
    if schema.file.endswith(".csv"):
        df = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={c.name: str for c in schema.columns if c.dtype == "string"})
        for c in schema.columns:
            if c.name in df.columns and c.dtype == "string":
                df[c.name] = df[c.name].map(lambda v: "" if isinstance(v, float) and np.isnan(v) else str(v)).astype(object)
        if schema is ERRORS:
            for name in ("stage", "traceback"):
                if name not in df.columns:
                    df[name] = ""
    else:
        df = pd.read_parquet(path)
    if len(df.columns) == 0:  # an empty table written without columns
        return empty_table(schema)
    if "status" in schema.names and "status" not in df.columns and "reason" in df.columns:
        df["status"] = np.where(df["reason"].fillna("").astype(str) == "", "ok", "unknown").astype(object)
    df = typed(df, schema, fill=fill)
    validate_table(df, schema, source=str(path))
    return df


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, flush it to disk, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == 28:  # ENOSPC
            raise OSError(exc.errno, f"no space left on the device to write {path}; free some space and run again") from exc
        raise
    return path


def layer_means(layers: pd.DataFrame) -> pd.DataFrame:
    """Per image: ``mean_sa`` and ``mean_sa_pred`` over the hidden layers (``input`` excluded),
    skipping undefined (NaN) scores; ``input_sa`` and ``input_sa_pred``. The one definition of
    these names, used by the analysis and the estimation alike. A multi-class table gives them
    per image and class (indexed by both)."""
    keys = ["image", "class"] if "class" in layers.columns else ["image"]
    hidden = layers[layers["layer"] != INPUT]
    means = hidden.groupby(keys, sort=False)[["sa", "sa_pred"]].mean()  # pandas' mean skips NaN
    means.columns = ["mean_sa", "mean_sa_pred"]
    inputs = layers[layers["layer"] == INPUT].set_index(keys)[["sa", "sa_pred"]]
    inputs.columns = ["input_sa", "input_sa_pred"]
    return means.join(inputs, how="outer")


def class_table(df: pd.DataFrame | None, c: int) -> pd.DataFrame | None:
    """The rows of class ``c`` of a multi-class table, without the class columns (a table
    without them, or None, as it is): what a single-target run with ``target=c`` writes."""
    if df is None or "class" not in df.columns:
        return df
    return df[df["class"] == c].drop(columns=[k for k in CLASS_KEYS if k in df.columns]).reset_index(drop=True)


def class_names(df: pd.DataFrame) -> dict[int, str]:
    """``{class: name}`` of a multi-class table, in class order (empty for a single-target table)."""
    if "class" not in df.columns:
        return {}
    names = df.groupby("class", sort=True)["class_name"].first() if "class_name" in df.columns else None
    return {int(c): (str(names[c]) if names is not None else str(c)) for c in sorted(df["class"].unique())}


# -------------------------------------------------------------------------------------- maps
def encode_maps(maps: Mapping[str, Mapping[str, Any]]) -> bytes:
    """The kept maps of one or more images as ``.npz`` bytes, in the folder's one key scheme.

    For the k-th image: ``"{k}:image"`` (C, *S) float32, ``"{k}:label"`` (*S) uint8,
    ``"{k}:prediction"`` (*S) float32, ``"{k}:layer:{layer}"`` (*S) uint8,
    ``"{k}:unit:{layer}:{unit}"`` (*S) uint8; ``"image_ids"`` maps k to the image id. A
    multi-class entry's ``"classes"`` ({class: entry without image}) go under ``"{k}:class:{c}:..."``
    with the same names.
    """
    arrays: dict[str, np.ndarray] = {"image_ids": np.array(list(maps), dtype=str)}

    def put(prefix: str, entry: Mapping[str, Any]) -> None:
        for key in ("image", "label", "prediction"):
            if entry.get(key) is not None:
                arrays[f"{prefix}:{key}"] = np.asarray(entry[key])
        for layer, arr in entry.get("layers", {}).items():
            arrays[f"{prefix}:layer:{layer}"] = np.asarray(arr)
        for layer, units in entry.get("units", {}).items():
            for unit, arr in units.items():
                arrays[f"{prefix}:unit:{layer}:{unit}"] = np.asarray(arr)

    for k, entry in enumerate(maps.values()):
        put(str(k), entry)
        for c, sub in (entry.get("classes") or {}).items():
            put(f"{k}:class:{int(c)}", sub)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


class MapsArchive:
    """Lazy read access to a maps archive (``maps.npz`` or a shard): kept images and their arrays.

    Opens the file without pickle (``allow_pickle=False``) and reads an array only when asked, so a
    report of a large run does not load every map. The one reader of :func:`encode_maps`' scheme.

    Args:
        source: the archive's path or its bytes.

    Example:
        >>> data = encode_maps({"a": {"prediction": np.zeros((2, 2)), "layers": {"conv": np.ones((2, 2))}}})
        >>> with MapsArchive(data) as maps:
        ...     maps.image_ids, maps.layers(0), maps.get(0, "layer", "conv").sum()
        (['a'], ['conv'], np.float64(4.0))
    """

    def __init__(self, source: bytes | str | os.PathLike):
        self.path = None if isinstance(source, bytes) else Path(source)
        self._npz = np.load(io.BytesIO(source) if isinstance(source, bytes) else Path(source), allow_pickle=False)
        name = "maps" if self.path is None else self.path.name
        try:
            ids = self._npz["image_ids"] if "image_ids" in self._npz.files else np.array([])
        except ValueError as err:
            self._npz.close()
            raise ValueError(f"{name}: image_ids must be a string array ({err})") from err
        self.image_ids: list[str] = [str(i) for i in np.asarray(ids).reshape(-1)]
        # by (k, class or None): the layers, units and plain arrays present
        self._layers: dict[tuple[int, int | None], list[str]] = {}
        self._units: dict[tuple[int, int | None], dict[str, list[int]]] = {}
        self._plain: dict[tuple[int, int | None], list[str]] = {}
        for key in self._npz.files:
            parts = key.split(":", 2)
            if not parts[0].isdigit() or len(parts) < 2:
                continue
            k: tuple[int, int | None] = (int(parts[0]), None)
            if parts[1] == "class" and len(parts) == 3:
                c, _, tail = parts[2].partition(":")
                if not c.lstrip("-").isdigit() or not tail:
                    continue
                k = (k[0], int(c))
                parts = [parts[0], *tail.split(":", 1)]
            kind = parts[1]
            rest = parts[2] if len(parts) == 3 else ""
            if kind == "layer" and rest:
                self._layers.setdefault(k, []).append(rest)
            elif kind == "unit" and ":" in rest:
                layer, unit = rest.rsplit(":", 1)
                if unit.lstrip("-").isdigit():
                    self._units.setdefault(k, {}).setdefault(layer, []).append(int(unit))
            elif len(parts) == 2:
                self._plain.setdefault(k, []).append(kind)

    def __enter__(self) -> MapsArchive:
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

    def get(self, k: int, kind: str, *name: str | int, cls: int | None = None) -> np.ndarray | None:
        """The array ``"{k}:{kind}[:{name}...]"`` (of class ``cls`` of a multi-class run), or None when absent."""
        prefix = [str(k)] if cls is None else [str(k), "class", str(int(cls))]
        key = ":".join([*prefix, kind, *map(str, name)])
        return self._npz[key] if key in self._npz.files else None

    def classes(self, k: int) -> list[int]:
        """The classes with maps of the k-th kept image (empty for a single-target run)."""
        return sorted({c for (i, c) in (*self._plain, *self._layers, *self._units) if i == k and c is not None})

    def layers(self, k: int, cls: int | None = None) -> list[str]:
        """Layers with a feature segmentation map for the k-th kept image (and class)."""
        return list(self._layers.get((k, cls), []))

    def units(self, k: int, cls: int | None = None) -> dict[str, list[int]]:
        """Units with a map for the k-th kept image (and class), per layer."""
        return {layer: sorted(u) for layer, u in self._units.get((k, cls), {}).items()}

    def entry(self, k: int, cls: int | None = None) -> dict[str, Any]:
        """Every array of the k-th kept image, in the form :func:`encode_maps` takes (with
        ``"classes"`` for a multi-class run)."""
        out: dict[str, Any] = {"image": None, "label": None, "prediction": None, "layers": {}, "units": {}}
        if cls is not None:
            del out["image"]
        for kind in self._plain.get((k, cls), []):
            out[kind] = self.get(k, kind, cls=cls)
        out["layers"] = {layer: self.get(k, "layer", layer, cls=cls) for layer in self.layers(k, cls)}
        for layer, units in self.units(k, cls).items():
            out["units"][layer] = {u: self.get(k, "unit", layer, u, cls=cls) for u in units}
        if cls is None and self.classes(k):
            out["classes"] = {c: self.entry(k, c) for c in self.classes(k)}
        return out


def decode_maps(data: bytes | str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read what :func:`encode_maps` wrote (bytes or a file path): ``{image id: entry}``."""
    with MapsArchive(data) as archive:
        return {image: archive.entry(k) for k, image in enumerate(archive.image_ids)}


# ---------------------------------------------------------------------------------- SAResult
@dataclass
class SAResult:
    """Tables of an analysis (the columns are :data:`LAYERS`, :data:`IMAGES`, :data:`UNITS`).

    Attributes:
        layers: one row per image and layer.
        images: one row per image, plus caller metadata columns.
        units: one row per image, layer and unit (when units were analysed).
        maps: kept maps by image id: ``{"image", "label", "prediction", "layers": {layer: map},
            "units": {layer: {unit: map}}}``.
        settings: the run's settings.
    """

    layers: pd.DataFrame
    images: pd.DataFrame
    units: pd.DataFrame | None = None
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def by_class(self) -> dict[int, tuple[str, SAResult]]:
        """A multi-class result as ``{class: (name, single-target result)}`` (empty for a
        single-target result); each equals a run with ``target=class``."""
        out = {}
        for c, name in class_names(self.layers).items():
            maps = {i: {"image": e.get("image"), **e["classes"][c]} for i, e in self.maps.items() if c in e.get("classes", {})}
            out[c] = (name, SAResult(layers=class_table(self.layers, c), images=class_table(self.images, c),
                                     units=class_table(self.units, c), maps=maps,
                                     settings={**self.settings, "target": c, "classes": None}))  # fmt: skip
        return out

    def layer_summary(self) -> pd.DataFrame:
        """Mean, standard deviation and count of ``sa`` and ``sa_pred`` per layer, in forward order."""
        g = self.layers.groupby(["depth", "layer"], sort=True)[["sa", "sa_pred"]]
        out = g.agg(["mean", "std", "count"])
        out.columns = [f"{a}_{b}" for a, b in out.columns]
        return out.reset_index()

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False, keep: Sequence[str] = ()) -> Path:
        """Write the result folder (``layers.parquet``, ``images.parquet``, ``units.parquet``,
        ``settings.json``, ``maps.npz``).

        Args:
            directory: the folder (created when missing).
            overwrite: replace result files already there.
            keep: names of other files a caller writes next (they are not counted as earlier results).

        Raises:
            FileExistsError: when the folder already holds result files and ``overwrite`` is False.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        existing = [f for f in RESULT_FILES if (path / f).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{path} already holds results ({', '.join(existing)}); pass overwrite=True to replace them, "
                "or choose another folder"
            )
        for name in existing:
            (path / name).unlink()
        write_table(self.layers, path / LAYERS.file, LAYERS)
        write_table(self.images, path / IMAGES.file, IMAGES)
        if self.units is not None:
            write_table(self.units, path / UNITS.file, UNITS)
        write_atomic(path / "settings.json", json.dumps(self.settings, indent=2, default=str).encode())
        if self.maps:
            write_atomic(path / "maps.npz", encode_maps(self.maps))
        return path


def load_result(directory: str | os.PathLike) -> SAResult:
    """Read a result folder written by :meth:`SAResult.save` (or merged by a batch run).

    Raises:
        FileNotFoundError: when ``layers.parquet`` or ``images.parquet`` is missing.
        ValueError: when a table does not follow its schema.
    """
    path = Path(directory)
    for required in (LAYERS.file, IMAGES.file):
        if not (path / required).exists():
            raise FileNotFoundError(f"{path} is not a segability result folder: {required} is missing")
    units = read_table(path / UNITS.file, UNITS) if (path / UNITS.file).exists() else None
    settings = json.loads((path / "settings.json").read_text()) if (path / "settings.json").exists() else {}
    maps = decode_maps(path / "maps.npz") if (path / "maps.npz").exists() else {}
    return SAResult(
        layers=read_table(path / LAYERS.file, LAYERS),
        images=read_table(path / IMAGES.file, IMAGES),
        units=units,
        maps=maps,
        settings=settings,
    )
