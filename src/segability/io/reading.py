"""Read an image file (or DICOM series folder) into a channel-first tensor, and an image with its label.

Readers go through MONAI ``LoadImage``: nibabel for NIfTI, pydicom for DICOM, PIL for
PNG/JPEG/BMP/TIFF, NumPy for ``.npy`` / ``.npz`` and pynrrd for NRRD. Every image comes out
channel-first ``(C, *spatial)``: ``.npy`` / ``.npz`` arrays are taken as channel-first as given; the
others get their channel moved or added (``ensure_channel_first``). 2D raster images keep NumPy's
``(H, W)`` order (``PILReader(reverse_indexing=False)``), so a PNG reads like
``np.asarray(Image.open(f))``. Every file passes :func:`~segability.io.check_image_file` first, and
the reader its suffix names is the only one tried: a file that does not fit it is an error, never
handed on to the others. An image kept as one file per channel (nnU-Net's ``case_0000.nii.gz``,
``case_0001.nii.gz``, ...) is read by :func:`load_item` from the list of its files, stacked in order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segability.io.formats import NRRD_SUFFIXES, image_suffix
from segability.io.intake import MAX_IMAGE_BYTES, _intake

__all__ = ["read_image", "read_channels", "load_item"]


@lru_cache(maxsize=16)
def _loader(kind: str, npz_key: str | None) -> tuple[Any, Any]:
    """``(reader, LoadImage)`` for a reader kind, built once (LoadImage registers every reader)."""
    from monai.data import NibabelReader, NrrdReader, NumpyReader, PILReader, PydicomReader
    from monai.transforms import LoadImage

    reader = {
        "dicom": PydicomReader,
        "nifti": NibabelReader,
        "raster": lambda: PILReader(reverse_indexing=False),  # (H, W), as NumPy and PIL index
        "numpy": lambda: NumpyReader(npz_keys=npz_key) if npz_key else NumpyReader(),
        "nrrd": NrrdReader,
    }[kind]()
    # NumPy arrays are channel-first as given; the others get their channel moved or added.
    channel_first = kind != "numpy"
    return reader, LoadImage(reader=reader, image_only=True, ensure_channel_first=channel_first, dtype=np.float32)


def read_image(path: str | os.PathLike, *, max_bytes: int | None = MAX_IMAGE_BYTES) -> torch.Tensor:
    """Read one image file (or DICOM series folder) as a channel-first float32 ``MetaTensor`` (C, *S).

    The file is checked first (:func:`~segability.io.check_image_file`), then read by the one reader its suffix
    names (never handed on to the others when that one fails).

    Args:
        path: the image file or DICOM series folder.
        max_bytes: the most voxel data the file's header may promise; None for no limit.

    Raises:
        ImageFileError: not a regular file, or a header that promises more than the file holds or
            than ``max_bytes`` (a ``ValueError``).
        ValueError: an unknown type, a file its reader cannot read, or an array with fewer than two
            dimensions.

    Example:
        >>> import numpy as np, tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> np.save(f, np.zeros((1, 4, 5), np.float32))
        >>> tuple(read_image(f).shape)
        (1, 4, 5)
    """
    p = Path(path)
    reader, load = _loader(*_intake(p, max_bytes))
    try:
        # The reader given at call time is the only one LoadImage tries: no fall-through to others.
        img = load(str(p), reader=reader)
    except KeyError as exc:
        if image_suffix(p) not in NRRD_SUFFIXES:
            raise ValueError(f"{p.name} cannot be read by {type(reader).__name__}: KeyError: {exc}") from exc
        img = _read_nrrd_without_space(p, exc)
    except Exception as exc:
        raise ValueError(f"{p.name} cannot be read by {type(reader).__name__}: {type(exc).__name__}: {exc}") from exc
    if img.ndim < 2:
        raise ValueError(f"{p.name}: expected a channel-first array (C, *spatial), got shape {tuple(img.shape)}")
    return img


def _read_nrrd_without_space(path: Path, exc: KeyError) -> torch.Tensor:
    """NRRD files without ``space directions`` (MONAI's reader needs them): the raw array, identity affine."""
    import nrrd
    from monai.data import MetaTensor

    data, _ = nrrd.read(str(path))
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(data, dtype=np.float32))[None], meta={"filename_or_obj": str(path)})


def read_channels(files: Sequence[str | os.PathLike], *, max_bytes: int | None = MAX_IMAGE_BYTES) -> torch.Tensor:
    """Read the channel files of one image and stack them, in order, as its channels (C, *S).

    Each file is read by :func:`read_image`; all must have the same spatial shape. The metadata
    (affine, ...) are the first file's.

    Raises:
        ValueError: no files, or files of different spatial shapes.

    Example:
        >>> import numpy as np, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> for c in range(2):
        ...     np.save(os.path.join(d, f"case_000{c}.npy"), np.full((1, 4, 5), c, np.float32))
        >>> x = read_channels([os.path.join(d, "case_0000.npy"), os.path.join(d, "case_0001.npy")])
        >>> tuple(x.shape), float(x[1].max())
        ((2, 4, 5), 1.0)
    """
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("an image needs at least one channel file, got none")
    parts = [read_image(p, max_bytes=max_bytes) for p in paths]
    shapes = {p.name: tuple(x.shape[1:]) for p, x in zip(paths, parts, strict=True)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"the channel files of one image have different spatial shapes: {shapes}")
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def load_item(
    image: str | os.PathLike | Sequence[str | os.PathLike],
    label: str | os.PathLike | None = None,
    preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    *,
    max_bytes: int | None = MAX_IMAGE_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an image (and its label), preprocess them, and return plain float32 tensors.

    Args:
        image: the image file (or DICOM series folder), or the list of its channel files
            (stacked in order, :func:`read_channels`).
        label: its label file, or None.
        preprocess: a callable on ``{"image": ..., "label": ...}`` (see :func:`~segability.io.load_preprocess`).
        max_bytes: the most voxel data a file's header may promise (see :func:`read_image`).

    Returns:
        ``(image (C, *S), label (C', *S) or None)`` as ``torch.Tensor`` (metadata dropped).

    Raises:
        ImageFileError: a file refused before reading (see :func:`~segability.io.check_image_file`).
        ValueError: a file its reader cannot read, a preprocessing callable that does not return a
            dict with ``"image"``, or an image and label of different spatial shapes.
    """
    if isinstance(image, (str, os.PathLike)):
        item: dict[str, Any] = {"image": read_image(image, max_bytes=max_bytes)}
    else:
        item = {"image": read_channels(image, max_bytes=max_bytes)}
        image = image[0]
    if label is not None:
        item["label"] = read_image(label, max_bytes=max_bytes)
    if preprocess is not None:
        item = preprocess(item)
        if not isinstance(item, Mapping) or "image" not in item:
            raise ValueError(f"the preprocessing must return a dict with 'image' (and 'label'), got {type(item).__name__}")
    x = _plain(item["image"])
    y = _plain(item["label"]) if item.get("label") is not None else None
    if y is not None and tuple(y.shape[1:]) != tuple(x.shape[1:]):
        raise ValueError(
            f"image {Path(image).name} {tuple(x.shape)} and label {Path(label).name} {tuple(y.shape)} "
            "have different spatial shapes"
        )
    return x, y


def _plain(t: Any) -> torch.Tensor:
    t = t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(np.asarray(t))
    return t.to(torch.float32).contiguous()
