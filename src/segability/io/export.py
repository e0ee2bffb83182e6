"""Maps in the image's own space: the kept maps of an analysis written as NIfTI files on the input's grid.

An analysis keeps its maps (prediction, feature segmentation maps of layers and best units) on the
grid it analysed, after any preprocessing. :func:`export_maps` maps each one back to the input
file's voxel grid (nearest neighbour for label maps, linear for probabilities) and writes it with
the file's affine, so ``nibabel.load(map).affine == nibabel.load(input).affine`` and the shapes
match: the maps open as overlays of the input in 3D Slicer or ITK-SNAP.

The way back is a :class:`Geometry`: the input's affine and shape and a callable taking an array
on the analysed grid to the input's grid. :func:`file_geometry` builds it for a file read by
:func:`~segability.io.read_image` and preprocessed by a MONAI transform chain: MONAI's spatial
transforms (``Orientation``, ``Spacing``, crops, pads, resizes) keep the image's affine up to date,
so the analysed grid's affine says where each of its voxels lies in the input's world coordinates,
and one resampling (:func:`resample_grid`) undoes any chain of them. Other pipelines (nnU-Net's
crop, resample and transpose) give their own ``to_original``.

One folder per case (``<out>/<case>/``; the case is the image id without its suffix, made
file-name safe):

- ``prediction.nii.gz`` (uint8: the network's binarised prediction, probability > 0.5 on the
  analysed grid, then nearest neighbour) and ``probability.nii.gz`` (float32, linear);
- ``<layer>.nii.gz`` (uint8) per layer with a kept map;
- ``units/<layer>_unit-<u>.nii.gz`` (uint8) per kept best unit;
- with several classes (``maps[image]["classes"]``), the same per class with ``_class-<k>``
  before the suffix (``prediction_class-2.nii.gz``, ``<layer>_class-2.nii.gz``, ...); one-vs-rest
  maps of different classes may overlap, so each class has its own file; the plain names hold the
  first class, as the report shows it;
- ``maps.json``: what each file holds (kind, layer and unit names as the analysis wrote them,
  class), the image id and the input file. A later export into the same folder replaces exactly
  the files listed there.

Names are made safe: characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``,
a leading dot is dropped, and names that collide get a short hash of the original.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EXPORT_FORMATS",
    "Geometry",
    "ExportSummary",
    "resample_grid",
    "grid_geometry",
    "file_geometry",
    "export_maps",
    "export_run",
    "exported_files",
    "clear_exports",
    "case_names",
    "safe_name",
]

EXPORT_FORMATS = ("none", "nifti")
INDEX_FILE = "maps.json"
THRESHOLD = 0.5  # the readout's sigmoid binarisation (analysis.readout)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"prediction", "probability", "maps", "units"}


@dataclass(frozen=True)
class Geometry:
    """The input file's grid and the way back to it from the analysed grid.

    Attributes:
        affine: ``(n+1, n+1)`` voxel-to-world matrix of the input (RAS mm, as MONAI and nibabel
            read it); a 2D affine is written as the 4x4 one of a one-slice volume.
        shape: the input's spatial shape.
        to_original: ``to_original(array, order)`` takes an array on the analysed grid to the input's
            grid (``order`` 0: nearest neighbour, for label maps; 1: linear, for probabilities);
            None when the analysed grid is the input's grid.
        known: whether the file says where its voxels are (NIfTI, NRRD, DICOM); PNG and NumPy
            files get an identity affine.

    Example:
        >>> g = Geometry(np.eye(4), (2, 3, 4))
        >>> g.original(np.ones((2, 3, 4)), 0).shape
        (2, 3, 4)
    """

    affine: np.ndarray
    shape: tuple[int, ...]
    to_original: Callable[[np.ndarray, int], np.ndarray] | None = None
    known: bool = True

    def original(self, array: np.ndarray, order: int) -> np.ndarray:
        """``array`` (on the analysed grid) on the input's grid, checked against :attr:`shape`.

        Raises:
            ValueError: the result does not have the input's shape.
        """
        out = np.asarray(array if self.to_original is None else self.to_original(np.asarray(array), order))
        if tuple(out.shape) != tuple(self.shape):
            raise ValueError(
                f"a map of shape {tuple(np.shape(array))} maps to shape {tuple(out.shape)}, not the input's "
                f"{tuple(self.shape)}" + ("" if self.to_original else " (no to_original was given)")
            )
        return out


@dataclass
class ExportSummary:
    """What :func:`export_run` / :func:`export_maps` wrote.

    Attributes:
        folders: the case folder of each exported image id.
        files: every file written (the indexes included).
        skipped: images not exported, with the reason.
        unknown_geometry: images whose file has no geometry (identity affine written).
    """

    folders: dict[str, Path] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    unknown_geometry: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------- resampling
def _snap(m: np.ndarray, tol: float = 1e-6) -> np.ndarray:
    """Entries within ``tol`` of an integer set to it, so crops, pads, flips and integer zooms map
    voxel centres exactly (nearest neighbour must not flip at x.4999999)."""
    r = np.round(m)
    return np.where(np.abs(m - r) < tol, r, m)


def resample_grid(
    array: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int], order: int
) -> np.ndarray:
    """Resample ``array`` from the grid of ``src_affine`` onto ``dst_shape`` voxels of ``dst_affine``.

    Each destination voxel ``j`` takes the value at source coordinates
    ``inv(src_affine) @ dst_affine @ j`` (voxel centres at integer coordinates, as in NIfTI and
    MONAI): ``order`` 0 is nearest neighbour, 1 linear. A voxel less than one source voxel beyond
    the source grid takes the value at its edge; one farther out is 0.

    Args:
        array: ``(*S)`` values on the source grid.
        src_affine, dst_affine: ``(n+1, n+1)`` voxel-to-world matrices, n = ``array.ndim``.
        dst_shape: the destination's spatial shape.
        order: 0 (labels) or 1 (probabilities).

    Example:
        >>> src = np.arange(6.0).reshape(2, 3)
        >>> zoom = np.diag([0.5, 1.0, 1.0])  # the source at twice the resolution along axis 0
        >>> resample_grid(src, zoom, np.eye(3), (1, 3), 1)
        array([[0., 1., 2.]], dtype=float32)
    """
    from scipy.ndimage import affine_transform

    arr = np.asarray(array)
    n = arr.ndim
    src, dst = np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64)
    if src.shape != (n + 1, n + 1) or dst.shape != (n + 1, n + 1) or len(dst_shape) != n:
        raise ValueError(f"affines must be {n + 1}x{n + 1} and the shape {n}-D for a {n}-D array, got "
                         f"{src.shape}, {dst.shape}, {tuple(dst_shape)}")  # fmt: skip
    m = _snap(np.linalg.solve(src, dst))
    if np.allclose(m, np.eye(n + 1)) and tuple(arr.shape) == tuple(dst_shape):
        return arr.copy()
    # One edge voxel of padding: a point less than a voxel beyond the analysed grid (its extent
    # rounded to whole voxels by a resampling) takes the edge value; farther out (cropped away) is 0.
    values = np.pad(arr.astype(np.float32 if order else arr.dtype, copy=False), 1, mode="edge")
    out = affine_transform(values, m[:n, :n], offset=m[:n, n] + 1.0, output_shape=tuple(int(s) for s in dst_shape),
                           order=order, mode="constant", cval=0.0, prefilter=False)  # fmt: skip
    return out.astype(arr.dtype if order == 0 else np.float32, copy=False)


def grid_geometry(
    original_affine: np.ndarray, original_shape: Sequence[int], analysed_affine: np.ndarray, analysed_shape: Sequence[int],
    *, known: bool = True,
) -> Geometry:  # fmt: skip
    """The :class:`Geometry` of an input whose analysed grid has ``analysed_affine`` (same world)."""
    orig, ana = np.asarray(original_affine, np.float64), np.asarray(analysed_affine, np.float64)
    shape, analysed = tuple(int(s) for s in original_shape), tuple(int(s) for s in analysed_shape)
    if shape == analysed and np.allclose(_snap(np.linalg.solve(ana, orig)), np.eye(len(shape) + 1)):
        return Geometry(orig, shape, None, known)

    def to_original(array: np.ndarray, order: int) -> np.ndarray:
        if tuple(np.shape(array)) != analysed:
            raise ValueError(f"expected a map of the analysed shape {analysed}, got {tuple(np.shape(array))}")
        return resample_grid(array, ana, orig, shape, order)

    return Geometry(orig, shape, to_original, known)


def _affine_of(t: Any, ndim: int) -> np.ndarray | None:
    affine = getattr(t, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine.detach().cpu() if hasattr(affine, "detach") else affine, np.float64)
    return a if a.shape == (ndim + 1, ndim + 1) else None


def file_geometry(path: str | os.PathLike, preprocess: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> Geometry:
    """The geometry of an image file as segability reads it, and the way back from its preprocessing.

    The file is read with :func:`~segability.io.read_image` (its affine and spatial shape as MONAI
    reads them: RAS, DICOM series from their tags) and preprocessed with ``preprocess`` (as
    :func:`~segability.io.load_item` does); the preprocessed image's affine gives the way back.

    Raises:
        ValueError: the preprocessing returns an image without an affine on another grid (the way
            back is unknown), or the file cannot be read.

    Example:
        >>> import nibabel as nib, tempfile, os
        >>> f = os.path.join(tempfile.mkdtemp(), "x.nii.gz")
        >>> nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 1.0, 3.0, 1.0])), f)
        >>> g = file_geometry(f)
        >>> g.shape, np.diag(g.affine).tolist(), g.to_original is None
        ((4, 5, 6), [2.0, 1.0, 3.0, 1.0], True)
    """
    from segability.io.formats import NUMPY_SUFFIXES, RASTER_SUFFIXES, image_suffix
    from segability.io.reading import read_image

    image = read_image(path)
    n = image.ndim - 1
    shape = tuple(int(s) for s in image.shape[1:])
    known = image_suffix(path) not in (*NUMPY_SUFFIXES, *RASTER_SUFFIXES)
    affine = _affine_of(image, n) if known else None
    affine = np.eye(n + 1) if affine is None else affine
    if preprocess is None:
        return Geometry(affine, shape, None, known)
    out = preprocess({"image": image})["image"]
    analysed = tuple(int(s) for s in out.shape[1:])
    out_affine = _affine_of(out, len(analysed))
    if out_affine is None:
        if analysed != shape:
            raise ValueError(f"{Path(path).name}: the preprocessing returns an image of shape {analysed} without an affine, "
                             f"so its grid cannot be mapped back to the file's {shape}")  # fmt: skip
        return Geometry(affine, shape, None, known)
    if not known:  # the reader's own (identity) affine: the preprocessing's changes are relative to it
        read_affine = _affine_of(image, n)
        out_affine = affine @ np.linalg.solve(read_affine if read_affine is not None else np.eye(n + 1), out_affine)
    return grid_geometry(affine, shape, out_affine, analysed, known=known)


# ------------------------------------------------------------------------------------ names
def safe_name(name: str) -> str:
    """A file-name-safe form of a layer or image name: no separators, no leading dot.

    Example:
        >>> safe_name("encoder/block.1:conv"), safe_name("../x")
        ('encoder_block.1_conv', 'x')
    """
    text = _UNSAFE.sub("_", str(name)).lstrip(".")
    text = text.strip("_") or "_"
    return text[:120]


def _hashed(name: str, original: str) -> str:
    return f"{name}-{hashlib.sha1(original.encode()).hexdigest()[:6]}"


def case_names(image_ids: Sequence[str]) -> dict[str, str]:
    """The case folder of each image id: its name without the image suffix, made safe and unique.

    Example:
        >>> case_names(["vol1.nii.gz", "vol1.nrrd", "ct/2.dcm"])
        {'vol1.nii.gz': 'vol1-344478', 'vol1.nrrd': 'vol1-713440', 'ct/2.dcm': 'ct_2'}
    """
    from segability.io.formats import image_suffix

    def stem(image: str) -> str:
        suffix = image_suffix(image)
        return image[: -len(suffix)] if suffix and len(image) > len(suffix) else image

    names = {image: safe_name(stem(image)) for image in image_ids}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    return {image: _hashed(name, image) if counts[name] > 1 else name for image, name in names.items()}


class _Names:
    """Unique, safe file names within one case folder."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def take(self, stem: str, original: str, reserved: bool = False) -> str:
        name = safe_name(stem)
        if name in self.used or (reserved and name.split("_class-")[0] in _RESERVED):
            name = _hashed(name, original)
        self.used.add(name)
        return name


