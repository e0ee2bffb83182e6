"""The units view: unit SA per layer (box plot, heat map), the best units' maps and table."""

from __future__ import annotations

import math

from segability.report.figures import charts, thumbnails
from segability.report.folder import MapStore, ResultFolder
from segability.report.html import (
    _absent,
    _breakable,
    _figure_block,
    _fmt,
    _num_cell,
    _table,
    join,
    tag,
)
from segability.report.page import Section
from segability.report.sections.maps import _panel, _view
from segability.report.summaries import describe_images, unit_means

BEST_UNITS_SHOWN = 6
TOP_UNITS_LISTED = 5
UNIT_SIDE = 128  # pixels of a unit map thumbnail (long side)


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
            charts.unit_distribution_figure(means, order, score),
            "unit SA per layer",
            f"Each dot is a unit (channel), its SA against {against} averaged over {which}; "
            "the box spans the quartiles of the layer's units, the line is their median.",
        ),
        _figure_block(
            charts.unit_heatmap_figure(means, order, score),
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
                    png = thumbnails.overlay_png(view, maps.get(k, "unit", layer, u))
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
