"""The checks every image file passes before a reader opens it (:func:`check_image_file`).

A file must be a regular file once links are resolved (a FIFO would block the reader for ever, a
link to ``/dev/zero`` would feed it without end), and its header must promise no more data than the
file holds (``.npy``, ``.npz``, ``.nii``, NRRD) nor more than ``max_bytes`` of voxel data (every
format with a header: ``.nii.gz``, PNG and the other raster formats, DICOM). The checks also say
which reader fits the file (:func:`_intake`): the one its suffix names, and only that one.
"""

from __future__ import annotations

import math
import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from segability.io.formats import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    NRRD_SUFFIXES,
    RASTER_SUFFIXES,
    _is_dicom_file,
    _suffix_list,
    image_suffix,
    is_dicom_series,
)

__all__ = ["MAX_IMAGE_BYTES", "ImageFileError", "check_image_file"]

NPZ_KEYS = ("image", "label", "arr_0")
# The most voxel data (shape x item size, as stored) a file's header may promise before it is read.
MAX_IMAGE_BYTES = 4 * 2**30
# An NRRD header longer than this is refused rather than read line by line without end.
NRRD_HEADER_LIMIT = 2**20


class ImageFileError(ValueError):
    """An image file refused before a reader opens it: not a regular file, or a header that promises
    more data than the file holds or than ``max_bytes`` allows. The message names the path."""


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISDIR, "a directory"),
)


def _regular_file(path: Path) -> int:
    """The size of ``path`` after resolving links; an :class:`ImageFileError` unless it is a regular file."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageFileError(f"{path} is a link to {os.readlink(path)}, which does not exist") from None
        raise ImageFileError(f"{path} does not exist") from None
    except OSError as exc:  # a loop of links, a folder without read permission, ...
        raise ImageFileError(f"{path} cannot be opened: {exc.strerror or exc}") from None
    if stat.S_ISREG(info.st_mode):
        return info.st_size
    raise ImageFileError(f"{path} is {_file_kind(path, info.st_mode)}, not a regular file")


def _file_kind(path: Path, mode: int) -> str:
    """What a file that is not regular is: ``"a character device (a link to /dev/zero)"``."""
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), "a special file")
    return kind + (f" (a link to {os.path.realpath(path)})" if path.is_symlink() else "")


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**30:.3g} GiB" if n >= 2**30 else f"{n / 2**20:.3g} MiB"


def _check_promise(
    path: Path, what: str, data: int, max_bytes: int | None, available: int | None = None, holder: str = "the file"
) -> None:
    """Refuse a header that promises ``data`` bytes: more than ``max_bytes``, or more than ``available``."""
    if max_bytes is not None and data > max_bytes:
        raise ImageFileError(
            f"{path}: its header promises {what}, {_size(data)} of voxel data, more than the limit of "
            f"{_size(max_bytes)} (max_bytes)"
        )
    if available is not None and data > available:
        raise ImageFileError(f"{path} is truncated: its header promises {what}, {_size(data)}, but {holder} holds {_size(max(available, 0))}")


def _check_npy(fp: Any, path: Path, available: int, max_bytes: int | None) -> None:
    """Check an ``.npy`` stream's header against the ``available`` bytes (header included)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fp)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fp)
        else:  # 3.0 (utf-8 field names) has no public reader of its own
            shape, _, dtype = fmt._read_array_header(fp, version)
    except ValueError as exc:
        raise ImageFileError(f"{path} is not a NumPy array file: {exc}") from None
    if dtype.hasobject:
        raise ImageFileError(f"{path} holds Python objects (dtype {dtype}); only plain numeric arrays are read")
    data = math.prod(shape) * dtype.itemsize
    _check_promise(path, f"shape {tuple(shape)} of {dtype}", data, max_bytes, available - fp.tell())


