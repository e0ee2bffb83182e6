"""The tables the report's views are made of: layer and unit summaries, image subsets, the quality table.

Layer roles (encoder/decoder) come from the estimation layer's one rule,
:func:`segability.estimation.selection.layer_roles`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from segability.report.folder import ResultFolder

__all__ = [
    "select_images",
    "describe_images",
    "layer_order",
    "layer_summary",
    "unit_means",
    "quality_table",
    "is_flagged",
    "ESTIMATE_COLUMNS",
    "FLAG_COLUMNS",
]

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
GATE_COLUMNS = (*ESTIMATE_COLUMNS, *FLAG_COLUMNS, "lower", "upper", "flag_reason", "flag_status")
# Columns for bookkeeping, not shown in the report: the statuses are codes, their reasons are shown.
INTERNAL_QC_COLUMNS = ("input_sa_source", "flag_status", "status")


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
        qc.drop_duplicates("image").rename(columns={"reason": "flag_reason", "status": "flag_status"}).reset_index(drop=True)
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
        >>> from pathlib import Path
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
