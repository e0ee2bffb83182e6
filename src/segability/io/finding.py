"""Find the image files a folder, a glob pattern or a list names, and pair them with their labels.

A name that exists is taken literally, even when it holds ``[``, ``*`` or ``?``; only a name that
does not exist is a pattern. Labels come from a second folder and are paired with images by file
name stem (``case1.nii.gz`` and ``case1.png`` share the stem ``case1``); :func:`pair_labels`
reports unpaired files both ways. Files are listed here, not opened (:mod:`segability.io.intake`
checks them before they are read).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segability.io.formats import (
    _is_dicom_file,
    _suffix_list,
    image_stem,
    image_suffix,
    is_dicom_series,
)

__all__ = ["Pairing", "find_images", "pair_labels"]


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
        images: image paths (see :func:`~segability.io.find_images`).
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
