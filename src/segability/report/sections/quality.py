"""The quality gate view: mean SA against Dice, and one row per gated image with its thumbnail."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from segability.report.figures import charts, thumbnails
from segability.report.folder import MapStore, ResultFolder
from segability.report.html import (
    Html,
    _absent,
    _figure_block,
    _finite,
    _fmt,
    _img,
    _num_cell,
    _table,
    _text_cell,
    join,
    tag,
)
from segability.report.page import Section
from segability.report.sections.maps import _view
from segability.report.summaries import (
    INTERNAL_QC_COLUMNS,
    describe_images,
    is_flagged,
    quality_table,
)

MAX_QUALITY_ROWS = 1000
THUMB_TABLE_SIDE = 64  # pixels of a thumbnail in the quality table


_QUALITY_LABELS = {
    "estimated_dice": "estimated Dice",
    "mean_sa_pred": "mean SA (vs prediction)",
    "gate_mean_sa_pred": "mean SA the gate used",
    "input_sa_pred": "input SA (vs prediction)",
    "mean_sa": "mean SA (vs label)",
    "input_sa": "input SA (vs label)",
    "dice": "Dice",
    "flag": "flag",
    "flag_reason": "flag reason",
    "reason": "note",
    "interval": "interval",
}
# Measured columns of the quality table, in display order after the gate's own columns.
_MEASURED = ("mean_sa_pred", "gate_mean_sa_pred", "input_sa_pred", "mean_sa", "input_sa", "dice")


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN when either variable is constant."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the ranks, ties given their average rank."""
    return _pearson(pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy())


def quality_columns(
    table: pd.DataFrame, estimate: str, flag: str | None, meta: Sequence[str]
) -> list[str]:
    """The columns the quality table shows, in order: one per quantity (``interval`` stands for
    ``lower``/``upper``); columns without any value are left out."""

    def has(c: str) -> bool:
        if c not in table.columns:
            return False
        v = table[c]
        return bool(v.notna().any() and v.astype(str).str.len().gt(0).any())

    cols = [c for c in meta if has(c)] + [estimate]
    if has("lower") and has("upper"):
        cols.append("interval")
    if flag:
        cols.append(flag)
    if has("flag_reason"):
        cols.append("flag_reason")
    cols += [c for c in _MEASURED if c != estimate and has(c)]
    if flag is None and has("reason"):
        cols.append(
            "reason"
        )  # without a gate, the analysis' own note (with one, the gate's reason says it)
    shown = {"image", *cols, "lower", "upper", "reason", *INTERNAL_QC_COLUMNS}
    cols += [c for c in table.columns if c not in shown and not c.startswith("_") and has(c)]
    return cols


def _quality_cell(r: dict[str, Any], c: str, flag: str | None, digits: dict[str, int]) -> Html:
    if c == "interval":
        lo, hi = r.get("lower"), r.get("upper")
        if _finite(lo) and _finite(hi):
            return tag("td", f"{_fmt(lo)}–{_fmt(hi)}", class_="num", data_sort=repr(float(lo)))
        return tag("td", "—", class_="num na", data_sort="")
    v = r.get(c)
    if c == flag:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return _text_cell(None)
        if isinstance(v, (bool, np.bool_)):
            return _text_cell("flagged" if v else "pass")
        return _text_cell(v)
    if c in digits:
        return _num_cell(v, digits[c])
    if isinstance(v, (float, np.floating, int, np.integer)) and not isinstance(v, (bool, np.bool_)):
        return _num_cell(v)
    return _text_cell(v)


