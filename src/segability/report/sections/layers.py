"""The SA-per-layer view: charts over all images and the subsets findings quote, and the layer table."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from segability.estimation.selection import layer_roles
from segability.report.figures import charts, labels
from segability.report.folder import Finding, ResultFolder
from segability.report.html import (
    _breakable,
    _figure_block,
    _finite,
    _fmt,
    _num_cell,
    _table,
    _text_cell,
    join,
    tag,
)
from segability.report.page import Section
from segability.report.sections.findings import _finding_subsets, _selector_text
from segability.report.summaries import describe_images, layer_summary

SCORE_HEADERS = {"sa": "SA", "sa_pred": "SA pred"}


def _groups_note(folder: ResultFolder) -> str:
    if "group" not in folder.images.columns:
        return ""
    k = folder.images["group"].nunique()
    return f" ({k} groups)" if k > 1 else ""


def _roles_caption(roles: dict[str, str | None], names: Sequence[str]) -> str:
    present = [r for r in ("encoder", "bottleneck", "decoder") if r in roles.values()]
    if charts.shaded_roles(roles, names):
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
    shaded = charts.shaded_roles(roles, names)
    scores = (["sa"] if folder.has_labels else []) + ["sa_pred"]
    which = (
        "blue: against the label, orange: against the network's own prediction (label-free)"
        if folder.has_labels
        else "against the network's own prediction (no labels in this run)"
    )
    numbered = labels.labels_numbered([n for n in names])
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
        png = charts.sa_per_layer_figure(
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
    png = charts.sa_per_layer_figure(
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
