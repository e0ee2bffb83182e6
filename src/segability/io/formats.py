"""The image formats segability reads: their suffixes, and telling an image file by its name or preamble.

NIfTI (``.nii``, ``.nii.gz``), PNG/JPEG/BMP/TIFF, NumPy (``.npy``, ``.npz``), NRRD (``.nrrd``,
``.nhdr``) and DICOM (a series folder, ``.dcm`` files or files with the ``DICM`` preamble).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["IMAGE_SUFFIXES", "image_suffix", "image_stem", "is_dicom_series"]

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
NUMPY_SUFFIXES = (".npy", ".npz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + RASTER_SUFFIXES + NUMPY_SUFFIXES + NRRD_SUFFIXES + DICOM_SUFFIXES


def image_suffix(path: str | os.PathLike) -> str | None:
    """The known image suffix of ``path`` (``".nii.gz"``, ``".png"``, ...), lower case; None if unknown.

    Example:
        >>> image_suffix("scans/Case1.NII.GZ")
        '.nii.gz'
    """
    name = Path(path).name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), None)


def image_stem(path: str | os.PathLike) -> str:
    """The file name without its image suffix (``case1.nii.gz`` -> ``case1``); a folder keeps its name.

    Example:
        >>> image_stem("labels/case1.nii.gz")
        'case1'
    """
    p = Path(path)
    suffix = image_suffix(p)
    return p.name[: -len(suffix)] if suffix and not p.is_dir() else p.name


def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    if path.suffix or not path.is_file():  # opening a FIFO to look for the preamble would block
        return False
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding DICOM files (``.dcm``, or files with the ``DICM`` preamble)."""
    p = Path(path)
    if not p.is_dir():
        return False
    return any(child.is_file() and _is_dicom_file(child) for child in p.iterdir())


def _suffix_list() -> str:
    return ", ".join(IMAGE_SUFFIXES)
