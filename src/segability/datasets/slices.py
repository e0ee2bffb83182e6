"""2D MNI152 slices with simulated lesions (:func:`mni_lesions`).

Each image is a slice of the template (:mod:`segability.datasets.template`) along one axis, with a
small random similarity transform (rotation within +-10 degrees, scale 0.9 to 1.1, shift), 0 to 3
irregular lesions drawn inside the brain mask (grey + white matter probability above 0.5), random
intensity changes (gamma, gain, offset) and a little noise (:mod:`segability.datasets.lesions`). The
label is the lesion core exactly, to the pixel: lesions are drawn on the output grid, after the
geometric transform of the anatomy, which has the same distribution as transforming them with the
image (their shapes and orientations are random) without re-thresholding an interpolated mask.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
from scipy import ndimage

from segability.datasets.lesion_data import LesionData, _assemble, _cached
from segability.datasets.lesions import (
    _ROTATION_DEG,
    _SCALE,
    _SHIFT_FRACTION,
    _appearance,
    _draw_lesions,
    _lesion_plan,
    _streams,
)
from segability.datasets.splits import (
    AXES,
    SPLITS,
    Axis,
    Split,
    _check_choice,
    _check_int,
    split_slices,
)
from segability.datasets.template import _field_of_view, _oriented

__all__ = ["mni_lesions"]

# The letter of the slicing axis in image ids.
_AXIS_LETTER = {"axial": "z", "coronal": "y", "sagittal": "x"}


def mni_lesions(
    n: int,
    split: Split = "train",
    size: int = 128,
    seed: int = 0,
    *,
    axis: Axis = "axial",
    cache_dir: str | os.PathLike[str] | None | Literal[False] = None,
) -> LesionData:
    """``n`` 2D MNI152 slices with simulated lesions and exact labels.

    Image ``i`` uses template slice ``split_slices(split, axis)[perm[i % m]]`` (a seeded
    permutation of the split's ``m`` slices) and its own random streams, so the first ``k``
    images of a set are the set made with ``n=k``. About 15% of the images have no lesion; the
    others have 1 to 3 (radius 2.5 to 20 pixels at size 128, scaled with ``size``), all brighter or
    all darker than the tissue (``meta.polarity`` +1 / -1, 0 when empty).

    Args:
        n: number of images (>= 1).
        split: ``"train"``, ``"val"`` or ``"test"``; the splits share no template slice.
        size: output side in pixels (16..512); the in-plane window covers the brain.
        seed: the same seed gives identical arrays.
        axis: slicing direction, ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        cache_dir: folder of the on-disk cache (default ``$SEGABILITY_CACHE`` or
            ``~/.cache/segability``); ``False`` generates without reading or writing a cache.

    Returns:
        A :class:`LesionData` with images (n, 1, size, size); ids like ``"train-z087-0003"``
        (split, slice letter and index, image number); meta columns ``id``, ``split``, ``axis``,
        ``slice``, ``n_lesions`` (connected lesion cores), ``lesion_pixels``, ``polarity``,
        ``contrast``, ``radius``, ``halo`` and the augmentation parameters.

    Raises:
        ValueError: on an unknown split or axis, or ``n`` / ``size`` / ``seed`` out of range.

    Example:
        >>> data = mni_lesions(8, split="val", size=64, cache_dir=False)
        >>> data.images.shape, data.labels.dtype.name, data.ids[0][:5]
        ((8, 1, 64, 64), 'uint8', 'val-z')
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 16, 512)
    seed = _check_int("seed", seed, 0)
    _check_choice("split", split, SPLITS)
    _check_choice("axis", axis, AXES)

    def make() -> LesionData:
        pool = split_slices(split, axis)
        order = np.random.default_rng([seed, SPLITS.index(split), AXES.index(axis)]).permutation(pool)
        samples, ids, rows = [], [], []
        for i in range(n):
            source = int(order[i % order.size])
            samples.append(_sample_2d(split, axis, size, seed, i, source))
            ids.append(f"{split}-{_AXIS_LETTER[axis]}{source:03d}-{i:04d}")
            rows.append({"id": ids[-1], "split": split, "axis": axis, "slice": source})
        return _assemble(samples, ids, rows)

    return _cached("mni_lesions", cache_dir, make, n=n, split=split, size=size, seed=seed, axis=axis)


def _sample_2d(
    split: str, axis: str, size: int, seed: int, index: int, source: int, *, lesions: bool = True
) -> dict[str, Any]:
    """One slice image; ``lesions=False`` gives the same image without lesions (for tests)."""
    geometry, drawing, appearance, noise = _streams(2, seed, split, axis, index)
    t1_stack, brain_stack = _oriented(axis)
    centre, side = _field_of_view(axis)
    spacing = side / size

    angle = np.deg2rad(geometry.uniform(-_ROTATION_DEG, _ROTATION_DEG))
    scale = geometry.uniform(*_SCALE)
    shift = geometry.uniform(-_SHIFT_FRACTION, _SHIFT_FRACTION, 2) * side
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    grid = (np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")) - (size - 1) / 2) * spacing
    coords = np.tensordot(rotation / scale, grid, axes=1) + (centre + shift)[:, None, None]

    t1 = t1_stack[source]
    step = spacing / scale  # source mm per output pixel: blur before sampling below 1 px/mm
    if step > 1.0:
        t1 = ndimage.gaussian_filter(t1, 0.5 * (step - 1.0))
    base = ndimage.map_coordinates(t1, coords, order=1, mode="constant", cval=0.0)
    brain = ndimage.map_coordinates(brain_stack[source], coords, order=1, mode="constant", cval=0.0) > 0.5

    count, polarity = _lesion_plan(drawing)
    radius_range = (max(1.5, 2.5 * size / 128), max(3.0, 20.0 * size / 128))
    delta, core, summary = _draw_lesions(drawing, brain, polarity, count if lesions else 0, radius_range)
    image, params = _appearance(base.astype(np.float32), delta, appearance, noise)
    meta = {
        "rotation_deg": float(np.rad2deg(angle)),
        "scale": float(scale),
        "polarity": polarity if lesions else 0,
        **summary,
        **params,
    }
    return {"image": image, "label": core, "brain": brain, "meta": meta}
