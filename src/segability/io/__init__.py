"""Files in, models out: load networks from a factory spec and weights, find, pair and read images.

The shells (``segability analyze``, ``segability qc``, batch engines) build on these functions;
they raise ``ValueError`` with the command-line argument they concern, never exit.
"""

from __future__ import annotations

from segability.io.images import (
    IMAGE_SUFFIXES,
    Pairing,
    build_preprocess,
    find_images,
    image_stem,
    image_suffix,
    is_dicom_series,
    load_item,
    load_preprocess,
    pair_labels,
    read_image,
)
from segability.io.models import (
    is_torchscript_file,
    load_callable,
    load_model,
    load_state_dict,
    parse_model_args,
    parse_shape,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "Pairing",
    "build_preprocess",
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
    "read_image",
]