def _quality_section(
    folder: ResultFolder, maps: MapStore | None, slice_index: int | None
) -> Section:
    title = "Quality gate"
    if folder.qc is None and "mean_sa_pred" not in folder.images.columns:
        return Section(
            "quality", title, _absent("no qc.csv and no mean_sa_pred in images.parquet."), False
        )
    table, estimate, flag = quality_table(folder)
    meta = [c for c in folder.metadata_columns if c in table.columns]
    columns = quality_columns(table, estimate, flag, meta)
    thumbs = maps is not None and any(maps.index(i) is not None for i in table["image"])
    headers = (
        (["view"] if thumbs else []) + ["image"] + [_QUALITY_LABELS.get(c, c) for c in columns]
    )
    digits = {}  # numeric columns of whole numbers: without decimals
    for c in columns:
        if c in table.columns and c not in _QUALITY_LABELS:
            col = table[c]
            if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
                v = col.dropna().to_numpy(float)
                digits[c] = 0 if np.all(v == np.round(v)) else 3
    rows = []
    for r in table.head(MAX_QUALITY_ROWS).to_dict("records"):
        cells = []
        if thumbs:
            k = maps.index(r["image"])
            png = None
            if k is not None and maps.get(k, "image") is not None:
                view, _ = _view(maps, k, slice_index, THUMB_TABLE_SIDE)
                pred = maps.get(k, "prediction")
                png = (
                    thumbnails.probability_png(view, pred)
                    if pred is not None
                    else thumbnails.overlay_png(view, None)
                )
                cells.append(
                    tag(
                        "td",
                        _img(png, r["image"], class_="thumb", size=view.shape),
                        class_="thumb-cell",
                    )
                )
            else:
                cells.append(tag("td", "", class_="thumb-cell"))
        cells.append(tag("td", tag("code", r["image"]), class_="layer"))
        cells += [_quality_cell(r, c, flag, digits) for c in columns]
        rows.append(
            tag("tr", join(cells), class_="flagged" if flag and is_flagged(r[flag]) else None)
        )
    n_images = folder.images["image"].nunique()
    if folder.qc is not None:
        n_flagged = sum(is_flagged(v) for v in table[flag]) if flag else 0
        outside = n_images - int(table["image"].isin(folder.images["image"]).sum())
        caption = (
            f"One row per image the gate judged in qc.csv, {describe_images(table['image'], folder.images)}"
            + (f", {n_flagged} flagged" if flag else "")
            + ". "
            + ("Flagged images first (highlighted), then " if flag else "")
            + f"{'w' if flag else 'W'}orst {_QUALITY_LABELS.get(estimate, estimate)} first (no label needed). "
            "Gate values (estimate, interval, flag, reason) come from qc.csv, measured values "
            "(SA, Dice, metadata) from images.parquet"
            + (
                f"; {outside} other image(s) of images.parquet (e.g. the calibration set) are not in qc.csv"
                if outside > 0
                else ""
            )
            + ". Click a header to sort."
        )
    else:
        caption = (
            f"One row per image ({n_images}), worst mean SA against the prediction first (no label "
            "needed); no gate decision in this run (no qc.csv). Click a header to sort."
        )
    if len(table) > MAX_QUALITY_ROWS:
        caption += f" The first {MAX_QUALITY_ROWS} of {len(table)} images are listed."
    blocks = []
    images = folder.images
    if "dice" in images.columns and "mean_sa_pred" in images.columns:
        both = images[
            np.isfinite(pd.to_numeric(images["dice"], errors="coerce").astype(float))
            & np.isfinite(pd.to_numeric(images["mean_sa_pred"], errors="coerce").astype(float))
        ]
    else:
        both = images.iloc[:0]
    if len(both) >= 3:
        x, y = both["mean_sa_pred"].to_numpy(float), both["dice"].to_numpy(float)
        rho, r_ = _spearman(x, y), _pearson(x, y)
        group = "group" if "group" in images.columns else None
        png = charts.quality_scatter_figure(
            both,
            "mean_sa_pred",
            "dice",
            group,
            "mean SA against the prediction (label-free)",
            "Dice of the prediction against the label",
        )
        colour = " Coloured by group." if group else ""
        left_out = n_images - len(both)
        blocks.append(
            _figure_block(
                png,
                "mean SA against Dice",
                f"Each dot is an image of images.parquet, {describe_images(both['image'], images)}"
                + (
                    f", {left_out} image(s) without a Dice or a defined mean SA left out"
                    if left_out
                    else ""
                )
                + f".{colour} The further up and right, the better; a rising cloud means "
                f"mean SA ranks outputs as Dice does (Spearman ρ = {_fmt(rho)}, "
                f"Pearson r = {_fmt(r_)}, n = {len(both)}).",
            )
        )
    else:
        blocks.append(
            _absent(
                "no labels in this run, so its agreement with the true Dice cannot be shown.",
                "Scatter of mean SA against Dice not shown:",
            )
        )
    blocks.append(
        _table(
            headers,
            rows,
            id_="table-quality",
            sorted_by=None,
            nosort=[0] if thumbs else [],
            caption=caption,
        )
    )
    return Section("quality", title, join(blocks))
