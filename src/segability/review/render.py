"""A case's pictures: the image, the prediction, the label and layer maps as PNG overlays.

The pictures are the report's thumbnails (:class:`segability.report.figures.thumbnails.SliceView`,
:func:`~segability.report.figures.thumbnails.overlay_png`): the same slice, crop-free scaling and
colours. A 3D case (C, H, W, D) is shown in any of its three orientations: the chosen axis is moved
last, where :class:`SliceView` cuts.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import numpy as np

from segability.report.figures.thumbnails import SliceView, overlay_png, pick_slice

__all__ = ["Panel", "PANELS", "AXIS_NAMES", "VIEW_SIDE", "panels_of", "slice_defaults", "case_png"]

Panel = Literal["image", "prediction", "label", "layer"]
PANELS: tuple[str, ...] = get_args(Panel)
AXIS_NAMES = ("axis 0", "axis 1", "axis 2")  # the volume's own axes; their anatomy is the file's
VIEW_SIDE = 256  # pixels on the long side of a case picture


def _reference(entry: dict[str, Any]) -> np.ndarray | None:
    """The target outlined on every picture: the label, else the binarised prediction."""
    if entry.get("label") is not None:
        return np.asarray(entry["label"]) > 0
    if entry.get("prediction") is not None:
        return np.asarray(entry["prediction"]) >= 0.5
    return None


def panels_of(entry: dict[str, Any]) -> list[str]:
    """The pictures one kept entry can show (besides its layers)."""
    return [p for p in ("image", "prediction", "label") if entry.get(p) is not None]


def _spatial(entry: dict[str, Any]) -> tuple[int, ...]:
    return tuple(np.asarray(entry["image"]).shape[1:])


def slice_defaults(entry: dict[str, Any]) -> list[tuple[int, int]] | None:
    """For a 3D entry, per axis: (number of slices, the slice with the largest target area);
    None for 2D."""
    spatial = _spatial(entry)
    if len(spatial) != 3:
        return None
    ref = _reference(entry)
    out = []
    for axis, depth in enumerate(spatial):
        moved = None if ref is None else np.moveaxis(ref, axis, -1)
        out.append((depth, pick_slice(moved, depth)))
    return out


def case_png(
    entry: dict[str, Any],
    panel: str,
    *,
    layer: str | None = None,
    axis: int = 2,
    slice_index: int | None = None,
    side: int = VIEW_SIDE,
) -> bytes:
    """One picture of a kept case as PNG bytes.

    Args:
        entry: the case's kept maps (an entry of :func:`segability.analysis.results.decode_maps`).
        panel: ``image`` (alone), ``prediction`` (the binarised output filled in), ``label``, or
            ``layer`` (the feature segmentation map of ``layer``); the target (label, else
            prediction) is outlined on all but ``image``.
        layer: the layer, for ``panel="layer"``.
        axis: for 3D, the axis sliced across (0, 1 or 2).
        slice_index: for 3D, the slice (default: the largest target area).
        side: long side in pixels.

    Raises:
        KeyError: the entry has no such picture (no label, layer not kept).
        ValueError: ``axis`` or ``slice_index`` out of range.
    """
    if panel not in PANELS:
        raise KeyError(panel)
    if panel == "layer":
        if layer is None or layer not in entry.get("layers", {}):
            raise KeyError(layer)
        mask = np.asarray(entry["layers"][layer])
    elif entry.get(panel) is None:
        raise KeyError(panel)
    elif panel == "prediction":
        mask = np.asarray(entry["prediction"]) >= 0.5
    elif panel == "label":
        mask = np.asarray(entry["label"]) > 0
    else:
        mask = None
    image = np.asarray(entry["image"])
    ref = _reference(entry)
    if image.ndim == 4:
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
        image = np.moveaxis(image, 1 + axis, -1)
        ref = None if ref is None else np.moveaxis(ref, axis, -1)
        mask = None if mask is None else np.moveaxis(mask, axis, -1)
    else:
        slice_index = None
    view = SliceView(image, reference=ref, slice_index=slice_index, side=side)
    return overlay_png(view, mask, outline=panel != "image")
