"""Find, pair, read and preprocess image files for analysis.

Readers go through MONAI ``LoadImage``: nibabel for NIfTI (``.nii``, ``.nii.gz``), pydicom for
DICOM (a series folder or single ``.dcm`` files), PIL for PNG/JPEG/BMP/TIFF, NumPy for ``.npy`` /
``.npz`` and pynrrd for NRRD (``.nrrd``, ``.nhdr``). Every image comes out channel-first
``(C, *spatial)``: ``.npy`` / ``.npz`` arrays are taken as channel-first as given; the others get
their channel moved or added (``ensure_channel_first``). 2D raster images keep NumPy's ``(H, W)``
order (``PILReader(reverse_indexing=False)``), so a PNG reads like ``np.asarray(Image.open(f))``.

Every file passes an intake check before a reader opens it (:func:`check_image_file`): it must be
a regular file once links are resolved (a FIFO would block the reader for ever, a link to
``/dev/zero`` would feed it without end), and its header must promise no more data than the file
holds (``.npy``, ``.npz``, ``.nii``, NRRD) nor more than ``max_bytes`` of voxel data (every format
with a header: ``.nii.gz``, PNG and the other raster formats, DICOM). The reader is chosen by suffix
and is the only one tried: a file that does not fit it is an error, never handed on to the others.

Labels come from a second folder and are paired with images by file name stem (``case1.nii.gz``
and ``case1.png`` share the stem ``case1``); :func:`pair_labels` reports unpaired files both ways.

Preprocessing is optional: a small config (JSON or YAML) built from MONAI transforms, or a Python
callable ``file.py:fn`` that takes and returns ``{"image": ..., "label": ...}``.
"""

from __future__ import annotations

