"""3D MNI152 cubes with simulated lesions (:func:`mni_lesions_3d`).

Each cube is a resampled isotropic sub-volume of the template inside one axial slab of its split
(:func:`~segability.datasets.split_slabs`), rotated about the axial axis only, with lesions and
intensity changes drawn as for 2D slices (:mod:`segability.datasets.lesions`).
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
    _appearance,
    _draw_lesions,
    _lesion_plan,
    _streams,
)
from segability.datasets.splits import (
    _SLAB_SPLITS,
    SPLITS,
    Split,
    _check_choice,
    _check_int,
    _slabs,
)
from segability.datasets.template import _oriented

__all__ = ["mni_lesions_3d"]


def mni_lesions_3d(
    n: int,
    split: Split = "train",
    size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None | Literal[False] = None,
) -> LesionData:
    """``n`` 3D cubes of the MNI152 template with simulated 3D lesions and exact labels.

    Each cube is a resampled isotropic sub-volume of the 1 mm template (edge 22.5 mm, so 0.35 mm
    voxels at size 64), rotated about the axial axis only, lying inside one axial slab of its
    split (:func:`~segability.datasets.split_slabs`); ``meta`` gives its ``slab`` and the template z range
    ``z_min..z_max`` it reads. The slabs are 27 mm thick so that three splits each span the
    anatomy, which is what bounds the cube's field of view. Lesions follow the 2D rules (radius
    2 to 14 voxels at size 64).

    Args:
        n: number of cubes (>= 1).
        split: ``"train"``, ``"val"`` or ``"test"``; their slabs are disjoint.
        size: cube side in voxels (8..256).
        seed: the same seed gives identical arrays.
        cache_dir: as in :func:`~segability.datasets.mni_lesions`.

    Returns:
        A :class:`LesionData` with images (n, 1, size, size, size) in (z, row, col) order.

    Example:
        >>> data = mni_lesions_3d(2, size=16, cache_dir=False)
        >>> data.images.shape
        (2, 1, 16, 16, 16)
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 8, 256)
    seed = _check_int("seed", seed, 0)
    _check_choice("split", split, SPLITS)

    def make() -> LesionData:
        samples, ids, rows = [], [], []
        for i in range(n):
            sample = _sample_3d(split, size, seed, i)
            samples.append(sample)
            ids.append(f"{split}-z{sample['meta']['slice']:03d}-{i:04d}")
            rows.append({"id": ids[-1], "split": split, "axis": "3d"})
        return _assemble(samples, ids, rows)

    return _cached("mni_lesions_3d", cache_dir, make, n=n, split=split, size=size, seed=seed)


def _sample_3d(split: str, size: int, seed: int, index: int, *, lesions: bool = True) -> dict[str, Any]:
    """One cube inside a slab of ``split``; ``lesions=False`` gives it without lesions."""
    geometry, drawing, appearance, noise = _streams(3, seed, split, "axial", index)
    t1_stack, brain_stack = _oriented("axial")  # (z, row, col)
    slabs = [k for k, name in enumerate(_SLAB_SPLITS) if name == split]
    slab_index = slabs[int(geometry.integers(len(slabs)))]
    z0, z1 = _slabs()[slab_index]
    edge = _SCALE[0] * (z1 - z0 - 2)  # mm: the widest field of view (edge / scale) fits the slab
    spacing = edge / size

    angle = np.deg2rad(geometry.uniform(-_ROTATION_DEG, _ROTATION_DEG))
    scale = geometry.uniform(*_SCALE)
    half = (edge / scale - spacing / scale) / 2  # distance from centre to the outer sample
    centre_z = geometry.uniform(z0 + half, z1 - 1 - half)
    plane = brain_stack[int(round(centre_z))] > 0.5
    rows, cols = np.nonzero(plane)
    pick = int(geometry.integers(rows.size))
    centre = np.array([centre_z, rows[pick], cols[pick]], dtype=np.float64)
    # Rotation about z only keeps every sample's z inside the slab.
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    grid = (np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")) - (size - 1) / 2) * spacing
    coords = np.tensordot(rotation / scale, grid, axes=1) + centre[:, None, None, None]
    coords[0] = np.clip(coords[0], z0, z1 - 1)
    base = ndimage.map_coordinates(t1_stack, coords, order=1, mode="constant", cval=0.0)
    brain = ndimage.map_coordinates(brain_stack, coords, order=1, mode="constant", cval=0.0) > 0.5

    count, polarity = _lesion_plan(drawing)
    radius_range = (max(1.5, 2.0 * size / 64), max(3.0, 14.0 * size / 64))
    delta, core, summary = _draw_lesions(drawing, brain, polarity, count if lesions else 0, radius_range)
    image, params = _appearance(base.astype(np.float32), delta, appearance, noise)
    meta = {
        "slab": slab_index,
        "z_min": int(np.floor(coords[0].min())),
        "z_max": int(np.ceil(coords[0].max())),
        "slice": int(round(centre_z)),
        "rotation_deg": float(np.rad2deg(angle)),
        "scale": float(scale),
        "polarity": polarity if lesions else 0,
        **summary,
        **params,
    }
    return {"image": image, "label": core, "brain": brain, "meta": meta}
