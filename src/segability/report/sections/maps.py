"""The segmentation ability maps of kept images, which kept images to show, and the map panels."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from segability.report.figures import thumbnails
from segability.report.folder import MapStore, ResultFolder
from segability.report.html import Html, _absent, _breakable, _finite, _fmt, _img, join, tag
from segability.report.page import Section


def _scores_line(
    layers_by_key: dict[tuple[str, str], tuple[float, float]], image: str, layer: str, labels: bool
) -> str:
    sa, sa_pred = layers_by_key.get((image, layer), (math.nan, math.nan))
    if labels:
        return f"SA {_fmt(sa, 2)} · pred {_fmt(sa_pred, 2)}"
    return f"SA pred {_fmt(sa_pred, 2)}"


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
    side: int = thumbnails.THUMB_SIDE,
    crop: bool = False,
) -> tuple[thumbnails.SliceView, str]:
    image = maps.get(k, "image")
    if image is None:
        raise KeyError(k)
    label = maps.get(k, "label")
    pred = maps.get(k, "prediction")
    reference = (label > 0) if label is not None else (pred >= 0.5 if pred is not None else None)
    focus = reference
    if label is not None and pred is not None and label.shape == pred.shape:
        focus = (label > 0) | (pred >= 0.5)
    view = thumbnails.SliceView(image, reference, slice_index, side, focus=focus, crop=crop)
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
            _panel(thumbnails.overlay_png(view, None, outline=False), size, "image", None, code=False)
        ]
        label = maps.get(k, "label")
        if label is not None:
            panels.append(
                _panel(
                    thumbnails.overlay_png(view, label, outline=False), size, "label", None, code=False
                )
            )
        pred = maps.get(k, "prediction")
        if pred is not None:
            panels.append(
                _panel(
                    thumbnails.probability_png(view, pred),
                    size,
                    "prediction",
                    "probability",
                    code=False,
                )
            )
        for layer in sorted(maps.layers(k), key=lambda n: (rank.get(n, len(rank)), n)):
            png = thumbnails.overlay_png(view, maps.get(k, "layer", layer))
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
