"""The names ``segability.io.images`` held before it was split; kept so that older imports work.

Formats: :mod:`segability.io.formats`; finding and pairing files: :mod:`segability.io.finding`;
checks before reading: :mod:`segability.io.intake`; reading: :mod:`segability.io.reading`;
preprocessing: :mod:`segability.io.preprocess`. New code imports from :mod:`segability.io`.
"""

from __future__ import annotations

from segability.io.finding import Pairing, find_images, pair_labels
from segability.io.formats import IMAGE_SUFFIXES, image_stem, image_suffix, is_dicom_series
from segability.io.intake import MAX_IMAGE_BYTES, ImageFileError, check_image_file
from segability.io.preprocess import build_preprocess, load_preprocess
from segability.io.reading import load_item, read_image

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_BYTES",
    "ImageFileError",
    "Pairing",
    "check_image_file",
    "find_images",
    "image_stem",
    "image_suffix",
    "is_dicom_series",
    "pair_labels",
    "read_image",
    "load_item",
    "build_preprocess",
    "load_preprocess",
]