# ---------------------------------------------------------------------------------- writing
def _nifti_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    import nibabel as nib

    a = np.asarray(affine, np.float64)
    if a.shape == (3, 3):  # a 2D grid: one slice of a volume
        a = np.array([[a[0, 0], a[0, 1], 0.0, a[0, 2]], [a[1, 0], a[1, 1], 0.0, a[1, 2]], [0, 0, 1, 0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(np.asarray(array), a)
    img.set_qform(a, code=1)
    img.set_sform(a, code=1)
    img.header.set_xyzt_units("mm")
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def exported_files(case_folder: str | os.PathLike) -> list[Path]:
    """The files an earlier export wrote into ``case_folder`` (listed in its ``maps.json``)."""
    folder = Path(case_folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        return []
    try:
        listed = json.loads(index.read_text()).get("files", {})
    except (ValueError, AttributeError):
        return []
    out = []
    for rel in listed:
        p = (folder / rel).resolve()
        if folder.resolve() in p.parents:  # never outside the case folder, whatever the index says
            out.append(p)
    return [*out, index]


def clear_exports(out_dir: str | os.PathLike) -> int:
    """Delete what earlier exports wrote under ``out_dir`` (the files each case's ``maps.json`` lists,
    then the folders left empty); nothing else. Returns the number of files deleted."""
    out, n = Path(out_dir), 0
    if not out.is_dir():
        return 0
    for index in sorted(out.glob(f"*/{INDEX_FILE}")):
        for path in exported_files(index.parent):
            if path.is_file():
                path.unlink()
                n += 1
        for folder in (index.parent / "units", index.parent):
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return n


def _plan(entry: Mapping[str, Any]) -> list[tuple[str, np.ndarray, int, dict[str, Any]]]:
    """``(path relative to the case folder without suffix, array, order, description)`` of every map of one image."""
    names, unit_names = _Names(), _Names()
    plan: list[tuple[str, np.ndarray, int, dict[str, Any]]] = []

    def add(part: Mapping[str, Any], suffix: str, cls: Any) -> None:
        extra = {} if cls is None else {"class": cls}
        prob = part.get("prediction")
        if prob is not None:
            prob = np.asarray(prob, np.float32)
            plan.append((names.take(f"prediction{suffix}", "prediction"), (prob > THRESHOLD).astype(np.uint8), 0,
                         {"kind": "prediction", **extra}))  # fmt: skip
            plan.append((names.take(f"probability{suffix}", "probability"), prob, 1, {"kind": "probability", **extra}))
        for layer, arr in (part.get("layers") or {}).items():
            stem = names.take(f"{safe_name(layer)}{suffix}", f"{layer}{suffix}", reserved=True)
            plan.append((stem, np.asarray(arr).astype(np.uint8), 0, {"kind": "layer", "layer": str(layer), **extra}))
        for layer, units in (part.get("units") or {}).items():
            for unit, arr in units.items():
                stem = unit_names.take(f"{safe_name(layer)}_unit-{int(unit)}{suffix}", f"{layer}:{unit}{suffix}")
                plan.append((f"units/{stem}", np.asarray(arr).astype(np.uint8), 0,
                             {"kind": "unit", "layer": str(layer), "unit": int(unit), **extra}))  # fmt: skip

    add(entry, "", None)
    for cls, part in (entry.get("classes") or {}).items():
        add(part, f"_class-{safe_name(str(cls))}", cls if isinstance(cls, (int, str)) else str(cls))
    return plan


def export_maps(
    result: Any,
    out_dir: str | os.PathLike,
    geometry: Mapping[str, Geometry],
    *,
    overwrite: bool = False,
    files: Mapping[str, str] | None = None,
) -> ExportSummary:
    """Write the kept maps of ``result`` as NIfTI files on each input's own grid.

    Args:
        result: an :class:`~segability.SAResult` (its ``maps``) or the maps themselves,
            ``{image id: {"prediction", "layers", "units", optional "classes"}}``.
        out_dir: the folder for the case folders (``<run>/maps`` for ``segability analyze``).
        geometry: the :class:`Geometry` of each image to export; images without one are not
            exported (listed in ``skipped``).
        overwrite: replace files already there; without it an existing file is an error, checked
            before anything is written. The files an earlier export listed in a case's
            ``maps.json`` are removed first.
        files: the input file of each image, recorded in ``maps.json``.

    Returns:
        An :class:`ExportSummary`.

    Raises:
        FileExistsError: a file to write exists and ``overwrite`` is False.
        ValueError: a map that does not map to its input's shape.

    Example:
        >>> import tempfile
        >>> maps = {"a.nii.gz": {"prediction": np.full((2, 2, 2), 0.9), "layers": {"enc.0": np.ones((2, 2, 2))}}}
        >>> s = export_maps(maps, tempfile.mkdtemp(), {"a.nii.gz": Geometry(np.eye(4), (2, 2, 2))})
        >>> sorted(p.name for p in s.files)
        ['enc.0.nii.gz', 'maps.json', 'prediction.nii.gz', 'probability.nii.gz']
    """
    from segability.analysis.results import write_atomic

    maps = getattr(result, "maps", result)
    out = Path(out_dir)
    summary = ExportSummary()
    chosen = [image for image in maps if image in geometry]
    summary.skipped.update({image: "no geometry given" for image in maps if image not in geometry})
    summary.skipped.update({image: "no maps were kept" for image in geometry if image not in maps})
    cases = case_names(chosen)
    plans = {image: _plan(maps[image]) for image in chosen}
    if not overwrite:
        clash = [out / cases[i] / f"{rel}.nii.gz" for i in chosen for rel, *_ in plans[i]]
        clash = [p for p in [*clash, *(out / cases[i] / INDEX_FILE for i in chosen)] if os.path.lexists(p)]
        if clash:
            raise FileExistsError(f"{len(clash)} map file(s) exist already ({', '.join(map(str, clash[:3]))}); "
                                  "pass overwrite=True to replace them")  # fmt: skip
    for image in chosen:
        geo, folder = geometry[image], out / cases[image]
        written: dict[str, Any] = {}
        arrays = [(rel, geo.original(arr, order), desc) for rel, arr, order, desc in plans[image]]
        for old in exported_files(folder):
            old.unlink(missing_ok=True)
        for rel, arr, desc in arrays:
            path = folder / f"{rel}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, _nifti_bytes(arr, geo.affine))
            written[path.relative_to(folder).as_posix()] = desc
            summary.files.append(path)
        index = {"image": image, "file": (files or {}).get(image), "geometry_known": geo.known,
                 "shape": list(geo.shape), "files": written}  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        summary.files.append(write_atomic(folder / INDEX_FILE, json.dumps(index, indent=2).encode()))
        summary.folders[image] = folder
        if not geo.known:
            summary.unknown_geometry.append(image)
    return summary


def export_run(
    run: str | os.PathLike,
    *,
    preprocess: Any = None,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> ExportSummary:
    """Export the kept maps of a run folder (``segability analyze``) next to it, in ``<run>/maps``.

    Each kept image is read again from the ``file`` column of ``images.parquet`` with
    ``preprocess`` (the run's: a spec for :func:`~segability.io.load_preprocess`) to learn its
    grid; an image that cannot be read again is skipped with the reason. Files without a geometry
    (PNG, NumPy) are written with an identity affine and listed in ``unknown_geometry``.

    Raises:
        FileExistsError: see :func:`export_maps`.
        FileNotFoundError: ``run`` holds no ``images.parquet``.
    """
    from segability.analysis.results import IMAGES, MapsArchive, read_table
    from segability.io.preprocess import load_preprocess

    folder = Path(run)
    images = read_table(folder / IMAGES.file, IMAGES)
    if not (folder / "maps.npz").is_file():
        return ExportSummary()
    pre = load_preprocess(preprocess)
    file_of = dict(zip(images["image"].astype(str), images["file"].astype(str), strict=True)) if "file" in images else {}
    summary = ExportSummary()
    with MapsArchive(folder / "maps.npz") as archive:
        maps, geometry = {}, {}
        for k, image in enumerate(archive.image_ids):
            if image not in file_of:
                summary.skipped[image] = "no input file recorded in images.parquet"
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    geometry[image] = file_geometry(file_of[image], pre)
            except Exception as exc:  # a file gone or changed since the run: skip it, say why
                summary.skipped[image] = f"{type(exc).__name__}: {exc}"
                continue
            maps[image] = archive.entry(k)
    done = export_maps(maps, Path(out_dir) if out_dir is not None else folder / "maps", geometry, overwrite=overwrite,
                       files=file_of)  # fmt: skip
    done.skipped.update(summary.skipped)
    return done
