"""Embedded data: MNI152 slices and cubes with simulated lesions, image shifts, an on-disk cache."""

from __future__ import annotations

from segability.datasets.mni import (
    AXES,
    SPLITS,
    LesionData,
    mni_lesions,
    mni_lesions_3d,
    mni_template,
    split_slabs,
    split_slices,
)
from segability.datasets.shifts import SHIFTS, apply_shift, shifted_suite

__all__ = [
    "AXES",
    "SPLITS",
    "LesionData",
    "SHIFTS",
    "apply_shift",
    "shifted_suite",
    "mni_lesions",
    "mni_lesions_3d",
    "mni_template",
    "split_slabs",
    "split_slices",
]