import glob
import json
import math
import os
import stat
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

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

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
NUMPY_SUFFIXES = (".npy", ".npz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + RASTER_SUFFIXES + NUMPY_SUFFIXES + NRRD_SUFFIXES + DICOM_SUFFIXES
PREPROCESS_KEYS = ("orientation", "spacing", "intensity", "size")
NPZ_KEYS = ("image", "label", "arr_0")
# The most voxel data (shape x item size, as stored) a file's header may promise before it is read.
MAX_IMAGE_BYTES = 4 * 2**30
# An NRRD header longer than this is refused rather than read line by line without end.
NRRD_HEADER_LIMIT = 2**20


class ImageFileError(ValueError):
    """An image file refused before a reader opens it: not a regular file, or a header that promises
    more data than the file holds or than ``max_bytes`` allows. The message names the path."""


# ------------------------------------------------------------------------------------ finding
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


def _is_image(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    if path.is_dir():
        # A folder named like an image file is listed too, so that reading it reports it.
        return is_dicom_series(path) or image_suffix(path) is not None
    return image_suffix(path) is not None or _is_dicom_file(path)


def find_images(source: str | os.PathLike | Sequence[str | os.PathLike], *, argument: str = "--images") -> list[Path]:
    """The image files named by a folder, a glob pattern, one file or a list of paths, sorted.

    A folder is listed without recursion: files with a known image suffix (or a DICOM preamble),
    and sub-folders that hold DICOM files (one series each). A folder holding only DICOM files of
    one series is that series. A glob (``"data/**/*.nii.gz"``) is
    expanded recursively and filtered the same way. Hidden files are skipped. A name that exists is
    taken literally even when it holds ``[``, ``*`` or ``?`` (a folder ``scans[1]``); only a name
    that does not exist is a pattern. Files are listed, not opened: special files (FIFOs, devices)
    with an image suffix are listed and refused when read, one error per file.

    Args:
        source: the folder, pattern, file or list.
        argument: the argument named in messages.

    Returns:
        Sorted paths (files, or DICOM series folders).

    Raises:
        ValueError: a path that does not exist, or a source with no image in it.

    Example:
        >>> find_images("no/such/folder")  # doctest: +SKIP
        ValueError: --images: no/such/folder does not exist
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"{argument}: {len(missing)} path(s) do not exist: {missing[:5]}")
        if not paths:
            raise ValueError(f"{argument}: the list of images is empty")
        return paths
    text = os.fspath(source)
    path = Path(text).expanduser()
    if not os.path.lexists(path) and any(ch in text for ch in "*?["):
        images = _glob_images(text)
        if not images:
            raise ValueError(f"{argument}: the pattern {text!r} matches no image file (expected {_suffix_list()})")
        return images
    if not path.exists():
        if path.is_symlink():
            raise ValueError(f"{argument}: {text} is a link to {os.readlink(path)}, which does not exist")
        raise ValueError(f"{argument}: {text} does not exist")
    if not path.is_dir():  # a file, or a special file that reading will refuse with its reason
        return [path]
    children = sorted(path.iterdir())
    images = [c for c in children if _is_image(c)]
    if images and _one_series(images):
        return [path]
    if not images:
        raise ValueError(f"{argument}: the folder {text} holds no image file (expected {_suffix_list()}, or DICOM series folders)")
    return images


def _glob_images(pattern: str) -> list[Path]:
    """The images matching ``pattern``, its longest existing leading folder taken literally
    (``scans[1]/*.npy`` in a folder named ``scans[1]`` is that folder's ``.npy`` files)."""
    parts = Path(pattern).parts
    for n in range(len(parts) - 1, 0, -1):
        head = os.path.join(*parts[:n])
        if os.path.isdir(head):
            pattern = os.path.join(glob.escape(head), *parts[n:])
            break
    found = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    return [p for p in found if _is_image(p)]


def _one_series(paths: list[Path]) -> bool:
    """Whether ``paths`` are two or more DICOM files of a single series (read as one volume)."""
    if len(paths) < 2 or not all(p.is_file() and _is_dicom_file(p) for p in paths):
        return False
    import pydicom

    uids = set()
    for p in paths:
        try:
            header = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except Exception:
            return False
        uids.add(getattr(header, "SeriesInstanceUID", None))
    return len(uids) == 1 and None not in uids


def _suffix_list() -> str:
    return ", ".join(IMAGE_SUFFIXES)


@dataclass
class Pairing:
    """Images with their labels (None where an image has none) and the files left unpaired."""

    pairs: list[tuple[Path, Path | None]]
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_labels: list[Path] = field(default_factory=list)

    def describe(self) -> str:
        """One line per kind of unpaired file (empty when everything is paired)."""
        lines = []
        if self.unpaired_images:
            names = [p.name for p in self.unpaired_images]
            lines.append(f"{len(names)} image(s) without a label (analysed without one): {names[:10]}")
        if self.unpaired_labels:
            names = [p.name for p in self.unpaired_labels]
            lines.append(f"{len(names)} label(s) without an image (ignored): {names[:10]}")
        return "\n".join(lines)


def pair_labels(
    images: Sequence[Path],
    labels: str | os.PathLike | Sequence[str | os.PathLike] | None,
    *,
    label_suffix: str = "",
    argument: str = "--labels",
) -> Pairing:
    """Pair every image with the label of the same stem (plus ``label_suffix``, e.g. ``"_seg"``).

    Args:
        images: image paths (see :func:`find_images`).
        labels: a folder, pattern or list of label files; None for no labels.
        label_suffix: text after the image stem in label names (``case1_seg.nii.gz`` for ``case1``).
        argument: the argument named in messages.

    Returns:
        A :class:`Pairing`: images without a label pair with None; labels without an image are
        listed in ``unpaired_labels``.

    Raises:
        ValueError: two images (or two labels) share a stem, so pairing would be ambiguous.

    Example:
        >>> from pathlib import Path
        >>> p = pair_labels([Path("a.png"), Path("b.png")], [Path("a.png"), Path("c.png")])  # doctest: +SKIP
        >>> [(i.name, l and l.name) for i, l in p.pairs], [l.name for l in p.unpaired_labels]  # doctest: +SKIP
        ([('a.png', 'a.png'), ('b.png', None)], ['c.png'])
    """
    if labels is None:
        return Pairing([(p, None) for p in images])
    by_stem = _unique_stems(images, "--images", "")
    label_paths = find_images(labels, argument=argument)
    label_by_stem = _unique_stems(label_paths, argument, label_suffix)
    pairs = [(p, label_by_stem.get(stem)) for stem, p in by_stem.items()]
    return Pairing(
        pairs=pairs,
        unpaired_images=[p for p, lab in pairs if lab is None],
        unpaired_labels=[p for stem, p in label_by_stem.items() if stem not in by_stem],
    )


def _unique_stems(paths: Sequence[Path], argument: str, suffix: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in paths:
        stem = image_stem(p)
        if suffix and stem.endswith(suffix):
            stem = stem[: -len(suffix)]
        if stem in out:
            raise ValueError(f"{argument}: {out[stem]} and {p} have the same name stem {stem!r}; pairing needs unique stems")
        out[stem] = p
    return out


# ------------------------------------------------------------------------------------- intake
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
    which reports what is wrong with the file. :func:`read_image` calls this first.

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
        segability.io.images.ImageFileError: .../x.npy is a FIFO (named pipe), not a regular file
    """
    _intake(Path(path), max_bytes)


# ------------------------------------------------------------------------------------ reading
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

    The file is checked first (:func:`check_image_file`), then read by the one reader its suffix
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


def load_item(
    image: str | os.PathLike,
    label: str | os.PathLike | None = None,
    preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    *,
    max_bytes: int | None = MAX_IMAGE_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read an image (and its label), preprocess them, and return plain float32 tensors.

    Args:
        image: the image file (or DICOM series folder).
        label: its label file, or None.
        preprocess: a callable on ``{"image": ..., "label": ...}`` (see :func:`load_preprocess`).
        max_bytes: the most voxel data a file's header may promise (see :func:`read_image`).

    Returns:
        ``(image (C, *S), label (C', *S) or None)`` as ``torch.Tensor`` (metadata dropped).

    Raises:
        ImageFileError: a file refused before reading (see :func:`check_image_file`).
        ValueError: a file its reader cannot read, a preprocessing callable that does not return a
            dict with ``"image"``, or an image and label of different spatial shapes.
    """
    item: dict[str, Any] = {"image": read_image(image, max_bytes=max_bytes)}
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


# ------------------------------------------------------------------------------- preprocessing
def _floats(value: Any, name: str, count: int | None = None) -> list[float]:
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"preprocess.{name} must be a number or a list of numbers, got {value!r}") from None
    if count is not None and len(out) != count:
        raise ValueError(f"preprocess.{name} must have {count} numbers, got {value!r}")
    return out


def build_preprocess(config: Mapping[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Build the preprocessing of a small config from MONAI dictionary transforms.

    Steps, applied in this order when present:

    - ``orientation``: axis codes such as ``"RAS"`` (``Orientationd``; image and label).
    - ``spacing``: target voxel spacing, e.g. ``[1.0, 1.0, 2.0]`` (``Spacingd``; bilinear for the
      image, nearest for the label).
    - ``intensity``: one of ``{"range": [a_min, a_max], "to": [0, 1], "clip": true}``
      (``ScaleIntensityRanged``), ``{"scale": [min, max]}`` (``ScaleIntensityd``) or
      ``{"normalize": true, "nonzero": false}`` (``NormalizeIntensityd``); image only.
    - ``size``: spatial size to crop or pad to, centred (``ResizeWithPadOrCropd``; image and label).

    Args:
        config: the mapping (e.g. read from JSON or YAML).

    Returns:
        A callable on ``{"image": ..., "label": ...}`` dicts (``label`` optional).

    Raises:
        ValueError: unknown keys or malformed values (named as ``preprocess.<key>``).

    Example:
        >>> import torch
        >>> pre = build_preprocess({"intensity": {"range": [0, 100], "clip": True}, "size": [4, 4]})
        >>> out = pre({"image": torch.full((1, 2, 6), 50.0)})
        >>> tuple(out["image"].shape), float(out["image"].max())
        ((1, 4, 4), 0.5)
    """
    from monai.transforms import (
        Compose,
        NormalizeIntensityd,
        Orientationd,
        ResizeWithPadOrCropd,
        ScaleIntensityd,
        ScaleIntensityRanged,
        Spacingd,
    )

    if not isinstance(config, Mapping):
        raise ValueError(f"preprocess must be a mapping with keys {list(PREPROCESS_KEYS)}, got {type(config).__name__}")
    unknown = sorted(set(config) - set(PREPROCESS_KEYS))
    if unknown:
        raise ValueError(f"preprocess: unknown key(s) {unknown}; expected some of {list(PREPROCESS_KEYS)}")
    both = dict(keys=["image", "label"], allow_missing_keys=True)
    steps: list[Any] = []
    if config.get("orientation") is not None:
        codes = config["orientation"]
        if not isinstance(codes, str) or not codes.isalpha():
            raise ValueError(f"preprocess.orientation must be axis codes such as 'RAS', got {codes!r}")
        steps.append(Orientationd(axcodes=codes.upper(), **both))
    if config.get("spacing") is not None:
        pixdim = _floats(config["spacing"], "spacing")
        if any(v <= 0 for v in pixdim):
            raise ValueError(f"preprocess.spacing must be positive, got {config['spacing']!r}")
        steps.append(Spacingd(keys="image", pixdim=pixdim, mode="bilinear"))
        steps.append(Spacingd(keys="label", pixdim=pixdim, mode="nearest", allow_missing_keys=True))
    if config.get("intensity") is not None:
        steps.append(_intensity_step(config["intensity"], ScaleIntensityRanged, ScaleIntensityd, NormalizeIntensityd))
    if config.get("size") is not None:
        size = config["size"]
        sizes = size if isinstance(size, (list, tuple)) else [size]
        if not sizes or not all(isinstance(s, int) and s > 0 for s in sizes):
            raise ValueError(f"preprocess.size must be a list of positive integers, got {size!r}")
        steps.append(ResizeWithPadOrCropd(spatial_size=list(sizes), **both))
    compose = Compose(steps)

    def preprocess(item: dict[str, Any]) -> dict[str, Any]:
        return compose(dict(item))

    preprocess.config = dict(config)  # type: ignore[attr-defined]
    return preprocess


def _intensity_step(spec: Any, range_cls: Any, scale_cls: Any, normalize_cls: Any) -> Any:
    if not isinstance(spec, Mapping):
        raise ValueError(f"preprocess.intensity must be a mapping with 'range', 'scale' or 'normalize', got {spec!r}")
    kinds = [k for k in ("range", "scale", "normalize") if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"preprocess.intensity needs exactly one of 'range', 'scale', 'normalize', got keys {sorted(spec)}")
    allowed = {"range": {"range", "to", "clip"}, "scale": {"scale"}, "normalize": {"normalize", "nonzero"}}[kinds[0]]
    extra = sorted(set(spec) - allowed)
    if extra:
        raise ValueError(f"preprocess.intensity: unknown key(s) {extra} with {kinds[0]!r}; allowed {sorted(allowed)}")
    if kinds[0] == "range":
        a_min, a_max = _floats(spec["range"], "intensity.range", 2)
        b_min, b_max = _floats(spec.get("to", [0.0, 1.0]), "intensity.to", 2)
        if a_max == a_min:
            raise ValueError(f"preprocess.intensity.range must have two different values, got {spec['range']!r}")
        return range_cls(keys="image", a_min=a_min, a_max=a_max, b_min=b_min, b_max=b_max, clip=bool(spec.get("clip", False)))
    if kinds[0] == "scale":
        lo, hi = _floats(spec["scale"], "intensity.scale", 2)
        return scale_cls(keys="image", minv=lo, maxv=hi)
    if not spec["normalize"]:
        raise ValueError("preprocess.intensity.normalize must be true when given")
    return normalize_cls(keys="image", nonzero=bool(spec.get("nonzero", False)))


def load_preprocess(
    spec: str | os.PathLike | Mapping[str, Any] | Callable[[dict[str, Any]], dict[str, Any]] | None,
    *,
    argument: str = "--preprocess",
) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    """The preprocessing named by ``spec``: None; a config mapping; a ``.json`` / ``.yaml`` / ``.yml``
    file with that config; a callable; or ``file.py:fn`` / ``package.module:fn``.

    A callable takes ``{"image": MetaTensor (C, *S), "label": MetaTensor (when paired)}`` and
    returns the same kind of dict (a MONAI ``Compose`` of dictionary transforms fits).

    Raises:
        ValueError: a missing file, a malformed config, or YAML without PyYAML installed.

    Example:
        >>> load_preprocess(None) is None
        True
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return build_preprocess(spec)
    if callable(spec):
        return spec
    text = os.fspath(spec)
    lower = text.lower()
    if lower.endswith((".json", ".yaml", ".yml")):
        path = Path(text).expanduser()
        if not path.is_file():
            raise ValueError(f"{argument}: file {text!r} not found")
        raw = path.read_text()
        if lower.endswith(".json"):
            try:
                config = json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"{argument}: {text} is not valid JSON: {exc}") from exc
        else:
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{argument}: reading YAML needs PyYAML (pip install pyyaml); or write the config as JSON") from None
            try:
                config = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                raise ValueError(f"{argument}: {text} is not valid YAML: {exc}") from exc
        try:
            return build_preprocess(config or {})
        except ValueError as exc:
            raise ValueError(f"{argument}: {text}: {exc}") from exc
    from segability.io.models import load_callable

    return load_callable(text, argument=argument)
