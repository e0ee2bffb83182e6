"""Brain MRI with simulated lesions, built from the MNI152 2009 template that nilearn ships.

nilearn's wheel contains the ICBM 2009a symmetric T1 template and its grey- and white-matter
probability maps (1 mm, skull-stripped). They are read from the installed package with nibabel,
never downloaded, and kept in memory once loaded.

Each generated image is a 2D slice (:func:`mni_lesions`) or a 3D cube (:func:`mni_lesions_3d`) of
the template with a small random similarity transform (rotation within +-10 degrees, scale 0.9 to
1.1, shift), 0 to 3 irregular lesions drawn inside the brain mask (grey + white matter probability
above 0.5), random intensity changes (gamma, gain, offset) and a little noise. The label is the
lesion core exactly, to the pixel: lesions are drawn on the output grid, after the geometric
transform of the anatomy, which has the same distribution as transforming them with the image
(their shapes and orientations are random) without re-thresholding an interpolated mask. The soft
border and the oedema-like halo change the image but not the label.

Train, validation and test data come from disjoint parts of the template: 2D slices are grouped in
blocks of 6 consecutive slices (block ``k % 5`` in {0, 1, 2} -> train, 3 -> val, 4 -> test), so each
split spans the anatomy; 3D cubes lie inside disjoint axial slabs (see :func:`split_slabs`).
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from segability.datasets.cache import cache_path, load_arrays, save_arrays

if TYPE_CHECKING:
    import torch

__all__ = [
    "LesionData",
    "mni_lesions",
    "mni_lesions_3d",
    "mni_template",
    "split_slices",
    "split_slabs",
    "SPLITS",
    "AXES",
]

Split = Literal["train", "val", "test"]
Axis = Literal["axial", "coronal", "sagittal"]

SPLITS: tuple[str, ...] = ("train", "val", "test")
AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Voxel axis (RAS order) that each slicing axis fixes, and the letter used in image ids.
_AXIS_INDEX = {"axial": 2, "coronal": 1, "sagittal": 0}
_AXIS_LETTER = {"axial": "z", "coronal": "y", "sagittal": "x"}

# 2D splits: blocks of consecutive eligible slices, assigned by block index modulo 5.
_BLOCK = 6
_BLOCK_SPLITS = ("train", "train", "train", "val", "test")
_MIN_AREA_2D = 0.3  # eligible slice: brain area >= this fraction of the largest slice's
# 3D splits: the brain's axial extent is cut into 5 slabs, alternating so val and test are inside.
_SLAB_SPLITS = ("train", "val", "train", "test", "train")
_MIN_AREA_3D = 0.1
_FOV_MARGIN_MM = 8.0

# T1 template values are 0..255 with white matter near 222: scale so white matter is ~0.7 and
# bright lesions keep headroom below 1.
_INTENSITY_SCALE = 0.8 / 255.0

# Lesion and appearance parameters (ranges of uniform draws unless said otherwise).
_P_EMPTY = 0.15
_N_LESIONS_P = (0.5, 0.3, 0.2)  # 1, 2 or 3 lesions
_CONTRAST = (0.14, 0.40)  # added/removed intensity at the lesion centre (white matter ~0.7)
_EDGE_SIGMA = (0.4, 1.0)  # pixels, soft border (narrower below a radius of 3 pixels)
_P_HALO = 0.3
_HALO_RATIO = (0.15, 0.3)  # halo contrast / lesion contrast
_IRREGULARITY = (0.15, 0.45)  # weight of the random field that perturbs the ellipse border
_ROTATION_DEG = 10.0
_SCALE = (0.9, 1.1)
_SHIFT_FRACTION = 0.04
_GAMMA = (0.8, 1.25)
_GAIN = (0.85, 1.15)
_OFFSET = (-0.04, 0.04)
_NOISE_STD = (0.005, 0.025)


# ------------------------------------------------------------------------------------ container
@dataclass
class LesionData:
    """Images, labels and brain masks of a generated data set, with one meta row per image.

    Attributes:
        images: float32 (N, 1, *S), intensities about [0, 1], background 0.
        labels: uint8 (N, 1, *S), 1 on the lesion cores.
        brain: uint8 (N, 1, *S), 1 inside the brain (grey + white matter probability > 0.5).
        ids: N unique strings, e.g. ``"test-z087-0003"``.
        meta: one row per image, in order: ``id``, ``split``, ``slice``, ``n_lesions``,
            ``lesion_pixels``, ``polarity`` and the drawn parameters (plus ``shift`` and
            ``severity`` for a shifted suite).

    Example:
        >>> data = mni_lesions(4, size=32, cache_dir=False)
        >>> len(data), data.images.shape, data.subset([0, 2]).ids == [data.ids[0], data.ids[2]]
        (4, (4, 1, 32, 32), True)
    """

    images: np.ndarray
    labels: np.ndarray
    brain: np.ndarray
    ids: list[str]
    meta: pd.DataFrame

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        n = len(self.ids)
        for name in ("images", "labels", "brain"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim not in (4, 5) or array.shape[1] != 1:
                raise ValueError(f"{name} must be an ndarray of shape (N, 1, *spatial) with 2 or 3 spatial dims")
            if array.shape[0] != n or array.shape[2:] != self.images.shape[2:]:
                raise ValueError(
                    f"{name} has shape {array.shape}, expected ({n}, 1, *{tuple(self.images.shape[2:])})"
                )
        if len(self.meta) != n:
            raise ValueError(f"meta must have one row per image ({n}), got {len(self.meta)}")
        if len(set(self.ids)) != n:
            raise ValueError("ids must be unique")
        self.images = self.images.astype(np.float32, copy=False)
        self.labels = self.labels.astype(np.uint8, copy=False)
        self.brain = self.brain.astype(np.uint8, copy=False)
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def spatial_dims(self) -> int:
        """2 for slices, 3 for volumes."""
        return self.images.ndim - 2

    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> LesionData:
        """The images at ``indices`` (integers, a boolean mask of length N, or a slice), copied.

        Example:
            >>> data = mni_lesions(3, size=32, cache_dir=False)
            >>> data.subset(slice(1, None)).ids == data.ids[1:]
            True
        """
        if isinstance(indices, slice):
            index = np.arange(len(self))[indices]
        else:
            index = np.asarray(indices)
            if index.dtype == bool:
                if index.shape != (len(self),):
                    raise ValueError(f"a boolean indices mask must have shape ({len(self)},), got {index.shape}")
                index = np.flatnonzero(index)
            elif index.size == 0:
                index = index.astype(np.int64)
            elif not np.issubdtype(index.dtype, np.integer):
                raise ValueError(f"indices must be integers, a boolean mask or a slice, got dtype {index.dtype}")
            index = index.reshape(-1)
            if index.size and (index.min() < -len(self) or index.max() >= len(self)):
                raise ValueError(f"indices must lie in [-{len(self)}, {len(self)}), got {index.min()}..{index.max()}")
        return LesionData(
            images=self.images[index].copy(),
            labels=self.labels[index].copy(),
            brain=self.brain[index].copy(),
            ids=[self.ids[i] for i in index],
            meta=self.meta.iloc[index].reset_index(drop=True),
        )

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` as float32 torch tensors of shape (N, 1, *S) (copies).

        Example:
            >>> x, y = mni_lesions(2, size=32, cache_dir=False).as_tensors()
            >>> x.dtype, y.dtype, tuple(y.shape)
            (torch.float32, torch.float32, (2, 1, 32, 32))
        """
        import torch

        return torch.from_numpy(self.images.copy()), torch.from_numpy(self.labels.astype(np.float32))

    @classmethod
    def concat(cls, parts: Sequence[LesionData]) -> LesionData:
        """Join data sets with the same spatial shape, in order (ids must stay unique).

        Example:
            >>> a = mni_lesions(2, size=32, cache_dir=False)
            >>> b = mni_lesions(2, split="test", size=32, cache_dir=False)
            >>> len(LesionData.concat([a, b]))
            4
        """
        parts = list(parts)
        if not parts:
            raise ValueError("parts must hold at least one LesionData")
        shapes = {p.images.shape[1:] for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"parts must share one image shape (1, *spatial), got {sorted(shapes)}")
        return cls(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            brain=np.concatenate([p.brain for p in parts]),
            ids=[i for p in parts for i in p.ids],
            meta=pd.concat([p.meta for p in parts], ignore_index=True),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to one ``.npz`` (atomically); read back with :meth:`load`."""
        arrays = {
            "images": self.images,
            "labels": self.labels,
            "brain": self.brain,
            "ids": np.asarray(self.ids, dtype=np.str_),
        }
        return save_arrays(path, arrays, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LesionData:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` is missing or not a readable data set file.
        """
        loaded = load_arrays(path)
        if loaded is None or not {"images", "labels", "brain", "ids"} <= set(loaded[0]):
            raise FileNotFoundError(f"no readable LesionData file at {path}")
        arrays, meta = loaded
        return cls(arrays["images"], arrays["labels"], arrays["brain"], arrays["ids"].tolist(), meta)


# ------------------------------------------------------------------------------------- template
def _template_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("nilearn is not installed; it ships the MNI152 template (pip install nilearn)")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def mni_template() -> tuple[np.ndarray, np.ndarray]:
    """The MNI152 2009a T1 template and its brain probability, from the installed nilearn.

    Returns:
        ``(t1, brain)``: float32 arrays of shape (197, 233, 189), RAS voxel order, 1 mm. ``t1`` is
        scaled so white matter is about 0.7 (background 0); ``brain`` is grey + white matter
        probability clipped to [0, 1]. Cached in-process; treat them as read-only.

    Raises:
        FileNotFoundError: if the installed nilearn lacks the template files.

    Example:
        >>> t1, brain = mni_template()
        >>> t1.shape, float(brain.max()) <= 1.0
        ((197, 233, 189), True)
    """
    import nibabel as nib

    folder = _template_dir()
    volumes = {}
    for key, name in _TEMPLATE_FILES.items():
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"MNI152 template file not found in the nilearn package: {path}")
        image = nib.as_closest_canonical(nib.load(path))
        volumes[key] = np.asarray(image.dataobj, dtype=np.float32)
    t1 = volumes["t1"] * np.float32(_INTENSITY_SCALE)
    brain = np.clip((volumes["gm"] + volumes["wm"]) / np.float32(255.0), 0.0, 1.0)
    t1.flags.writeable = False
    brain.flags.writeable = False
    return t1, brain