def _check_nifti(path: Path, size: int, max_bytes: int | None) -> None:
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.header.get_data_shape())
        dtype = img.header.get_data_dtype()
        # The image's header is a copy with the offset reset; the array proxy keeps the file's.
        offset = int(getattr(img.dataobj, "offset", 0))
    except Exception:  # noqa: BLE001 - no header to check: the reader says what is wrong
        return
    data = math.prod(shape) * dtype.itemsize
    # The decompressed size of a .nii.gz is unknown without reading it all: the limit bounds the read.
    available = None if path.name.lower().endswith(".gz") else size - offset
    _check_promise(path, f"shape {shape} of {dtype}", data, max_bytes, available)


def _check_raster(path: Path, max_bytes: int | None) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            width, height = im.size
            bands = len(im.getbands())
    except Image.DecompressionBombError as exc:
        raise ImageFileError(f"{path}: {exc}") from None
    except Exception:  # noqa: BLE001 - no header to check: the reader says what is wrong
        return
    # Read as float32: four bytes per value.
    _check_promise(path, f"{width}x{height} pixels of {bands} band(s)", width * height * bands * 4, max_bytes)


def _check_dicom(path: Path, size: int, max_bytes: int | None) -> None:
    import pydicom

    try:
        # Values over 1 KiB (the pixel data) are not read, only located: where they start, how long.
        ds = pydicom.dcmread(path, defer_size=1024)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        item = -(-int(getattr(ds, "BitsAllocated", 8) or 8) // 8)
        compressed = bool(ds.file_meta.TransferSyntaxUID.is_compressed)
        pixels = ds.get_item("PixelData") if "PixelData" in ds else None
    except Exception:  # noqa: BLE001 - no header to check: the reader says what is wrong
        return
    data = rows * cols * frames * samples * item
    available = None
    if pixels is not None and not compressed:
        if getattr(pixels, "value", None) is not None:
            available = len(pixels.value)
        elif getattr(pixels, "value_tell", None) is not None and pixels.length != 0xFFFFFFFF:
            available = min(pixels.length, size - pixels.value_tell)
    _check_promise(path, f"{frames} frame(s) of {rows}x{cols}", data, max_bytes, available)


def _check_dicom_series(folder: Path) -> None:
    """Every entry the DICOM reader will open must be a regular file (it opens each to look for the preamble)."""
    for child in sorted(folder.iterdir()):
        if not child.name.startswith(".") and not child.is_dir():
            _regular_file(child)


_NRRD_ITEM = (("double", 8), ("64", 8), ("long", 8), ("16", 2), ("short", 2), ("8", 1), ("char", 1))


def _check_nrrd(path: Path, size: int, max_bytes: int | None) -> None:
    import nrrd

    with path.open("rb") as f:
        head = f.read(NRRD_HEADER_LIMIT)
    if not head.startswith(b"NRRD"):
        return  # the reader says what is wrong
    end = head.find(b"\n\n")
    if end < 0:
        if len(head) == NRRD_HEADER_LIMIT:
            raise ImageFileError(f"{path}: the NRRD header is longer than {_size(NRRD_HEADER_LIMIT)} (no blank line ends it)")
        end = len(head)
    try:
        header = nrrd.read_header(head[: end + 1].splitlines(keepends=True))
        sizes = [int(s) for s in header["sizes"]]
        kind = str(header["type"]).lower()
        encoding = str(header.get("encoding", "raw")).lower()
    except Exception:  # noqa: BLE001 - no header to check: the reader says what is wrong
        return
    item = int(header.get("block size", 1)) if kind == "block" else next((n for key, n in _NRRD_ITEM if key in kind), 4)
    data = math.prod(sizes) * item
    detached = header.get("data file", header.get("datafile"))
    data_path = None  # one detached data file (a list or a pattern of them is left to the reader)
    if isinstance(detached, str) and not detached.upper().startswith("LIST") and " " not in detached.strip():
        data_path = Path(detached) if Path(detached).is_absolute() else path.parent / detached
        data_size = _regular_file(data_path)
    available = None
    if encoding == "raw" and int(header.get("line skip", header.get("lineskip", 0)) or 0) == 0:
        skip = max(int(header.get("byte skip", header.get("byteskip", 0)) or 0), 0)
        if detached is None:
            available = size - (end + 2) - skip
        elif data_path is not None:
            available = data_size - skip
    holder = "the file" if data_path is None else f"its data file {data_path}"
    _check_promise(path, f"sizes {tuple(sizes)} of {kind}", data, max_bytes, available, holder)


def _npz_key(path: Path, size: int, max_bytes: int | None) -> str:
    """The array of an ``.npz`` to read (the only one, or ``image`` / ``label`` / ``arr_0``), its header checked."""
    try:
        with zipfile.ZipFile(path) as zf:
            members = {info.filename[: -len(".npy")]: info for info in zf.infolist() if info.filename.endswith(".npy")}
            keys = list(members)
            if len(keys) == 1:
                key = keys[0]
            else:
                key = next((k for k in NPZ_KEYS if k in keys), None)
                if key is None:
                    raise ValueError(f"{path.name}: an .npz with several arrays needs one named 'image'; it has {keys}")
            info = members[key]
            # The zip module stops at the declared size, so the declared size bounds the read.
            with zf.open(info) as member:
                _check_npy(member, path, info.file_size, max_bytes)
    except zipfile.BadZipFile as exc:
        raise ImageFileError(f"{path} is not an .npz (zip) file: {exc}") from None
    return key


def _intake(path: Path, max_bytes: int | None) -> tuple[str, str | None]:
    """Check ``path`` before any reader opens it; which reader fits it (and, for an ``.npz``, which array)."""
    suffix = image_suffix(path)
    if path.is_dir():
        if is_dicom_series(path):
            _check_dicom_series(path)
            return "dicom", None
        if suffix is None:
            raise ImageFileError(f"{path} is a folder without DICOM files; expected an image file or a DICOM series folder")
    size = _regular_file(path)  # a folder named like a file ends here too
    if suffix in NIFTI_SUFFIXES:
        _check_nifti(path, size, max_bytes)
        return "nifti", None
    if suffix in RASTER_SUFFIXES:
        _check_raster(path, max_bytes)
        return "raster", None
    if suffix == ".npy":
        with path.open("rb") as f:
            _check_npy(f, path, size, max_bytes)
        return "numpy", None
    if suffix == ".npz":
        return "numpy", _npz_key(path, size, max_bytes)
    if suffix in NRRD_SUFFIXES:
        try:
            import nrrd  # noqa: F401
        except ImportError:
            raise ValueError(f"{path.name}: reading NRRD needs pynrrd (pip install pynrrd)") from None
        _check_nrrd(path, size, max_bytes)
        return "nrrd", None
    if suffix in DICOM_SUFFIXES or _is_dicom_file(path):
        _check_dicom(path, size, max_bytes)
        return "dicom", None
    raise ValueError(f"{path.name}: unknown image type; expected one of {_suffix_list()} or a DICOM series folder")


def check_image_file(path: str | os.PathLike, *, max_bytes: int | None = MAX_IMAGE_BYTES) -> None:
    """Refuse a file no reader should open: not a regular file, or a header that promises too much.

    Links are resolved: a link to a regular file is fine; a FIFO, a device (``/dev/zero``), a
    socket or a folder where a file is expected is refused. Where the format has a header, the data
    it promises (shape x item size) must fit in the file (``.npy``, ``.npz``, ``.nii``, raw NRRD,
    uncompressed DICOM) and in ``max_bytes``. A header that cannot be parsed is left to the reader,
    which reports what is wrong with the file. :func:`~segability.io.read_image` calls this first.

    Args:
        path: an image file or DICOM series folder.
        max_bytes: the most voxel data a header may promise; None for no limit.

    Raises:
        ImageFileError: (a ``ValueError``) with a message naming ``path`` and what is wrong.
        ValueError: an unknown image type.

    Example:
        >>> import os, tempfile
        >>> fifo = os.path.join(tempfile.mkdtemp(), "x.npy")
        >>> os.mkfifo(fifo)
        >>> check_image_file(fifo)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        segability.io.intake.ImageFileError: .../x.npy is a FIFO (named pipe), not a regular file
    """
    _intake(Path(path), max_bytes)
