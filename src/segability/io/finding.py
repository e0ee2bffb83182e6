"""Find the image files a folder, a glob pattern or a list names, and pair them with their labels.

A name that exists is taken literally, even when it holds ``[``, ``*`` or ``?``; only a name that
does not exist is a pattern. Labels come from a second folder and are paired with images by file
name stem (``case1.nii.gz`` and ``case1.png`` share the stem ``case1``), or by nnU-Net's raw names
(image ``case1_0000.nii.gz``, label ``case1.nii.gz``; the files ``case1_0000``, ``case1_0001``, ...
are the channels of one image); :func:`pair_labels` reports unpaired files both ways and refuses
labels of which none pairs. Files are listed here, not opened (:mod:`segability.io.intake` checks
them before they are read).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from segability.errors import UsageError
from segability.io.formats import (
    _is_dicom_file,
    _suffix_list,
    image_stem,
    image_suffix,
    is_dicom_series,
)

__all__ = ["Pairing", "find_images", "pair_labels", "PAIRING_RULES"]

# nnU-Net raw data: ``{case}_{channel:04d}`` images, ``{case}`` labels.
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
PAIRING_RULES = (
    "an image pairs with the label of the same file name stem (case1.nii.gz with case1.png), the "
    "label's stem ending in label_suffix when one is given (case1 with case1_seg for label_suffix='_seg'), "
    "or by nnU-Net's raw names (image case1_0000.nii.gz, its channels case1_0001.nii.gz, ..., with "
    "label case1.nii.gz)"
)


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
    """Images with their labels (None where an image has none) and the files left unpaired.

    ``pairs`` has one entry per image; an nnU-Net case of several channel files
    (``case1_0000.nii.gz``, ``case1_0001.nii.gz``) is one image, named by its first file, and
    ``channels`` maps that file to all of them in channel order (read them with
    :func:`~segability.io.load_item`, which stacks a list of files as channels).
    """

    pairs: list[tuple[Path, Path | None]]
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_labels: list[Path] = field(default_factory=list)
    channels: dict[Path, list[Path]] = field(default_factory=dict)

    def image_files(self, image: Path) -> Path | list[Path]:
        """The file of ``image``, or its channel files in order when it has several."""
        return self.channels.get(image, image)

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

    The rules, in order: the same stem (``case1.nii.gz`` and ``case1.png``); else nnU-Net's raw
    names, an image ``case1_0000`` with the label ``case1``. Several channel files of one nnU-Net
    case (``case1_0000``, ``case1_0001``, ...) become one image with several channels
    (``Pairing.channels``). Without labels, the files are grouped so only when every image is named
    ``{case}_{XXXX}`` and every case has the same channels ``0000, 0001, ...``, two or more.

    Args:
        images: image paths (see :func:`~segability.io.find_images`).
        labels: a folder, pattern or list of label files; None for no labels.
        label_suffix: text after the image stem in label names (``case1_seg.nii.gz`` for ``case1``).
        argument: the argument named in messages.

    Returns:
        A :class:`Pairing`: images without a label pair with None; labels without an image are
        listed in ``unpaired_labels``.

    Raises:
        UsageError: labels are given but no image pairs with any of them (a run would silently go
            label-free); the message lists image and label stems and the rules.
        ValueError: two images (or two labels) share a stem, so pairing would be ambiguous, or the
            channel files of nnU-Net cases are incomplete or differ between cases.

    Example:
        >>> from pathlib import Path
        >>> p = pair_labels([Path("a.png"), Path("b.png")], [Path("a.png"), Path("c.png")])  # doctest: +SKIP
        >>> [(i.name, l and l.name) for i, l in p.pairs], [l.name for l in p.unpaired_labels]  # doctest: +SKIP
        ([('a.png', 'a.png'), ('b.png', None)], ['c.png'])
    """
    if labels is None:
        by_stem = {image_stem(p): p for p in images}
        cases = _channel_cases(by_stem, None) if len(by_stem) == len(images) else None
        if cases is None:
            return Pairing([(p, None) for p in images])
        return _grouped(by_stem, {}, cases)
    by_stem = _unique_stems(images, "--images", "")
    label_paths = find_images(labels, argument=argument)
    label_by_stem = _unique_stems(label_paths, argument, label_suffix)
    pairing = _grouped(by_stem, label_by_stem, _channel_cases(by_stem, label_by_stem) or {})
    if len(pairing.unpaired_images) == len(pairing.pairs):
        raise UsageError(_no_pair_message(by_stem, label_by_stem, label_suffix, argument), argument=argument.lstrip("-"))
    return pairing