@functools.lru_cache(maxsize=3)
def _oriented(axis: str) -> tuple[np.ndarray, np.ndarray]:
    """Template stacks (slice, row, col) for one slicing axis, in display orientation.

    Axial: rows anterior -> posterior, cols left -> right; coronal and sagittal: rows superior ->
    inferior. Index 0 of the stack is voxel 0 along the fixed axis.
    """
    order = {"axial": (2, 1, 0), "coronal": (1, 2, 0), "sagittal": (0, 2, 1)}[axis]
    t1, brain = mni_template()
    out = []
    for volume in (t1, brain):
        stack = np.ascontiguousarray(np.transpose(volume, order)[:, ::-1, :])
        stack.flags.writeable = False
        out.append(stack)
    return out[0], out[1]


@functools.lru_cache(maxsize=3)
def _eligible(axis: str, min_area: float) -> np.ndarray:
    _, brain = _oriented(axis)
    area = (brain > 0.5).sum(axis=(1, 2))
    return np.flatnonzero(area >= min_area * area.max())


@functools.lru_cache(maxsize=3)
def _field_of_view(axis: str) -> tuple[np.ndarray, float]:
    """Centre (row, col) and side in mm of the square in-plane window around the brain."""
    _, brain = _oriented(axis)
    mask = (brain > 0.5).any(axis=0)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    centre = np.array([(rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0])
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 + 2 * _FOV_MARGIN_MM
    return centre, float(side)


def split_slices(split: Split = "train", axis: Axis = "axial") -> np.ndarray:
    """Template slice indices (along ``axis``) that 2D images of ``split`` are drawn from.

    Slices with at least 30% of the largest brain area are grouped in blocks of 6 consecutive
    slices; block ``k`` goes to train when ``k % 5`` is 0, 1 or 2, to val when 3, to test when 4.

    Example:
        >>> set(split_slices("train")) & set(split_slices("test"))
        set()
    """
    _check_choice("split", split, SPLITS)
    _check_choice("axis", axis, AXES)
    eligible = _eligible(axis, _MIN_AREA_2D)
    block = (eligible - eligible[0]) // _BLOCK
    names = np.array(_BLOCK_SPLITS)[block % len(_BLOCK_SPLITS)]
    return eligible[names == split]


def split_slabs(split: Split = "train") -> list[tuple[int, int]]:
    """Axial slice ranges ``[start, stop)`` (template z indices) that 3D cubes of ``split`` lie in.

    The axial extent with at least 10% of the largest brain area is cut into 5 equal slabs,
    assigned train, val, train, test, train from inferior to superior. A cube reads only voxels
    whose z index lies inside one slab of its split.

    Example:
        >>> [len(split_slabs(s)) for s in ("train", "val", "test")]
        [3, 1, 1]
    """
    _check_choice("split", split, SPLITS)
    return [slab for slab, name in zip(_slabs(), _SLAB_SPLITS, strict=True) if name == split]


def _slabs() -> list[tuple[int, int]]:
    eligible = _eligible("axial", _MIN_AREA_3D)
    thickness = (eligible[-1] - eligible[0] + 1) // len(_SLAB_SPLITS)
    start = int(eligible[0])
    return [(int(start + k * thickness), int(start + (k + 1) * thickness)) for k in range(len(_SLAB_SPLITS))]


# -------------------------------------------------------------------------------------- lesions
def _rotation(rng: np.random.Generator, ndim: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((ndim, ndim)))
    return q * np.sign(np.diag(r))


def _draw_lesions(
    rng: np.random.Generator,
    brain: np.ndarray,
    polarity: int,
    count: int,
    radius_range: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Add ``count`` lesions inside ``brain`` (bool, 2D or 3D); returns (delta, core, summary).

    A lesion core is a randomly oriented ellipsoid of radius ``r`` (log-uniform in
    ``radius_range``) whose border is perturbed by a smooth random field (kept: the component
    that holds the centre, inside the brain). The image change is ``polarity * contrast`` times
    the core blurred by a small Gaussian (soft border) with a slight internal texture, plus,
    sometimes, a fainter blurred halo around the core that is not part of the label.
    """
    ndim = brain.ndim
    delta = np.zeros(brain.shape, np.float32)
    core_all = np.zeros(brain.shape, bool)
    summary = {"contrast": 0.0, "radius": 0.0, "halo": 0.0}
    if count == 0:
        return delta, core_all, summary
    depth = ndimage.distance_transform_edt(brain)
    full = np.ones((3,) * ndim, bool)
    contrasts, radii = [], []
    for _ in range(count):
        r = float(np.exp(rng.uniform(*np.log(radius_range))))
        threshold = min(0.5 * r, 0.5 * float(depth.max()))
        candidates = np.flatnonzero(depth >= threshold)
        centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], brain.shape))
        centre_f = centre + rng.uniform(-0.5, 0.5, ndim)
        half = math.ceil(3.5 * r) + 4
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, brain.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grids = np.meshgrid(*[np.arange(a, b, dtype=np.float32) for a, b in zip(lo, hi, strict=True)], indexing="ij")
        offsets = np.stack([g - c for g, c in zip(grids, centre_f, strict=True)], axis=-1)
        axes = r * np.exp(rng.uniform(-0.35, 0.35, ndim))
        local = offsets @ _rotation(rng, ndim).T / axes
        rho2 = (local**2).sum(axis=-1)
        field = ndimage.gaussian_filter(rng.standard_normal(rho2.shape).astype(np.float32), max(0.35 * r, 0.8))
        field /= field.std() + 1e-8
        beta = rng.uniform(*_IRREGULARITY)
        brain_box = brain[box]
        core = ((1.0 - rho2 + beta * field) > 0) & brain_box
        centre_local = tuple(centre - lo)
        core[centre_local] = True  # the centre lies inside the brain (depth > 0)
        components, _ = ndimage.label(core, structure=full)
        core = components == components[centre_local]

        contrast = rng.uniform(*_CONTRAST)
        edge = rng.uniform(*_EDGE_SIGMA) * min(1.0, r / 3.0)
        profile = ndimage.gaussian_filter(core.astype(np.float32), edge) * (1.0 + 0.15 * field)
        has_halo = rng.random() < _P_HALO
        halo_ratio = rng.uniform(*_HALO_RATIO)
        halo_width = rng.uniform(0.5, 1.0) * r + 1.0
        if has_halo:
            outside = ndimage.distance_transform_edt(~core)
            halo = ndimage.gaussian_filter((outside <= halo_width).astype(np.float32), halo_width / 2)
            profile += halo_ratio * halo * brain_box
        delta[box] += polarity * contrast * profile
        core_all[box] |= core
        contrasts.append(contrast)
        radii.append(r)
        summary["halo"] = max(summary["halo"], float(has_halo))
    summary["contrast"] = float(np.mean(contrasts))
    summary["radius"] = float(np.mean(radii))
    return delta, core_all, summary


def _appearance(
    base: np.ndarray, delta: np.ndarray, rng: np.random.Generator, noise_rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, float]]:
    """Lesions in, then gamma, gain, offset and noise inside the head; background stays 0."""
    head = np.clip(base / 0.05, 0.0, 1.0)
    gamma = float(np.exp(rng.uniform(*np.log(_GAMMA))))
    gain = rng.uniform(*_GAIN)
    offset = rng.uniform(*_OFFSET)
    noise = rng.uniform(*_NOISE_STD)
    image = np.clip(base + delta * head, 0.0, None) ** gamma
    image = gain * image + offset * head
    image += noise * head * noise_rng.standard_normal(base.shape).astype(np.float32)
    params = {"gamma": gamma, "gain": gain, "offset": offset, "noise_std": noise}
    return np.clip(image, 0.0, 1.0).astype(np.float32), params


def _lesion_plan(rng: np.random.Generator) -> tuple[int, int]:
    """(number of lesions, polarity): about 15% of images have none."""
    if rng.random() < _P_EMPTY:
        return 0, 0
    count = int(rng.choice(len(_N_LESIONS_P), p=_N_LESIONS_P)) + 1
    polarity = 1 if rng.random() < 0.5 else -1
    return count, polarity


def _streams(kind: int, seed: int, split: str, axis: str, index: int) -> list[np.random.Generator]:
    sequence = np.random.SeedSequence([kind, seed, SPLITS.index(split), AXES.index(axis), index])
    return [np.random.default_rng(s) for s in sequence.spawn(4)]


def _sample_2d(
    split: str, axis: str, size: int, seed: int, index: int, source: int, *, lesions: bool = True
) -> dict[str, Any]:
    """One slice image; ``lesions=False`` gives the same image without lesions (for tests)."""
    geometry, drawing, appearance, noise = _streams(2, seed, split, axis, index)
    t1_stack, brain_stack = _oriented(axis)
    centre, side = _field_of_view(axis)
    spacing = side / size

    angle = np.deg2rad(geometry.uniform(-_ROTATION_DEG, _ROTATION_DEG))
    scale = geometry.uniform(*_SCALE)
    shift = geometry.uniform(-_SHIFT_FRACTION, _SHIFT_FRACTION, 2) * side
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    grid = (np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")) - (size - 1) / 2) * spacing
    coords = np.tensordot(rotation / scale, grid, axes=1) + (centre + shift)[:, None, None]

    t1 = t1_stack[source]
    step = spacing / scale  # source mm per output pixel: blur before sampling below 1 px/mm
    if step > 1.0:
        t1 = ndimage.gaussian_filter(t1, 0.5 * (step - 1.0))
    base = ndimage.map_coordinates(t1, coords, order=1, mode="constant", cval=0.0)
    brain = ndimage.map_coordinates(brain_stack[source], coords, order=1, mode="constant", cval=0.0) > 0.5

    count, polarity = _lesion_plan(drawing)
    radius_range = (max(1.5, 2.5 * size / 128), max(3.0, 20.0 * size / 128))
    delta, core, summary = _draw_lesions(drawing, brain, polarity, count if lesions else 0, radius_range)
    image, params = _appearance(base.astype(np.float32), delta, appearance, noise)
    meta = {
        "rotation_deg": float(np.rad2deg(angle)),
        "scale": float(scale),
        "polarity": polarity if lesions else 0,
        **summary,
        **params,
    }
    return {"image": image, "label": core, "brain": brain, "meta": meta}


def _sample_3d(split: str, size: int, seed: int, index: int, *, lesions: bool = True) -> dict[str, Any]:
    """One cube inside a slab of ``split``; ``lesions=False`` gives it without lesions."""
    geometry, drawing, appearance, noise = _streams(3, seed, split, "axial", index)
    t1_stack, brain_stack = _oriented("axial")  # (z, row, col)
    slabs = [k for k, name in enumerate(_SLAB_SPLITS) if name == split]
    slab_index = slabs[int(geometry.integers(len(slabs)))]
    z0, z1 = _slabs()[slab_index]
    edge = _SCALE[0] * (z1 - z0 - 2)  # mm: the widest field of view (edge / scale) fits the slab
    spacing = edge / size

    angle = np.deg2rad(geometry.uniform(-_ROTATION_DEG, _ROTATION_DEG))
    scale = geometry.uniform(*_SCALE)
    half = (edge / scale - spacing / scale) / 2  # distance from centre to the outer sample
    centre_z = geometry.uniform(z0 + half, z1 - 1 - half)
    plane = brain_stack[int(round(centre_z))] > 0.5
    rows, cols = np.nonzero(plane)
    pick = int(geometry.integers(rows.size))
    centre = np.array([centre_z, rows[pick], cols[pick]], dtype=np.float64)
    # Rotation about z only keeps every sample's z inside the slab.
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])
    grid = (np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij")) - (size - 1) / 2) * spacing
    coords = np.tensordot(rotation / scale, grid, axes=1) + centre[:, None, None, None]
    coords[0] = np.clip(coords[0], z0, z1 - 1)
    base = ndimage.map_coordinates(t1_stack, coords, order=1, mode="constant", cval=0.0)
    brain = ndimage.map_coordinates(brain_stack, coords, order=1, mode="constant", cval=0.0) > 0.5

    count, polarity = _lesion_plan(drawing)
    radius_range = (max(1.5, 2.0 * size / 64), max(3.0, 14.0 * size / 64))
    delta, core, summary = _draw_lesions(drawing, brain, polarity, count if lesions else 0, radius_range)
    image, params = _appearance(base.astype(np.float32), delta, appearance, noise)
    meta = {
        "slab": slab_index,
        "z_min": int(np.floor(coords[0].min())),
        "z_max": int(np.ceil(coords[0].max())),
        "slice": int(round(centre_z)),
        "rotation_deg": float(np.rad2deg(angle)),
        "scale": float(scale),
        "polarity": polarity if lesions else 0,
        **summary,
        **params,
    }
    return {"image": image, "label": core, "brain": brain, "meta": meta}


# ------------------------------------------------------------------------------------ public API
def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _assemble(samples: list[dict[str, Any]], ids: list[str], base_meta: list[dict[str, Any]]) -> LesionData:
    full = np.ones((3,) * samples[0]["label"].ndim, bool)
    rows = []
    for sample, row in zip(samples, base_meta, strict=True):
        label = sample["label"]
        rows.append(
            {
                **row,
                "n_lesions": int(ndimage.label(label, structure=full)[1]),
                "lesion_pixels": int(label.sum()),
                **sample["meta"],
            }
        )
    return LesionData(
        images=np.stack([s["image"] for s in samples])[:, None],
        labels=np.stack([s["label"] for s in samples])[:, None].astype(np.uint8),
        brain=np.stack([s["brain"] for s in samples])[:, None].astype(np.uint8),
        ids=ids,
        meta=pd.DataFrame(rows),
    )


def _cached(
    function: str,
    cache_dir: str | os.PathLike[str] | None | Literal[False],
    make: Callable[[], LesionData],
    **params: Any,
) -> LesionData:
    if cache_dir is False:
        return make()
    path = cache_path(cache_dir, function, **params)
    try:
        return LesionData.load(path)
    except FileNotFoundError:
        pass
    data = make()
    data.save(path)
    return data


def mni_lesions(
    n: int,
    split: Split = "train",
    size: int = 128,
    seed: int = 0,
    *,
    axis: Axis = "axial",
    cache_dir: str | os.PathLike[str] | None | Literal[False] = None,
) -> LesionData:
    """``n`` 2D MNI152 slices with simulated lesions and exact labels.

    Image ``i`` uses template slice ``split_slices(split, axis)[perm[i % m]]`` (a seeded
    permutation of the split's ``m`` slices) and its own random streams, so the first ``k``
    images of a set are the set made with ``n=k``. About 15% of the images have no lesion; the
    others have 1 to 3 (radius 2.5 to 20 pixels at size 128, scaled with ``size``), all brighter or
    all darker than the tissue (``meta.polarity`` +1 / -1, 0 when empty).

    Args:
        n: number of images (>= 1).
        split: ``"train"``, ``"val"`` or ``"test"``; the splits share no template slice.
        size: output side in pixels (16..512); the in-plane window covers the brain.
        seed: the same seed gives identical arrays.
        axis: slicing direction, ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        cache_dir: folder of the on-disk cache (default ``$SEGABILITY_CACHE`` or
            ``~/.cache/segability``); ``False`` generates without reading or writing a cache.

    Returns:
        A :class:`LesionData` with images (n, 1, size, size); ids like ``"train-z087-0003"``
        (split, slice letter and index, image number); meta columns ``id``, ``split``, ``axis``,
        ``slice``, ``n_lesions`` (connected lesion cores), ``lesion_pixels``, ``polarity``,
        ``contrast``, ``radius``, ``halo`` and the augmentation parameters.

    Raises:
        ValueError: on an unknown split or axis, or ``n`` / ``size`` / ``seed`` out of range.

    Example:
        >>> data = mni_lesions(8, split="val", size=64, cache_dir=False)
        >>> data.images.shape, data.labels.dtype.name, data.ids[0][:5]
        ((8, 1, 64, 64), 'uint8', 'val-z')
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 16, 512)
    seed = _check_int("seed", seed, 0)
    _check_choice("split", split, SPLITS)
    _check_choice("axis", axis, AXES)

    def make() -> LesionData:
        pool = split_slices(split, axis)
        order = np.random.default_rng([seed, SPLITS.index(split), AXES.index(axis)]).permutation(pool)
        samples, ids, rows = [], [], []
        for i in range(n):
            source = int(order[i % order.size])
            samples.append(_sample_2d(split, axis, size, seed, i, source))
            ids.append(f"{split}-{_AXIS_LETTER[axis]}{source:03d}-{i:04d}")
            rows.append({"id": ids[-1], "split": split, "axis": axis, "slice": source})
        return _assemble(samples, ids, rows)

    return _cached("mni_lesions", cache_dir, make, n=n, split=split, size=size, seed=seed, axis=axis)


def mni_lesions_3d(
    n: int,
    split: Split = "train",
    size: int = 64,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None | Literal[False] = None,
) -> LesionData:
    """``n`` 3D cubes of the MNI152 template with simulated 3D lesions and exact labels.

    Each cube is a resampled isotropic sub-volume of the 1 mm template (edge 22.5 mm, so 0.35 mm
    voxels at size 64), rotated about the axial axis only, lying inside one axial slab of its
    split (:func:`split_slabs`); ``meta`` gives its ``slab`` and the template z range
    ``z_min..z_max`` it reads. The slabs are 27 mm thick so that three splits each span the
    anatomy, which is what bounds the cube's field of view. Lesions follow the 2D rules (radius
    2 to 14 voxels at size 64).

    Args:
        n: number of cubes (>= 1).
        split: ``"train"``, ``"val"`` or ``"test"``; their slabs are disjoint.
        size: cube side in voxels (8..256).
        seed: the same seed gives identical arrays.
        cache_dir: as in :func:`mni_lesions`.

    Returns:
        A :class:`LesionData` with images (n, 1, size, size, size) in (z, row, col) order.

    Example:
        >>> data = mni_lesions_3d(2, size=16, cache_dir=False)
        >>> data.images.shape
        (2, 1, 16, 16, 16)
    """
    n = _check_int("n", n, 1)
    size = _check_int("size", size, 8, 256)
    seed = _check_int("seed", seed, 0)
    _check_choice("split", split, SPLITS)

    def make() -> LesionData:
        samples, ids, rows = [], [], []
        for i in range(n):
            sample = _sample_3d(split, size, seed, i)
            samples.append(sample)
            ids.append(f"{split}-z{sample['meta']['slice']:03d}-{i:04d}")
            rows.append({"id": ids[-1], "split": split, "axis": "3d"})
        return _assemble(samples, ids, rows)

    return _cached("mni_lesions_3d", cache_dir, make, n=n, split=split, size=size, seed=seed)
