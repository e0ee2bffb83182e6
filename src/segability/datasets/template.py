"""The MNI152 2009 template that nilearn ships, read from the installed package and oriented for slicing.

nilearn's wheel contains the ICBM 2009a symmetric T1 template and its grey- and white-matter
probability maps (1 mm, skull-stripped). They are read from the installed package with nibabel,
never downloaded, and kept in memory once loaded.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["mni_template"]

_TEMPLATE_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

_FOV_MARGIN_MM = 8.0

# T1 template values are 0..255 with white matter near 222: scale so white matter is ~0.7 and
# bright lesions keep headroom below 1.
_INTENSITY_SCALE = 0.8 / 255.0


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
def _field_of_view(axis: str) -> tuple[np.ndarray, float]:
    """Centre (row, col) and side in mm of the square in-plane window around the brain."""
    _, brain = _oriented(axis)
    mask = (brain > 0.5).any(axis=0)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    centre = np.array([(rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0])
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 + 2 * _FOV_MARGIN_MM
    return centre, float(side)
