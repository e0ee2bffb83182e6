"""Files in, models out: load networks from a factory spec and weights, find, pair and read images.

``formats`` knows the image suffixes; ``finding`` lists and pairs files; ``intake`` checks a file
before any reader opens it; ``reading`` reads it; ``preprocess`` builds the optional preprocessing;
``models`` loads networks. ``images`` keeps the names it held before this split.

The shells (``segability analyze``, ``segability qc``, batch engines) build on these functions;
they raise ``ValueError`` with the command-line argument they concern, never exit.
"""

from __future__ import annotations

from segability.io.finding import Pairing, find_images, pair_labels
from segability.io.formats import IMAGE_SUFFIXES, image_stem, image_suffix, is_dicom_series
from segability.io.intake import MAX_IMAGE_BYTES, ImageFileError, check_image_file
from segability.io.models import (
    is_torchscript_file,
    load_callable,
    load_model,
    load_state_dict,
    parse_model_args,
    parse_shape,
)
from segability.io.preprocess import build_preprocess, load_preprocess
from segability.io.reading import load_item, read_channels, read_image

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_BYTES",
    "ImageFileError",
    "Pairing",
    "build_preprocess",
    "check_image_file",
    "find_images",
    "image_stem",
    "image_suffix",
    "is_dicom_series",
    "is_torchscript_file",
    "load_callable",
    "load_item",
    "load_model",
    "load_preprocess",
    "load_state_dict",
    "pair_labels",
    "parse_model_args",
    "parse_shape",
    "read_channels",
    "read_image",
]
