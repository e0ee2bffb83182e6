"""A second embedded task: cerebrospinal fluid (CSF) on MNI152 slices (:func:`mni_csf`).

The target is the CSF inside the skull as the tissue maps nilearn ships define it: the brain
(grey + white matter probability above 0.5), closed and with its holes filled, minus the brain
itself -- the ventricles and the sulcal and cisternal CSF between the brain's folds. It is dark on
the T1 template, so unlike the bright or dark lesions of :func:`~segability.datasets.mni_lesions`
the network must learn an anatomical, not a contrast-only, target. Nothing is downloaded: the
template and tissue maps come from the installed nilearn (:func:`~segability.datasets.mni_template`).

Each image is an axial template slice of the split (:func:`~segability.datasets.split_slices`)
with a random similarity transform (rotation within +-10 degrees, scale 0.9 to 1.1, shift up to 5%
of the field of view), a random gain (0.9 to 1.1) and faint noise (sd up to 0.01); the label is
transformed with the image (nearest neighbour on the 1 mm label, so it stays exact to the voxel).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from segability.datasets.cache import cache_path
from segability.datasets.lesion_data import LesionData
from segability.datasets.splits import SPLITS, split_slices
from segability.datasets.template import mni_template

__all__ = ["mni_csf", "csf_template"]

_CLOSE_MM = 3  # closing radius that bridges the sulci before the holes are filled
_MARGIN_MM = 8.0
_ROTATION_DEG = 10.0
_SCALE = (0.9, 1.1)
_SHIFT = 0.05
_GAIN = (0.9, 1.1)
_NOISE = 0.01


@functools.lru_cache(maxsize=1)
def csf_template() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Axial template stacks (slice, row, col) of the T1, the brain mask and the CSF label.

    Slices are ordered as :func:`~segability.datasets.split_slices` counts them (index 0 is the
    lowest axial voxel); rows run anterior to posterior, columns left to right.

    Returns:
        ``(t1, brain, csf)``: float32 T1 (white matter about 0.7), uint8 brain and CSF masks.

    Example:
        >>> t1, brain, csf = csf_template()
        >>> t1.shape == csf.shape and not bool((brain & csf).any())
        True
    """
    t1, prob = mni_template()
    order = (2, 1, 0)  # axial display orientation, as the lesion slices use
    t1 = np.ascontiguousarray(np.transpose(t1, order)[:, ::-1, :])
    brain = np.ascontiguousarray(np.transpose(prob, order)[:, ::-1, :]) > 0.5
    ball = ndimage.generate_binary_structure(2, 1)
    csf = np.zeros_like(brain)
    for z in range(brain.shape[0]):
        if not brain[z].any():
            continue
        closed = ndimage.binary_closing(brain[z], ball, iterations=_CLOSE_MM, border_value=0)
        csf[z] = ndimage.binary_fill_holes(closed | brain[z]) & ~brain[z]
    return t1.astype(np.float32), brain.astype(np.uint8), csf.astype(np.uint8)


@functools.lru_cache(maxsize=1)
def _field_of_view() -> tuple[np.ndarray, float]:
    _, brain, _ = csf_template()
    mask = brain.any(axis=0)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    centre = np.array([(rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0])
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 + 2 * _MARGIN_MM
    return centre, float(side)


def _sample(source: int, size: int, rng: np.random.Generator) -> dict:
    t1, brain, csf = csf_template()
    centre, side = _field_of_view()
    spacing = side / size
    angle = np.deg2rad(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG))
    scale = rng.uniform(*_SCALE)
    shift = rng.uniform(-_SHIFT, _SHIFT, 2) * side
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    grid = (np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")) - (size - 1) / 2) * spacing
    coords = np.tensordot(rotation / scale, grid, axes=1) + (centre + shift)[:, None, None]
    step = spacing / scale
    image = t1[source] if step <= 1.0 else ndimage.gaussian_filter(t1[source], 0.5 * (step - 1.0))
    image = ndimage.map_coordinates(image, coords, order=1, mode="constant", cval=0.0)
    label = ndimage.map_coordinates(csf[source], coords, order=0, mode="constant", cval=0)
    mask = ndimage.map_coordinates(brain[source], coords, order=0, mode="constant", cval=0)
    gain = rng.uniform(*_GAIN)
    noise = rng.uniform(0.0, _NOISE)
    image = image * gain + noise * rng.standard_normal(image.shape)
    meta = {"rotation_deg": float(np.rad2deg(angle)), "scale": float(scale), "gain": float(gain), "noise": float(noise)}
    return {"image": image.astype(np.float32), "label": label.astype(np.uint8), "brain": mask.astype(np.uint8), "meta": meta}


def mni_csf(
    n: int,
    split: Literal["train", "val", "test"] = "train",
    size: int = 96,
    seed: int = 0,
    *,
    cache_dir: str | os.PathLike[str] | None | Literal[False] = None,
) -> LesionData:
    """``n`` axial MNI152 slices with their CSF label (the second embedded task).

    Image ``i`` uses template slice ``split_slices(split)[perm[i % m]]`` (a seeded permutation of
    the split's ``m`` slices) with its own random transform, so the splits share no slice.

    Args:
        n: number of images (>= 1).
        split: ``"train"``, ``"val"`` or ``"test"``.
        size: output side in pixels (16..512).
        seed: the same seed gives identical arrays.
        cache_dir: folder of the on-disk cache (see :mod:`segability.datasets.cache`); ``False``
            generates without reading or writing a cache.

    Returns:
        A :class:`~segability.datasets.LesionData` (labels: CSF; ``brain``: grey + white matter)
        with ids like ``"csf-test-z087-0003"`` and meta columns ``id``, ``split``, ``slice``,
        ``csf_pixels`` and the drawn transform.

    Raises:
        ValueError: on an unknown split, or ``n`` / ``size`` / ``seed`` out of range.

    Example:
        >>> data = mni_csf(4, "val", size=32, cache_dir=False)
        >>> data.images.shape, int(data.labels.max())
        ((4, 1, 32, 32), 1)
    """
    for name, value, low, high in (("n", n, 1, None), ("size", size, 16, 512), ("seed", seed, 0, None)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (high and value > high):
            raise ValueError(f"{name} must be an integer in [{low}, {high or 'inf'}], got {value!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

    def make() -> LesionData:
        pool = split_slices(split, "axial")
        order = np.random.default_rng([seed, SPLITS.index(split), 14]).permutation(pool)
        samples, ids, rows = [], [], []
        for i in range(int(n)):
            source = int(order[i % order.size])
            rng = np.random.default_rng([seed, SPLITS.index(split), i, 14])
            sample = _sample(source, int(size), rng)
            samples.append(sample)
            ids.append(f"csf-{split}-z{source:03d}-{i:04d}")
            rows.append({"id": ids[-1], "split": split, "slice": source, "csf_pixels": int(sample["label"].sum()), **sample["meta"]})
        return LesionData(
            images=np.stack([s["image"] for s in samples])[:, None],
            labels=np.stack([s["label"] for s in samples])[:, None],
            brain=np.stack([s["brain"] for s in samples])[:, None],
            ids=ids,
            meta=pd.DataFrame(rows),
        )

    if cache_dir is False:
        return make()
    path = cache_path(cache_dir, "mni_csf", n=int(n), split=split, size=int(size), seed=int(seed))
    try:
        return LesionData.load(path)
    except FileNotFoundError:
        data = make()
        data.save(path)
        return data
