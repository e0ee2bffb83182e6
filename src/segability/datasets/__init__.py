"""Embedded data: MNI152 slices and cubes with simulated lesions, image shifts, an on-disk cache.

``template`` reads the MNI152 template nilearn ships; ``splits`` says which part of it each split
uses; ``lesions`` draws lesions and intensity changes; ``slices`` (2D) and ``volumes`` (3D) make
the images; ``lesion_data`` holds them (:class:`LesionData`); ``shifts`` changes them; ``cache``
keeps them on disk.
"""

from __future__ import annotations

from segability.datasets.lesion_data import LesionData
from segability.datasets.shifts import SHIFTS, apply_shift, shifted_suite
from segability.datasets.slices import mni_lesions
from segability.datasets.splits import AXES, SPLITS, split_slabs, split_slices
from segability.datasets.template import mni_template
from segability.datasets.volumes import mni_lesions_3d

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
