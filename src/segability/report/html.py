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
import re
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
    INTERNAL_QC_COLUMNS,
    Finding,
    MapStore,
    ResultFolder,
    describe_images,
    is_flagged,
    layer_order,
    layer_roles,
    layer_summary,
    parse_findings,
    quality_table,
    read_result_folder,
    select_images,
    unit_means,
)

__all__ = ["build_report", "Html", "esc", "tag"]

GENERATOR = "segability report"
MAX_QUALITY_ROWS = 1000
BEST_UNITS_SHOWN = 6
TOP_UNITS_LISTED = 5
UNIT_SIDE = 128  # pixels of a unit map thumbnail (long side)
THUMB_TABLE_SIDE = 64  # pixels of a thumbnail in the quality table
MAX_SUBSET_CHARTS = 3  # SA-per-layer charts of image subsets the findings quote
SCORE_HEADERS = {"sa": "SA", "sa_pred": "SA pred"}
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


def _img(
    png: bytes,
    alt: str,
    class_: str | None = None,
    title: str | None = None,
    size: tuple[int, int] | None = None,
) -> Html:
    """An embedded PNG; ``size`` (rows, columns) is its pixel size, shown 1:1."""
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    h, w = size if size is not None else (None, None)
    return tag("img", src=src, alt=alt, class_=class_, title=title, width=w, height=h)


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
    if folder.errors is not None:
        facts.insert(1, ("failed", str(len(folder.errors))))
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


def _selector_text(selector: dict[str, tuple[str, ...]]) -> str:
    if not selector:
        return "every image"
    return "; ".join(f"{col} {', '.join(values)}" for col, values in selector.items())


def _finding_subsets(
    folder: ResultFolder, findings: Sequence[Finding]
) -> list[tuple[dict[str, tuple[str, ...]], list[str]]]:
    """The distinct image subsets the findings quote that are neither empty nor every image."""
    out: list[tuple[dict[str, tuple[str, ...]], list[str]]] = []
    total = folder.images["image"].nunique()
    for f in findings:
        if f.images is None or any(sel == f.images for sel, _ in out):
            continue
        if any(c not in folder.images.columns for c in f.images):
            continue
        ids = folder.images.loc[select_images(folder.images, f.images), "image"].unique().tolist()
        if 0 < len(ids) < total:
            out.append((f.images, [str(i) for i in ids]))
    return out[:MAX_SUBSET_CHARTS]


def _groups_note(folder: ResultFolder) -> str:
    if "group" not in folder.images.columns:
        return ""
    k = folder.images["group"].nunique()
    return f" ({k} groups)" if k > 1 else ""


def _findings_section(findings: Sequence[Finding], folder: ResultFolder) -> Section | None:
    if not findings:
        return None
    items = []
    for f in findings:
        note = None
        if f.images is not None:
            missing = [c for c in f.images if c not in folder.images.columns]
            if missing:
                note = (
                    f"about the images with {_selector_text(f.images)}; images.parquet has no "
                    f"column {', '.join(missing)}, so the report cannot check them"
                )
            else:
                ids = folder.images.loc[select_images(folder.images, f.images), "image"]
                note = f"over {describe_images(ids, folder.images)}"
        items.append(tag("li", f.text, tag("span", f" — {note}", class_="scope") if note else None))
    body = [tag("ul", join(items), class_="findings")]
    if any(f.images is None for f in findings) and any(f.images is not None for f in findings):
        body.append(
            tag(
                "p",
                "Statements without a note after a dash do not say which images they are about.",
                class_="caption",
            )
        )
    return Section("findings", "What this run shows", join(body))


def _roles_caption(roles: dict[str, str | None], names: Sequence[str]) -> str:
    present = [r for r in ("encoder", "bottleneck", "decoder") if r in roles.values()]
    if figures.shaded_roles(roles, names):
        return (
            f"shading marks {', '.join(present[:-1])} and {present[-1]} layers, told apart by their "
            "names or the MONAI UNet structure."
        )
    return "the layer names do not tell encoder from decoder, so nothing is shaded."