def _channel_cases(by_stem: dict[str, Path], label_by_stem: dict[str, Path] | None) -> dict[str, list[str]] | None:
    """nnU-Net cases: case -> its image stems in channel order.

    With labels: the images whose own stem has no label but whose case has one. Without labels
    (``label_by_stem`` None): every image, when all are named ``{case}_{XXXX}`` with the same two or
    more channels per case; else None.
    """
    cases: dict[str, dict[int, str]] = {}
    for stem in by_stem:
        match = _CHANNEL.match(stem)
        if label_by_stem is None and match is None:
            return None
        if match is None or (label_by_stem is not None and (stem in label_by_stem or match["case"] not in label_by_stem)):
            continue
        cases.setdefault(match["case"], {})[int(match["channel"])] = stem
    if label_by_stem is None and not _regular(cases, by_stem):
        return None
    for case, channels in cases.items():
        if case in by_stem:
            raise ValueError(f"--images: {by_stem[case]} and {by_stem[channels[min(channels)]]} are both images of the case {case!r}")
        if sorted(channels) != list(range(len(channels))):
            found = ", ".join(f"{c:04d}" for c in sorted(channels))
            raise ValueError(
                f"--images: the nnU-Net case {case!r} has the channel files {found}; channels are numbered 0000, 0001, ... without gaps"
            )
    counts = {len(c) for c in cases.values()}
    if len(counts) > 1:
        shown = {case: len(c) for case, c in list(cases.items())[:5]}
        raise ValueError(f"--images: nnU-Net cases have different numbers of channel files ({shown}); every case needs the same channels")
    if label_by_stem is None and (not cases or counts == {1}):
        return None
    return {case: [channels[i] for i in range(len(channels))] for case, channels in cases.items()}


def _regular(cases: dict[str, dict[int, str]], by_stem: dict[str, Path]) -> bool:
    """Every case has the channels 0000 .. N-1, the same N for all, and no image is named as a case."""
    counts = {len(c) for c in cases.values()}
    return len(counts) == 1 and all(sorted(c) == list(range(len(c))) and k not in by_stem for k, c in cases.items())


def _grouped(by_stem: dict[str, Path], label_by_stem: dict[str, Path], cases: dict[str, list[str]]) -> Pairing:
    """Pairs in image order, each nnU-Net case once (at its first channel file)."""
    case_of = {stem: case for case, stems in cases.items() for stem in stems}
    pairs: list[tuple[Path, Path | None]] = []
    channels: dict[Path, list[Path]] = {}
    used: set[str] = set()
    for stem, path in by_stem.items():
        case = case_of.get(stem)
        if case is None:
            pairs.append((path, label_by_stem.get(stem)))
            used.add(stem)
        elif stem == cases[case][0]:
            pairs.append((path, label_by_stem.get(case)))
            used.add(case)
            if len(cases[case]) > 1:
                channels[path] = [by_stem[s] for s in cases[case]]
    return Pairing(
        pairs=pairs,
        unpaired_images=[p for p, lab in pairs if lab is None],
        unpaired_labels=[p for stem, p in label_by_stem.items() if stem not in used],
        channels=channels,
    )


def _no_pair_message(by_stem: dict[str, Path], label_by_stem: dict[str, Path], label_suffix: str, argument: str) -> str:
    images, labels = list(by_stem)[:5], list(label_by_stem)[:5]
    suffix = f" (after removing label_suffix {label_suffix!r})" if label_suffix else ""
    return (
        f"{argument}: no image pairs with a label, so nothing would be scored against a label. Image stems: "
        f"{images}{' ...' if len(by_stem) > 5 else ''}; label stems{suffix}: {labels}{' ...' if len(label_by_stem) > 5 else ''}. "
        f"Pairing rules: {PAIRING_RULES}. For a label-free run, give no labels."
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
