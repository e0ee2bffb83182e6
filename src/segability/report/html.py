"""The HTML report: one self-contained file built from a result folder.

Every figure is an embedded PNG (``data:`` URI); the only script is a small table sorter and the
only style sheet is inline. A Content-Security-Policy in the page allows nothing else: no network,
no other script (the sorter is allowed by its hash), so even a string that slipped past escaping
could not run. Text that comes from the user's files goes through :func:`esc`; HTML is assembled
from :class:`Html` fragments only, so an unescaped string cannot end up in the page by accident.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from segability import __version__
from segability.report import figures
from segability.report.data import (
    MapStore,
    ResultFolder,
    is_flagged,
    layer_order,
    layer_roles,
    layer_summary,
    parse_findings,
    quality_table,
    read_result_folder,
    unit_means,
)

__all__ = ["build_report", "Html", "esc", "tag"]

GENERATOR = "segability report"
MAX_QUALITY_ROWS = 1000
BEST_UNITS_SHOWN = 6
TOP_UNITS_LISTED = 5
UNIT_SIDE = 96  # pixels of a unit map thumbnail
THUMB_TABLE_SIDE = 64  # pixels of a thumbnail in the quality table
SETTINGS_FIRST = (
    "model",
    "layers",
    "guide",
    "output",
    "target",
    "units",
    "spatial_dims",
    "data",
    "version",
    "date",
)


# ----------------------------------------------------------------------------- safe HTML


class Html(str):
    """A fragment of trusted HTML: built by this module, never from raw user text."""

    __slots__ = ()


def esc(value: Any) -> Html:
    """Escape any value for HTML text or attribute; :class:`Html` passes through unchanged.

    Example:
        >>> esc("<script>alert(1)</script>")
        '&lt;script&gt;alert(1)&lt;/script&gt;'
    """
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def tag(element: str, /, *children: Any, **attrs: Any) -> Html:
    """An element whose children and attribute values are escaped unless already :class:`Html`.

    Attribute names take a trailing ``_`` off (``class_``) and turn ``_`` into ``-``
    (``data_sort``); ``None``/``False`` leaves the attribute out, ``True`` writes it bare.

    Example:
        >>> tag("td", "<b>", class_="num", data_sort=0.5)
        '<td class="num" data-sort="0.5">&lt;b&gt;</td>'
    """
    parts = [element]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        parts.append(key if value is True else f'{key}="{esc(value)}"')
    open_ = "<" + " ".join(parts) + ">"
    if element in ("img", "meta", "br", "col"):
        return Html(open_)
    return Html(open_ + "".join(esc(c) for c in children if c is not None) + f"</{element}>")


def join(parts: Iterable[Any], sep: str = "") -> Html:
    """Concatenate fragments, escaping any that are not :class:`Html`."""
    return Html(sep.join(esc(p) for p in parts if p is not None))


def _img(png: bytes, alt: str, class_: str | None = None, title: str | None = None) -> Html:
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return tag("img", src=src, alt=alt, class_=class_, title=title)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "—"


def _num_cell(x: Any, digits: int = 3) -> Html:
    if _finite(x):
        return tag("td", _fmt(x, digits), class_="num", data_sort=repr(float(x)))
    return tag("td", "—", class_="num na", data_sort="")


def _text_cell(x: Any) -> Html:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return tag("td", "", data_sort="")
    return tag("td", x)


def _table(
    headers: Sequence[Any],
    rows: Iterable[Html],
    *,
    id_: str,
    sorted_by: int | None = None,
    nosort: Sequence[int] = (),
    caption: str | None = None,
) -> Html:
    ths = [
        tag(
            "th",
            h,
            scope="col",
            class_="nosort" if i in nosort else None,
            aria_sort="ascending" if i == sorted_by else None,
            title=None if i in nosort else "Click to sort",
        )
        for i, h in enumerate(headers)
    ]
    body = tag("tbody", join(rows))
    table = tag("table", tag("thead", tag("tr", join(ths))), body, class_="sortable", id=id_)
    cap = tag("p", caption, class_="caption") if caption else None
    return join([cap, tag("div", table, class_="table-wrap")])


def _figure_block(png: bytes, alt: str, caption: str, class_: str = "chart") -> Html:
    return tag("figure", _img(png, alt), tag("figcaption", caption), class_=class_)


def _absent(text: str, what: str = "Not shown.") -> Html:
    return tag("p", tag("strong", what + " "), text, class_="absent")


# ----------------------------------------------------------------------------- sections


@dataclass
class Section:
    """One view of the report: its anchor, title, body, and whether its data was there."""

    id: str
    title: str
    body: Html
    present: bool = True


def _header(folder: ResultFolder, title: str, n_layers: int) -> Html:
    s = folder.settings
    facts = [
        ("images", str(folder.images["image"].nunique())),
        ("layers", str(n_layers)),
        ("labels", "yes" if folder.has_labels else "no"),
        ("units", "yes" if folder.units is not None else "no"),
    ]
    if "model" in s:
        facts.insert(0, ("model", _setting_text(s["model"])))
    if "date" in s:
        facts.append(("run", _setting_text(s["date"])))
    items = join(
        tag("li", tag("span", k, class_="k"), " ", tag("span", v, class_="v")) for k, v in facts
    )
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return tag(
        "header",
        tag("h1", title),
        tag("ul", items, class_="facts"),
        tag(
            "p",
            "Result folder ",
            tag("code", str(folder.root.resolve())),
            f" · report built {built} with segability {__version__}",
            class_="meta",
        ),
    )


def _findings_section(findings: Sequence[str]) -> Section | None:
    if not findings:
        return None
    body = tag("ul", join(tag("li", f) for f in findings), class_="findings")
    return Section("findings", "What this run shows", body)


def _layers_section(folder: ResultFolder, summary: pd.DataFrame) -> Section:
    roles = layer_roles(summary["layer"])
    shaded = {r for n, r in roles.items() if n != "input"} - {None} == {"encoder", "decoder"}
    scores = (["sa"] if folder.has_labels else []) + ["sa_pred"]
    png = figures.sa_per_layer_figure(summary, roles, scores)
    n = folder.layers["image"].nunique()
    which = (
        "blue: against the label, orange: against the network's own prediction (label-free)"
        if folder.has_labels
        else "against the network's own prediction (no labels in this run)"
    )
    shade = (
        "shading marks encoder and decoder layers, told apart by their names."
        if shaded
        else "the layer names do not tell encoder from decoder, so nothing is shaded."
    )
    caption = (
        f"Read left to right in forward order: each point is the mean SA over {n} images ({which}), "
        f"the band the interquartile range, the hollow square the input image itself; {shade}"
    )
    blocks = [_figure_block(png, "SA per layer", caption)]

    show_n = summary["n_images"].nunique() > 1
    show_undefined = bool(summary["n_undefined"].gt(0).any())
    headers = ["depth", "layer"] + (["part"] if shaded else []) + ["channels", "shape"]
    if folder.has_labels:
        headers += ["SA", "SA IQR"]
    headers += (
        ["SA pred", "SA pred IQR"]
        + (["images"] if show_n else [])
        + (["undefined"] if show_undefined else [])
    )
    rows = []
    for r in summary.itertuples(index=False):
        cells = [_num_cell(r.depth, 0), tag("td", tag("code", r.layer), class_="layer")]
        if shaded:
            cells.append(_text_cell(roles.get(r.layer) or ""))
        cells += [
            _num_cell(r.channels, 0) if r.channels is not None else _text_cell(None),
            _text_cell(r.shape),
        ]
        for score in scores:
            q1, q3 = getattr(r, f"{score}_q1"), getattr(r, f"{score}_q3")
            cells.append(_num_cell(getattr(r, f"{score}_mean")))
            width = q3 - q1 if _finite(q1) and _finite(q3) else None
            cells.append(
                tag(
                    "td",
                    f"{_fmt(q1)}–{_fmt(q3)}" if width is not None else "—",
                    class_="num",
                    data_sort=repr(float(width)) if width is not None else "",
                )
            )
        if show_n:
            cells.append(_num_cell(r.n_images, 0))
        if show_undefined:
            cells.append(_num_cell(r.n_undefined, 0))
        rows.append(tag("tr", join(cells)))
    note = "One row per layer: mean SA over images and its interquartile range (IQR); click a header to sort."
    if show_undefined:
        undefined = (
            folder.layers.loc[folder.layers["sa_pred"].isna(), "reason"]
            if "reason" in folder.layers
            else pd.Series([], dtype=str)
        )
        reasons = sorted({str(x) for x in undefined if isinstance(x, str) and x})
        note += " 'undefined': images whose SA against the prediction is not defined"
        note += f" ({'; '.join(reasons)})." if reasons else "."
    blocks.append(_table(headers, rows, id_="table-layers", sorted_by=0, caption=note))
    return Section("sa-layers", "SA per layer", join(blocks))


def _scores_line(
    layers_by_key: dict[tuple[str, str], tuple[float, float]], image: str, layer: str, labels: bool
) -> str:
    sa, sa_pred = layers_by_key.get((image, layer), (math.nan, math.nan))
    if labels:
        return f"SA {_fmt(sa, 2)} · pred {_fmt(sa_pred, 2)}"
    return f"SA pred {_fmt(sa_pred, 2)}"


def _panel(
    png: bytes,
    name: str,
    line: str | None,
    *,
    number: int | None = None,
    code: bool = True,
    small: bool = False,
) -> Html:
    short = figures.shorten(name, 20 if number is not None else 22)
    label = tag(
        "span",
        tag("span", f"{number} ", class_="num-tag") if number is not None else None,
        tag("code", short) if code else short,
        class_="name",
        title=name,
    )
    cap = join([label, tag("span", line, class_="score")] if line else [label])
    return tag(
        "figure", _img(png, name), tag("figcaption", cap), class_="map small" if small else "map"
    )


def _view(
    maps: MapStore, k: int, slice_index: int | None, side: int = figures.THUMB_SIDE
) -> tuple[figures.SliceView, str]:
    image = maps.get(k, "image")
    if image is None:
        raise KeyError(k)
    label = maps.get(k, "label")
    pred = maps.get(k, "prediction")
    reference = (label > 0) if label is not None else (pred >= 0.5 if pred is not None else None)
    view = figures.SliceView(image, reference, slice_index, side)
    return view, (
        "label" if label is not None else "prediction ≥ 0.5" if pred is not None else "none"
    )


def _maps_section(
    folder: ResultFolder,
    maps: MapStore | None,
    chosen: list[tuple[int, str]],
    order: list[str],
    slice_index: int | None,
) -> Section:
    title = "Segmentation ability maps"
    if maps is None:
        return Section(
            "maps",
            title,
            _absent("this result folder has no maps.npz (the run kept no maps: keep_maps = 0)."),
            False,
        )
    if not chosen:
        return Section("maps", title, _absent("maps.npz holds no kept image."), False)
    scores = {(r.image, r.layer): (r.sa, r.sa_pred) for r in folder.layers.itertuples(index=False)}
    images = folder.images.set_index("image")
    rank = {n: i for i, n in enumerate(order)}
    blocks = [
        tag(
            "p",
            "For each image: the image, its label and the network's prediction, then each layer's feature "
            "segmentation (yellow: pixels the layer's prototypes give to the target) over the image, the "
            "reference outlined in blue; under each map, the layer's SA.",
            class_="caption",
        )
    ]
    for k, image_id in chosen:
        try:
            view, ref_name = _view(maps, k, slice_index)
        except KeyError:
            blocks.append(tag("h3", image_id))
            blocks.append(_absent(f"maps.npz has no image array for {image_id!r}."))
            continue
        panels = [_panel(figures.overlay_png(view, None, outline=False), "image", None, code=False)]
        label = maps.get(k, "label")
        if label is not None:
            panels.append(
                _panel(figures.overlay_png(view, label, outline=False), "label", None, code=False)
            )
        pred = maps.get(k, "prediction")
        if pred is not None:
            panels.append(
                _panel(figures.probability_png(view, pred), "prediction", "probability", code=False)
            )
        for layer in sorted(maps.layers(k), key=lambda n: (rank.get(n, len(rank)), n)):
            png = figures.overlay_png(view, maps.get(k, "layer", layer))
            panels.append(
                _panel(
                    png,
                    layer,
                    _scores_line(scores, image_id, layer, folder.has_labels),
                    number=rank.get(layer),
                )
            )
        facts = []
        if image_id in images.index:
            row = images.loc[image_id]
            row = row.iloc[0] if isinstance(row, pd.DataFrame) else row
            for col, name in (
                ("dice", "Dice"),
                ("mean_sa", "mean SA"),
                ("mean_sa_pred", "mean SA pred"),
                ("input_sa_pred", "input SA pred"),
            ):
                if col in row.index and _finite(row[col]):
                    facts.append(f"{name} {_fmt(row[col])}")
        facts.append(f"outline: {ref_name}")
        if view.is_3d:
            how = "set by slice_index" if slice_index is not None else "largest target area"
            facts.append(f"slice {view.index} of {view.depth} along the last axis ({how})")
        blocks.append(tag("h3", "Image ", tag("code", image_id)))
        blocks.append(tag("p", " · ".join(facts), class_="meta"))
        blocks.append(tag("div", join(panels), class_="map-grid"))
    more = len(maps.image_ids) - len(chosen)
    if more > 0:
        blocks.append(
            tag(
                "p",
                f"{more} more kept image(s) in maps.npz; choose others with images=[...] (CLI: --images ID).",
                class_="meta",
            )
        )
    return Section("maps", title, join(blocks))


def _units_section(
    folder: ResultFolder,
    maps: MapStore | None,
    chosen: list[tuple[int, str]],
    order: list[str],
    slice_index: int | None,
) -> Section:
    title = "Units"
    if folder.units is None:
        return Section(
            "units", title, _absent("this run did not analyse units (no units.parquet)."), False
        )
    score = "sa" if folder.units["sa"].notna().any() else "sa_pred"
    against = "the label" if score == "sa" else "the network's prediction"
    means = unit_means(folder.units, score)
    n = folder.units["image"].nunique()
    blocks = [
        _figure_block(
            figures.unit_distribution_figure(means, order, score),
            "unit SA per layer",
            f"Each dot is a unit (channel), its SA against {against} averaged over {n} images; "
            "the box spans the quartiles of the layer's units, the line is their median.",
        ),
        _figure_block(
            figures.unit_heatmap_figure(means, order, score),
            "unit SA heat map",
            "Each row is a layer, its units sorted by SA from the best (left); a bright row start "
            "means a few units segment well, a bright row means many do; grey: the layer has fewer units.",
            class_="chart wide",
        ),
    ]
    # best units' maps, for the first chosen image that has any
    shown = False
    if maps is not None:
        for k, image_id in chosen:
            per_layer = maps.units(k)
            if not per_layer:
                continue
            view, _ = (
                _view(maps, k, slice_index, UNIT_SIDE)
                if maps.get(k, "image") is not None
                else (None, "")
            )
            if view is None:
                continue
            lookup = means.set_index(["layer", "unit"])
            rows = []
            rank = {nm: i for i, nm in enumerate(order)}
            for layer in sorted(per_layer, key=lambda nm: (rank.get(nm, len(rank)), nm)):
                units = per_layer[layer]
                units = sorted(units, key=lambda u: -lookup[score].get((layer, u), -1.0))[
                    :BEST_UNITS_SHOWN
                ]
                panels = []
                for u in units:
                    s = lookup[score].get((layer, u), math.nan)
                    png = figures.overlay_png(view, maps.get(k, "unit", layer, u))
                    panels.append(
                        _panel(png, f"unit {u}", f"SA {_fmt(s, 2)}", code=False, small=True)
                    )
                rows.append(
                    tag(
                        "div",
                        tag(
                            "div",
                            tag("code", figures.shorten(layer, 34)),
                            class_="unit-layer",
                            title=layer,
                        ),
                        tag("div", join(panels), class_="map-grid"),
                        class_="unit-group",
                    )
                )
            blocks.append(tag("h3", "Best units' maps, image ", tag("code", image_id)))
            blocks.append(
                tag(
                    "p",
                    f"Per layer, the kept units with the highest mean SA against {against}: each unit's "
                    "own feature segmentation (yellow) over the image, the reference outlined in blue.",
                    class_="caption",
                )
            )
            blocks.append(tag("div", join(rows), class_="unit-grid"))
            shown = True
            break
    if not shown:
        why = "no maps.npz" if maps is None else "maps.npz holds no unit map for the shown images"
        blocks.append(tag("h3", "Best units' maps"))
        blocks.append(_absent(f"{why}."))
    top = means[means["rank"] <= TOP_UNITS_LISTED]
    depth = folder.layers.drop_duplicates("layer").set_index("layer")["depth"]
    top = top.assign(depth=top["layer"].map(depth)).sort_values(
        ["depth", "layer", "rank"], na_position="last"
    )
    rows = [
        tag(
            "tr",
            join(
                [
                    _num_cell(r.depth, 0),
                    tag("td", tag("code", r.layer), class_="layer"),
                    _num_cell(r.unit, 0),
                    _num_cell(r.rank, 0),
                    _num_cell(r.sa),
                    _num_cell(r.sa_pred),
                ]
            ),
        )
        for r in top.itertuples(index=False)
    ]
    blocks.append(tag("h3", "Best units"))
    blocks.append(
        _table(
            ["depth", "layer", "unit", "rank", "SA", "SA pred"],
            rows,
            id_="table-units",
            sorted_by=0,
            caption=f"The {TOP_UNITS_LISTED} best units of each layer (mean over images, ranked by SA "
            f"against {against}); click a header to sort.",
        )
    )
    return Section("units", title, join(blocks))


_QUALITY_LABELS = {
    "estimated_dice": "estimated Dice",
    "mean_sa_pred": "mean SA pred",
    "mean_sa": "mean SA",
    "input_sa_pred": "input SA pred",
    "flag": "flag",
    "input_sa": "input SA",
    "dice": "Dice",
    "flag_reason": "flag reason",
    "reason": "note",
}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r; NaN when either variable is constant."""
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the ranks, ties given their average rank."""
    return _pearson(pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy())


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
    qc_extra = (
        []
        if folder.qc is None
        else [
            c
            for c in folder.qc.rename(columns={"reason": "flag_reason"}).columns
            if c not in ("image", estimate, flag, "flag_reason") and c not in meta
        ]
    )
    numeric = [estimate] + [
        c for c in ("mean_sa_pred", "input_sa_pred", "mean_sa", "dice") if c != estimate
    ]
    numeric = [
        c
        for c in numeric
        if c in table.columns and (c not in ("mean_sa", "dice") or table[c].notna().any())
    ]
    texts = ([flag] if flag else []) + [
        c
        for c in ("flag_reason", "reason")
        if c in table.columns and table[c].fillna("").astype(str).str.len().gt(0).any()
    ]
    thumbs = maps is not None and any(maps.index(i) is not None for i in table["image"])
    headers = (
        (["view"] if thumbs else [])
        + ["image"]
        + meta
        + [_QUALITY_LABELS.get(c, c) for c in numeric]
        + [_QUALITY_LABELS.get(c, c) for c in texts + qc_extra]
    )
    digits = {}  # numeric metadata: whole numbers without decimals
    for c in meta:
        if pd.api.types.is_numeric_dtype(table[c]) and not pd.api.types.is_bool_dtype(table[c]):
            v = table[c].dropna().to_numpy(float)
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
                    figures.probability_png(view, pred)
                    if pred is not None
                    else figures.overlay_png(view, None)
                )
            cells.append(
                tag("td", _img(png, r["image"], class_="thumb") if png else "", class_="thumb-cell")
            )
        cells.append(tag("td", tag("code", r["image"]), class_="layer"))
        for c in meta:
            v = r[c]
            cells.append(_num_cell(v, digits[c]) if c in digits else _text_cell(v))
        cells += [_num_cell(r[c]) for c in numeric]
        for c in texts + qc_extra:
            v = r[c]
            if c == flag and isinstance(v, (bool, np.bool_)):
                cells.append(_text_cell("flagged" if v else "pass"))
            elif isinstance(v, (float, np.floating)) and c not in ("flag_reason", "reason"):
                cells.append(_num_cell(v))
            else:
                cells.append(_text_cell(v))
        rows.append(
            tag("tr", join(cells), class_="flagged" if flag and is_flagged(r[flag]) else None)
        )
    est_name = (
        f"{_QUALITY_LABELS.get(estimate, estimate)} from qc.csv"
        if folder.qc is not None
        else "mean SA against the prediction"
    )
    caption = (
        f"One row per image, worst estimated quality first ({est_name}; no label needed); "
        + (
            "flagged images are highlighted; "
            if flag
            else "no gate decision in this run (no qc.csv); "
        )
        + "click a header to sort."
    )
    if len(table) > MAX_QUALITY_ROWS:
        caption += f" The first {MAX_QUALITY_ROWS} of {len(table)} images are listed."
    blocks = []
    if "dice" in table.columns and np.isfinite(table["dice"].astype(float)).sum() >= 3:
        both = table[
            np.isfinite(table["dice"].astype(float))
            & np.isfinite(table["mean_sa_pred"].astype(float))
        ]
        x, y = both["mean_sa_pred"].to_numpy(float), both["dice"].to_numpy(float)
        rho, r_ = _spearman(x, y), _pearson(x, y)
        group = "group" if "group" in table.columns else None
        png = figures.quality_scatter_figure(
            both,
            "mean_sa_pred",
            "dice",
            group,
            "mean SA against the prediction (label-free)",
            "Dice of the prediction against the label",
        )
        colour = " coloured by group;" if group else ""
        blocks.append(
            _figure_block(
                png,
                "mean SA against Dice",
                f"Each dot is an image:{colour} the further up and right, the better; a rising cloud means "
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
            sorted_by=int(thumbs) + 1 + len(meta),
            nosort=[0] if thumbs else [],
            caption=caption,
        )
    )
    return Section("quality", title, join(blocks))


def _history_section(folder: ResultFolder, order: list[str]) -> Section:
    title = "SA over training"
    if folder.history is None:
        return Section(
            "history",
            title,
            _absent("no history.csv (SA was not recorded during training)."),
            False,
        )
    n = folder.history["layer"].nunique()
    png = figures.history_figure(folder.history, order)
    caption = (
        f"One line per layer ({n}), coloured from the first (dark) to the last (yellow) in forward order: "
        "the SA of each layer after each epoch, averaged over the images scored."
    )
    return Section("history", title, _figure_block(png, "SA over epochs", caption, class_="chart"))


def _setting_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _key_value_table(items: dict[str, Any], id_: str) -> Html:
    keys = [k for k in SETTINGS_FIRST if k in items] + [k for k in items if k not in SETTINGS_FIRST]
    rows = [
        tag("tr", join([tag("th", k, scope="row"), tag("td", _setting_text(items[k]))]))
        for k in keys
    ]
    return tag("table", tag("tbody", join(rows)), class_="kv", id=id_)


def _settings_section(folder: ResultFolder) -> Section:
    blocks = []
    if folder.settings:
        blocks.append(
            tag("p", "The settings the run was made with (settings.json).", class_="caption")
        )
        blocks.append(_key_value_table(folder.settings, "table-settings"))
    else:
        blocks.append(_absent("no settings.json in the result folder."))
    if folder.timing is not None:
        blocks.append(tag("h3", "Timing"))
        blocks.append(_key_value_table(folder.timing, "table-timing"))
    return Section("settings", "Settings", join(blocks), bool(folder.settings))


# ----------------------------------------------------------------------------- page


_CSS = """
:root{--fg:#1d2125;--muted:#5c6670;--line:#dde1e5;--bg:#f5f6f8;--card:#fff;--accent:#0072B2;--flag:#fdecea}
*{box-sizing:border-box}
html{scroll-behavior:smooth}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
code{font-family:ui-monospace,"SF Mono",Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.86em;overflow-wrap:anywhere}
.layout{display:grid;grid-template-columns:230px minmax(0,1fr);max-width:1480px;margin:0 auto}
nav.toc{position:sticky;top:0;align-self:start;max-height:100vh;overflow:auto;padding:28px 18px 28px 24px}
nav.toc .brand{font-weight:650;font-size:15px;margin:0 0 14px;color:var(--accent)}
nav.toc h2{font-size:11px;text-transform:uppercase;letter-spacing:.08em;color:var(--muted);margin:0 0 8px}
nav.toc ol{list-style:none;margin:0;padding:0;counter-reset:s}
nav.toc li{counter-increment:s;margin:2px 0}
nav.toc a{display:block;padding:5px 8px;border-radius:6px;color:var(--fg);text-decoration:none;font-size:14px}
nav.toc a::before{content:counter(s) ". ";color:var(--muted)}
nav.toc a:hover{background:#e8edf2}
nav.toc li.missing a{color:var(--muted)}
nav.toc li.missing a::after{content:" (no data)";font-size:12px}
main{padding:28px 36px 60px;min-width:0;border-left:1px solid var(--line);min-height:100vh}
header h1{font-size:26px;line-height:1.25;margin:0 0 10px;font-weight:680;overflow-wrap:anywhere}
ul.facts{list-style:none;padding:0;margin:0 0 8px;display:flex;flex-wrap:wrap;gap:8px}
ul.facts li{background:var(--card);border:1px solid var(--line);border-radius:999px;padding:2px 12px;font-size:13px}
ul.facts .k{color:var(--muted)}
ul.facts .v{font-weight:600;overflow-wrap:anywhere}
p.meta{color:var(--muted);font-size:13px;margin:4px 0 10px;overflow-wrap:anywhere}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:20px 24px;margin:22px 0;scroll-margin-top:12px}
section h2{font-size:19px;margin:0 0 12px;font-weight:650}
section h3{font-size:15px;margin:22px 0 4px;font-weight:620}
ul.findings{margin:0;padding-left:20px}
ul.findings li{margin:4px 0}
#findings{border-left:4px solid var(--accent)}
figure{margin:0}
figure.chart{margin:8px 0 18px}
figure.chart img{max-width:100%;height:auto;display:block}
figure.chart.wide img{width:100%}
figure.chart figcaption,p.caption{color:var(--muted);font-size:13.5px;margin:6px 0 10px;max-width:80ch}
.map-grid{display:flex;flex-wrap:wrap;gap:10px 8px;margin:6px 0 12px}
figure.map{width:132px}
figure.map img{width:128px;height:auto;display:block;image-rendering:pixelated;border-radius:4px;border:1px solid var(--line)}
figure.map figcaption{font-size:11.5px;line-height:1.35;margin-top:3px;color:var(--fg)}
figure.map .name{display:block;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
figure.map .score{display:block;color:var(--muted)}
figure.map .num-tag{color:var(--muted);font-variant-numeric:tabular-nums}
.unit-grid{display:flex;flex-wrap:wrap;gap:4px 30px;margin-top:6px}
.unit-group{border-top:1px solid var(--line);padding-top:6px}
figure.map.small{width:100px}
figure.map.small img{width:96px}
.unit-layer{font-size:13px;max-width:320px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.table-wrap{overflow:auto;max-height:640px;border:1px solid var(--line);border-radius:8px;margin:4px 0 14px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
table.sortable th{position:sticky;top:0;background:#eef1f4;text-align:left;font-weight:600;padding:7px 8px;border-bottom:1px solid var(--line);vertical-align:bottom;cursor:pointer;user-select:none}
table.sortable th.nosort{cursor:default}
table.sortable th:not(.nosort)::after{content:"\\00a0\\2195";color:#9aa4ad;font-weight:400}
table.sortable th[aria-sort=ascending]::after{content:"\\00a0\\25B2";color:var(--accent)}
table.sortable th[aria-sort=descending]::after{content:"\\00a0\\25BC";color:var(--accent)}
table.sortable th:focus-visible{outline:2px solid var(--accent);outline-offset:-2px}
td{padding:4px 8px;border-bottom:1px solid #eef0f2;vertical-align:middle}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td code{overflow-wrap:normal;word-break:normal}
td.layer{min-width:10ch;max-width:34ch;overflow-wrap:anywhere}
td.na{color:#a0a7ae}
table.sortable tbody tr:nth-child(even){background:#fafbfc}
tbody tr:hover{background:#eef5fb}
tr.flagged,tr.flagged:nth-child(even){background:var(--flag)}
td.thumb-cell{padding:3px 6px;width:80px}
img.thumb{width:64px;height:auto;display:block;image-rendering:pixelated;border-radius:3px}
table.kv{width:auto;max-width:100%}
table.kv th{text-align:left;color:var(--muted);font-weight:600;padding:5px 18px 5px 0;vertical-align:top;white-space:nowrap}
table.kv td{overflow-wrap:anywhere;padding:5px 0}
table.kv tr{border-bottom:1px solid #eef0f2}
p.absent{background:#f3f4f6;border:1px dashed #c9ced4;border-radius:8px;padding:10px 14px;color:var(--muted);margin:6px 0}
footer{color:var(--muted);font-size:12px;margin-top:30px}
@media (max-width:900px){.layout{display:block}nav.toc{position:static;max-height:none;border-bottom:1px solid var(--line)}main{padding:18px;border-left:0}}
@media print{nav.toc{display:none}.layout{display:block}section{break-inside:avoid-page}.table-wrap{max-height:none}}
"""

# Sorts a table by a clicked header: numbers by value (a cell's data-sort, else its text), text in
# natural order, empty cells last in both directions; rows keep their order on ties.
_JS = """
(function () {
  "use strict";
  function key(row, col) {
    var cell = row.cells[col];
    if (!cell) { return ""; }
    var v = cell.getAttribute("data-sort");
    return (v === null ? cell.textContent : v).trim();
  }
  function isNumber(s) { return s !== "" && isFinite(Number(s)); }
  function compare(a, b) {
    var an = isNumber(a), bn = isNumber(b);
    if (an && bn) { return Number(a) - Number(b); }
    if (an !== bn) { return an ? -1 : 1; }
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var rows = Array.prototype.map.call(body.rows, function (r, i) { return [key(r, col), i, r]; });
    rows.sort(function (x, y) {
      if ((x[0] === "") !== (y[0] === "")) { return x[0] === "" ? 1 : -1; }
      return dir * compare(x[0], y[0]) || x[1] - y[1];
    });
    rows.forEach(function (r) { body.appendChild(r[2]); });
  }
  document.querySelectorAll("table.sortable thead th:not(.nosort)").forEach(function (th) {
    th.tabIndex = 0;
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); }
    });
  });
})();
"""


def _csp_hash(text: str) -> str:
    return (
        "'sha256-"
        + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        + "'"
    )


def _page(title: str, header: Html, sections: list[Section]) -> str:
    csp = (
        f"default-src 'none'; img-src data:; style-src {_csp_hash(_CSS)}; "
        f"script-src {_csp_hash(_JS)}; base-uri 'none'; form-action 'none'"
    )
    toc = tag(
        "ol",
        join(
            tag("li", tag("a", s.title, href=f"#{s.id}"), class_=None if s.present else "missing")
            for s in sections
        ),
    )
    nav = tag(
        "nav",
        tag("p", "segability", class_="brand"),
        tag("h2", "Contents"),
        toc,
        class_="toc",
        aria_label="Contents",
    )
    body = join(tag("section", tag("h2", s.title), s.body, id=s.id) for s in sections)
    footer = tag(
        "footer",
        "Segmentation ability after He et al., Medical Image Analysis (2023). "
        "SA: Dice of a layer's prototype segmentation against a reference.",
    )
    head = join(
        [
            Html('<meta charset="utf-8">'),
            tag("meta", name="viewport", content="width=device-width, initial-scale=1"),
            tag("meta", name="generator", content=f"{GENERATOR} {__version__}"),
            tag("meta", http_equiv="Content-Security-Policy", content=csp),
            tag("title", title),
            Html(f"<style>{_CSS}</style>"),
        ]
    )
    page = join(
        [
            Html("<!DOCTYPE html>\n"),
            Html('<html lang="en">'),
            tag("head", head),
            tag(
                "body",
                tag("div", nav, tag("main", header, body, footer), class_="layout"),
                Html(f"<script>{_JS}</script>"),
            ),
            Html("</html>\n"),
        ]
    )
    return str(page)


def _made_by_report(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    return f'<meta name="generator" content="{GENERATOR}' in head


def _choose_images(
    maps: MapStore | None, images: Sequence[str] | None, max_images: int
) -> list[tuple[int, str]]:
    if images is None:
        return [] if maps is None else list(enumerate(maps.image_ids))[:max_images]
    if maps is None:
        raise ValueError(f"images={list(images)!r} was given but the result folder has no maps.npz")
    missing = [i for i in images if maps.index(i) is None]
    if missing:
        kept = maps.image_ids[:10]
        raise ValueError(
            f"images: no maps kept for {missing!r}; maps.npz holds {kept!r}"
            + (" ..." if len(maps.image_ids) > 10 else "")
        )
    return [(maps.index(i), i) for i in dict.fromkeys(images)]  # type: ignore[misc]


def build_report(
    result_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    images: Sequence[str] | None = None,
    max_images: int = 4,
    slice_index: int | None = None,
    title: str | None = None,
    findings: Sequence[str] | None = None,
) -> Path:
    """Write the HTML report of a result folder: one self-contained file.

    Views: what the run shows (findings), SA per layer, segmentation ability maps, units, the
    quality gate, SA over training, and the settings. A view whose data the folder lacks says so.

    Args:
        result_dir: folder written by ``SAResult.save`` (``layers.parquet``, ``images.parquet``,
            ``settings.json``; optional ``units.parquet``, ``maps.npz``, ``qc.csv``,
            ``history.csv``, ``timing.json``, ``findings.json``).
        out: where to write; default ``result_dir/report.html``. An existing file is replaced only
            when it is an earlier report (it carries the report's generator tag).
        images: ids of kept images (in ``maps.npz``) whose maps to show; default the first
            ``max_images``.
        max_images: how many kept images to show when ``images`` is None.
        slice_index: slice (along the last axis) shown for 3D images; default the slice with the
            largest target area.
        title: page title; default from the model name.
        findings: statements for "What this run shows"; default ``findings.json`` of the folder
            (a JSON list of strings).

    Returns:
        The path of the written report.

    Raises:
        FileNotFoundError: ``result_dir`` is not a result folder.
        FileExistsError: ``out`` exists and was not made by this report.
        ValueError: a bad argument (unknown image id, slice_index out of range, ...) or a malformed
            file in the folder.

    Example:
        >>> from segability.report import build_report
        >>> path = build_report("runs/demo", images=["case_003"])  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'report.html'
    """
    if isinstance(images, str):
        raise ValueError(f"images must be a list of image ids, got the string {images!r}")
    if images is not None and len(images) == 0:
        raise ValueError("images must name at least one image id (or be None)")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be an int >= 1, got {max_images!r}")
    if slice_index is not None and (
        isinstance(slice_index, bool) or not isinstance(slice_index, int) or slice_index < 0
    ):
        raise ValueError(f"slice_index must be an int >= 0 or None, got {slice_index!r}")
    folder = read_result_folder(result_dir)
    out_path = Path(out) if out is not None else folder.root / "report.html"
    if out_path.is_dir():
        raise ValueError(f"out must be a file path, {str(out_path)!r} is a directory")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"out: folder {str(out_path.parent)!r} does not exist")
    if out_path.exists() and not _made_by_report(out_path):
        raise FileExistsError(
            f"out: {str(out_path)!r} exists and is not a segability report; not overwriting it"
        )
    statements = (
        parse_findings(list(findings), "findings") if findings is not None else folder.findings
    )

    order = layer_order(folder.layers)
    summary = layer_summary(folder.layers)
    n_layers = sum(1 for n in order if n != "input")
    model = folder.settings.get("model")
    page_title = title or (
        f"segability report: {_setting_text(model)}"
        if model
        else f"segability report: {folder.root.name}"
    )
    maps = MapStore(folder.maps_path) if folder.maps_path is not None else None
    try:
        chosen = _choose_images(maps, images, max_images)
        sections = [
            s
            for s in (
                _findings_section(statements),
                _layers_section(folder, summary),
                _maps_section(folder, maps, chosen, order, slice_index),
                _units_section(folder, maps, chosen, order, slice_index),
                _quality_section(folder, maps, slice_index),
                _history_section(folder, order),
                _settings_section(folder),
            )
            if s is not None
        ]
    finally:
        if maps is not None:
            maps.close()
    page = _page(page_title, _header(folder, page_title, n_layers), sections)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