def _layers_section(
    folder: ResultFolder, summary: pd.DataFrame, findings: Sequence[Finding]
) -> Section:
    roles = layer_roles(summary["layer"])
    names = summary["layer"].tolist()
    shaded = figures.shaded_roles(roles, names)
    scores = (["sa"] if folder.has_labels else []) + ["sa_pred"]
    which = (
        "blue: against the label, orange: against the network's own prediction (label-free)"
        if folder.has_labels
        else "against the network's own prediction (no labels in this run)"
    )
    numbered = figures.labels_numbered([n for n in names])
    key = (
        " Tick labels carry the layer's depth (first column of the table below) where shortened "
        "names would not tell layers apart."
        if numbered
        else ""
    )
    everyone = folder.layers["image"].unique().tolist()
    all_text = describe_images(everyone, folder.images)
    subsets = _finding_subsets(folder, findings)
    blocks = []
    sub_summaries = []
    for selector, ids in subsets:
        sub = layer_summary(folder.layers[folder.layers["image"].isin(ids)])
        sub_summaries.append((selector, sub.set_index("layer")))
        png = figures.sa_per_layer_figure(
            sub, roles, scores, title=f"Mean over {len(ids)} images: {_selector_text(selector)}"
        )
        blocks.append(
            _figure_block(
                png,
                f"SA per layer, {_selector_text(selector)}",
                f"The images the findings above quote ({_selector_text(selector)}): each point is "
                f"the mean SA over these {len(ids)} images ({which}), the band the interquartile "
                f"range, the hollow square the input image itself; {_roles_caption(roles, names)}"
                + key,
            )
        )
    png = figures.sa_per_layer_figure(
        summary,
        roles,
        scores,
        title=f"Mean over all {len(everyone)} images{_groups_note(folder)}",
    )
    caption = (
        f"Read left to right in forward order: each point is the mean SA over {all_text} "
        f"({which}), the band the interquartile range, the hollow square the input image itself; "
        f"{_roles_caption(roles, names)}" + key
    )
    blocks.append(_figure_block(png, "SA per layer, all images", caption))

    show_n = summary["n_images"].nunique() > 1
    show_undefined = bool(summary["n_undefined"].gt(0).any())
    headers = ["depth", "layer"] + (["part"] if shaded else []) + ["channels", "shape"]
    if folder.has_labels:
        headers += ["SA", "SA IQR"]
    headers += ["SA pred", "SA pred IQR"]
    for selector, _ in sub_summaries:
        headers += [f"{SCORE_HEADERS[s]} ({_selector_text(selector)})" for s in scores]
    headers += (["images"] if show_n else []) + (["undefined"] if show_undefined else [])
    rows = []
    for r in summary.itertuples(index=False):
        cells = [_num_cell(r.depth, 0), tag("td", tag("code", _breakable(r.layer)), class_="layer")]
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
        for _, sub in sub_summaries:
            for score in scores:
                v = sub[f"{score}_mean"].get(r.layer, math.nan)
                cells.append(_num_cell(v))
        if show_n:
            cells.append(_num_cell(r.n_images, 0))
        if show_undefined:
            cells.append(_num_cell(r.n_undefined, 0))
        rows.append(tag("tr", join(cells)))
    note = (
        f"One row per layer: mean SA over {all_text} and its interquartile range (IQR)"
        + ("; then the mean over the images the findings quote" if sub_summaries else "")
        + "; click a header to sort."
    )
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


def _breakable(name: str) -> Html:
    """A name that may wrap after its dots and underscores, never cut."""
    parts = re.split(r"(?<=[._])", name)
    return join([esc(p) for p in parts], sep=Html("<wbr>"))


def _panel(
    png: bytes,
    size: tuple[int, int],
    name: str,
    line: str | None,
    *,
    number: int | None = None,
    code: bool = True,
    small: bool = False,
) -> Html:
    label = tag(
        "span",
        tag("span", f"{number} ", class_="num-tag") if number is not None else None,
        tag("code", _breakable(name)) if code else name,
        class_="name",
        title=name,
    )
    cap = join([label, tag("span", line, class_="score")] if line else [label])
    img = _img(png, name, size=size)
    return tag("figure", img, tag("figcaption", cap), class_="map small" if small else "map")


