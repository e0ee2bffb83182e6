"""Train, validation and test splits of the template, and the checks of the generators' arguments.

Train, validation and test data come from disjoint parts of the template: 2D slices are grouped in
blocks of 6 consecutive slices (block ``k % 5`` in {0, 1, 2} -> train, 3 -> val, 4 -> test), so each
split spans the anatomy; 3D cubes lie inside disjoint axial slabs (see :func:`split_slabs`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np

from segability.datasets.template import _oriented

__all__ = ["SPLITS", "AXES", "split_slices", "split_slabs"]

Split = Literal["train", "val", "test"]
Axis = Literal["axial", "coronal", "sagittal"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")

# 2D splits: blocks of consecutive eligible slices, assigned by block index modulo 5.
_BLOCK = 6
_BLOCK_SPLITS = ("train", "train", "train", "val", "test")
_MIN_AREA_2D = 0.3  # eligible slice: brain area >= this fraction of the largest slice's
# 3D splits: the brain's axial extent is cut into 5 slabs, alternating so val and test are inside.
_SLAB_SPLITS = ("train", "val", "train", "test", "train")
_MIN_AREA_3D = 0.1


@functools.lru_cache(maxsize=3)
def _eligible(axis: str, min_area: float) -> np.ndarray:
    _, brain = _oriented(axis)
    area = (brain > 0.5).sum(axis=(1, 2))
    return np.flatnonzero(area >= min_area * area.max())


def split_slices(split: Split = "train", axis: Axis = "axial") -> np.ndarray:
    """Template slice indices (along ``axis``) that 2D images of ``split`` are drawn from.

    Slices with at least 30% of the largest brain area are grouped in blocks of 6 consecutive
    slices; block ``k`` goes to train when ``k % 5`` is 0, 1 or 2, to val when 3, to test when 4.

    Example:
        >>> set(split_slices("train")) & set(split_slices("test"))
        set()
    """
    _check_choice("split", split, SPLITS)
    _check_choice("axis", axis, AXES)
    eligible = _eligible(axis, _MIN_AREA_2D)
    block = (eligible - eligible[0]) // _BLOCK
    names = np.array(_BLOCK_SPLITS)[block % len(_BLOCK_SPLITS)]
    return eligible[names == split]


def split_slabs(split: Split = "train") -> list[tuple[int, int]]:
    """Axial slice ranges ``[start, stop)`` (template z indices) that 3D cubes of ``split`` lie in.

    The axial extent with at least 10% of the largest brain area is cut into 5 equal slabs,
    assigned train, val, train, test, train from inferior to superior. A cube reads only voxels
    whose z index lies inside one slab of its split.

    Example:
        >>> [len(split_slabs(s)) for s in ("train", "val", "test")]
        [3, 1, 1]
    """
    _check_choice("split", split, SPLITS)
    return [slab for slab, name in zip(_slabs(), _SLAB_SPLITS, strict=True) if name == split]


def _slabs() -> list[tuple[int, int]]:
    eligible = _eligible("axial", _MIN_AREA_3D)
    thickness = (eligible[-1] - eligible[0] + 1) // len(_SLAB_SPLITS)
    start = int(eligible[0])
    return [(int(start + k * thickness), int(start + (k + 1) * thickness)) for k in range(len(_SLAB_SPLITS))]


# ------------------------------------------------------------------------------ argument checks
def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)