def _view(
    maps: MapStore,
    k: int,
    slice_index: int | None,
    side: int = figures.THUMB_SIDE,
    crop: bool = False,
) -> tuple[figures.SliceView, str]:
    image = maps.get(k, "image")
    if image is None:
        raise KeyError(k)
    label = maps.get(k, "label")
    pred = maps.get(k, "prediction")
    reference = (label > 0) if label is not None else (pred >= 0.5 if pred is not None else None)
    focus = reference
    if label is not None and pred is not None and label.shape == pred.shape:
        focus = (label > 0) | (pred >= 0.5)
    view = figures.SliceView(image, reference, slice_index, side, focus=focus, crop=crop)
    return view, (
        "label" if label is not None else "prediction ≥ 0.5" if pred is not None else "none"
    )


def _is_empty_case(maps: MapStore, k: int) -> bool:
    """Whether a kept image has nothing to segment: an empty label and an empty prediction."""
    label = maps.get(k, "label")
    pred = maps.get(k, "prediction")
    label_empty = label is None or not np.any(label > 0)
    pred_empty = pred is None or not np.any(pred >= 0.5)
    return label_empty and pred_empty and (label is not None or pred is not None)


def _maps_section(
    folder: ResultFolder,
    maps: MapStore | None,
    chosen: list[tuple[int, str]],
    skipped: int,
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
        why = (
            f"each of the {skipped} kept image(s) in maps.npz has an empty label and an empty "
            "prediction: nothing to see (choose one with images=[...], CLI: --images ID)."
            if skipped
            else "maps.npz holds no kept image."
        )
        return Section("maps", title, _absent(why), False)
    scores = {(r.image, r.layer): (r.sa, r.sa_pred) for r in folder.layers.itertuples(index=False)}
    images = folder.images.set_index("image")
    rank = {n: i for i, n in enumerate(order)}
    blocks = [
        tag(
            "p",
            "For each image: the image, its label and the network's prediction, then each layer's feature "
            "segmentation (yellow: pixels the layer's prototypes give to the target) over the image, the "
            "reference outlined in blue; under each map, the layer's depth, name and SA. A small target is "
            "shown zoomed to its box (said above the maps).",
            class_="caption",
        )
    ]
    for k, image_id in chosen:
        try:
            view, ref_name = _view(maps, k, slice_index, crop=True)
        except KeyError:
            blocks.append(tag("h3", image_id))
            blocks.append(_absent(f"maps.npz has no image array for {image_id!r}."))
            continue
        size = view.shape
        panels = [
            _panel(figures.overlay_png(view, None, outline=False), size, "image", None, code=False)
        ]
        label = maps.get(k, "label")
        if label is not None:
            panels.append(
                _panel(
                    figures.overlay_png(view, label, outline=False), size, "label", None, code=False
                )
            )
        pred = maps.get(k, "prediction")
        if pred is not None:
            panels.append(
                _panel(
                    figures.probability_png(view, pred),
                    size,
                    "prediction",
                    "probability",
                    code=False,
                )
            )
        for layer in sorted(maps.layers(k), key=lambda n: (rank.get(n, len(rank)), n)):
            png = figures.overlay_png(view, maps.get(k, "layer", layer))
            panels.append(
                _panel(
                    png,
                    size,
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
                ("mean_sa", "mean SA (vs label)"),
                ("mean_sa_pred", "mean SA (vs prediction)"),
                ("input_sa_pred", "input SA (vs prediction)"),
            ):
                if col in row.index and _finite(row[col]):
                    facts.append(f"{name} {_fmt(row[col])}")
            if "group" in row.index and isinstance(row["group"], str):
                facts.insert(0, f"group {row['group']}")
        facts.append(f"outline: {ref_name}")
        if view.is_3d:
            how = "set by slice_index" if slice_index is not None else "largest target area"
            facts.append(f"slice {view.index} of {view.depth} along the last axis ({how})")
        crop = view.crop_note()
        if crop:
            facts.append(crop)
        blocks.append(tag("h3", "Image ", tag("code", image_id)))
        blocks.append(tag("p", " · ".join(facts), class_="meta"))
        blocks.append(tag("div", join(panels), class_="map-grid"))
    notes = []
    if skipped:
        notes.append(
            f"{skipped} kept image(s) with an empty label and an empty prediction are not shown."
        )
    more = len(maps.image_ids) - len(chosen) - skipped
    if more > 0:
        notes.append(f"{more} more kept image(s) in maps.npz.")
    if notes:
        notes.append("Choose others with images=[...] (CLI: --images ID).")
        blocks.append(tag("p", " ".join(notes), class_="meta"))
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
    which = describe_images(folder.units["image"].unique(), folder.images)
    blocks = [
        _figure_block(
            figures.unit_distribution_figure(means, order, score),
            "unit SA per layer",
            f"Each dot is a unit (channel), its SA against {against} averaged over {which}; "
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
                _view(maps, k, slice_index, UNIT_SIDE, crop=True)
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
                        _panel(
                            png,
                            view.shape,
                            f"unit {u}",
                            f"SA {_fmt(s, 2)}",
                            code=False,
                            small=True,
                        )
                    )
                rows.append(
                    tag(
                        "div",
                        tag(
                            "div",
                            tag("span", f"{rank[layer]} ", class_="num-tag")
                            if layer in rank
                            else None,
                            tag("code", _breakable(layer)),
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
                    f"Per layer (depth and name), the kept units with the highest mean SA against "
                    f"{against}: each unit's own feature segmentation (yellow) over the image, the "
                    "reference outlined in blue"
                    + (f"; {view.crop_note()}." if view.crop_note() else "."),
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
                    tag("td", tag("code", _breakable(r.layer)), class_="layer"),
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
                    figures.probability_png(view, pred)
                    if pred is not None
                    else figures.overlay_png(view, None)
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
        png = figures.quality_scatter_figure(
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


def _failed_section(folder: ResultFolder) -> Section:
    title = "Failed files"
    errors = folder.errors
    if errors is None:
        return Section(
            "failed",
            title,
            _absent(
                "no errors.csv in the result folder (runs over files record failures there).",
                "No failure recorded:",
            ),
            False,
        )
    if errors.empty:
        return Section(
            "failed", title, tag("p", "No file failed (errors.csv is empty).", class_="caption")
        )
    columns = ["file", "error"] + [c for c in errors.columns if c not in ("file", "error")]
    rows = [
        tag(
            "tr",
            join(
                [tag("td", tag("code", r["file"]), class_="layer")]
                + [tag("td", r[c], class_="error") for c in columns[1:]]
            ),
        )
        for r in errors.head(MAX_QUALITY_ROWS).to_dict("records")
    ]
    caption = f"{len(errors)} file(s) could not be analysed (errors.csv); they are in no table or chart of this report."
    if len(errors) > MAX_QUALITY_ROWS:
        caption += f" The first {MAX_QUALITY_ROWS} are listed."
    return Section("failed", title, _table(columns, rows, id_="table-failed", caption=caption))


def _nothing_analysed_section(folder: ResultFolder) -> Section:
    n = len(folder.errors) if folder.errors is not None else 0
    text = (
        f"Every image of this run failed: {n} file(s) listed under Failed files, none analysed, "
        "so there are no SA scores, maps or quality estimates to show."
        if n
        else "This result folder holds no analysed image (its tables are empty) and no recorded failure."
    )
    return Section(
        "no-result", "No image was analysed", tag("p", tag("strong", text), class_="absent")
    )


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
ul.findings .scope{color:var(--muted);font-size:13px}
#findings{border-left:4px solid var(--accent)}
figure{margin:0}
figure.chart{margin:8px 0 18px}
figure.chart img{max-width:100%;height:auto;display:block}
figure.chart.wide img{width:100%}
figure.chart figcaption,p.caption{color:var(--muted);font-size:13.5px;margin:6px 0 10px;max-width:80ch}
.map-grid{display:flex;flex-wrap:wrap;gap:10px 8px;margin:6px 0 12px}
figure.map{width:min-content}
figure.map img{display:block;max-width:none;image-rendering:pixelated;border-radius:4px;border:1px solid var(--line)}
figure.map figcaption{font-size:11.5px;line-height:1.35;margin-top:3px;color:var(--fg)}
figure.map .name{display:block;overflow-wrap:break-word}
figure.map .score{display:block;color:var(--muted)}
figure.map .num-tag{color:var(--muted);font-variant-numeric:tabular-nums}
.unit-grid{display:flex;flex-wrap:wrap;gap:4px 30px;margin-top:6px}
.unit-group{border-top:1px solid var(--line);padding-top:6px}
.unit-layer{font-size:13px;max-width:420px;overflow-wrap:break-word}
.num-tag{color:var(--muted);font-variant-numeric:tabular-nums}
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
td code{overflow-wrap:break-word}
td.layer{min-width:26ch;max-width:48ch}
td.na{color:#a0a7ae}
table.sortable tbody tr:nth-child(even){background:#fafbfc}
tbody tr:hover{background:#eef5fb}
tr.flagged,tr.flagged:nth-child(even){background:var(--flag)}
td.thumb-cell{padding:3px 6px;width:80px}
img.thumb{display:block;image-rendering:pixelated;border-radius:3px}
td.error{overflow-wrap:anywhere;min-width:30ch}
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
) -> tuple[list[tuple[int, str]], int]:
    """The kept images whose maps to show, and how many were passed over as empty cases.

    Without ``images``, the first ``max_images`` kept images that have something to see: an image
    with an empty label and an empty prediction is passed over.
    """
    if images is None:
        if maps is None:
            return [], 0
        chosen, skipped = [], 0
        for k, image_id in enumerate(maps.image_ids):
            if len(chosen) == max_images:
                break
            if _is_empty_case(maps, k):
                skipped += 1
            else:
                chosen.append((k, image_id))
        return chosen, skipped
    if maps is None:
        raise ValueError(f"images={list(images)!r} was given but the result folder has no maps.npz")
    missing = [i for i in images if maps.index(i) is None]
    if missing:
        kept = maps.image_ids[:10]
        raise ValueError(
            f"images: no maps kept for {missing!r}; maps.npz holds {kept!r}"
            + (" ..." if len(maps.image_ids) > 10 else "")
        )
    return [(maps.index(i), i) for i in dict.fromkeys(images)], 0  # type: ignore[misc]


def build_report(
    result_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    images: Sequence[str] | None = None,
    max_images: int = 4,
    slice_index: int | None = None,
    title: str | None = None,
    findings: Sequence[str | dict[str, Any] | Finding] | None = None,
) -> Path:
    """Write the HTML report of a result folder: one self-contained file.

    Views: what the run shows (findings), SA per layer, segmentation ability maps, units, the
    quality gate, failed files, SA over training, and the settings. A view whose data the folder
    lacks says so. Every chart says which images it averages; when findings name the images they
    quote (see :func:`segability.report.data.parse_findings`), SA per layer is also drawn for
    those images. A run in which every image failed gives a report that says so and lists the
    failures.

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
        findings: statements for "What this run shows": strings or ``{"text": ..., "images":
            {column: [values]}}``; default ``findings.json`` of the folder.

    Returns:
        The path of the written report.

    Raises:
        FileNotFoundError: ``result_dir`` is not a result folder.
        IncompleteRunError: (a ValueError) the run has not merged its tables yet (``shards/``
            without ``images.parquet``, or a table missing): resume the run first.
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
    if not folder.analysed:
        title_text = title or f"segability report: {folder.root.name}"
        if images is not None:
            raise ValueError(f"images={list(images)!r}: no image of this run was analysed")
        sections = [
            s
            for s in (
                _nothing_analysed_section(folder),
                _findings_section(statements, folder),
                _failed_section(folder),
                _settings_section(folder),
            )
            if s is not None
        ]
        _write(out_path, _page(title_text, _header(folder, title_text, 0), sections))
        return out_path

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
        chosen, skipped = _choose_images(maps, images, max_images)
        sections = [
            s
            for s in (
                _findings_section(statements, folder),
                _layers_section(folder, summary, statements),
                _maps_section(folder, maps, chosen, skipped, order, slice_index),
                _units_section(folder, maps, chosen, order, slice_index),
                _quality_section(folder, maps, slice_index),
                _failed_section(folder),
                _history_section(folder, order),
                _settings_section(folder),
            )
            if s is not None
        ]
    finally:
        if maps is not None:
            maps.close()
    _write(out_path, _page(page_title, _header(folder, page_title, n_layers), sections))
    return out_path


def _write(out_path: Path, page: str) -> None:
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
