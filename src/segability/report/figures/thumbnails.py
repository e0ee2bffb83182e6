"""Map thumbnails: a kept image's slice with a map over it, as small palette PNGs.

An overlay is the MONAI ``blend_images`` rule (:func:`blend`), so a map reads as it does in MONAI's
own tools. :class:`SliceView` cuts every map of an image the same way (slice, crop, size).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import matplotlib
import numpy as np
from PIL import Image

from segability.report.figures.colors import COLORS

__all__ = ["blend", "pick_slice", "focus_box", "SliceView", "overlay_png", "probability_png"]

MAP_CMAP = "cividis"  # a kept map is drawn in cividis(1.0), a light yellow
THUMB_SIDE = 192  # long side of a map thumbnail, pixels (smaller images are enlarged)
CROP_FRACTION = 0.5  # zoom in when the part around the target is at most this fraction of the image
CROP_MARGIN = 1.0  # margin on each side of the target's box, as a fraction of its long side
CROP_MIN_SIDE = 48  # pixels of the image shown around a target, at least


def _rescale(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(a)), float(np.max(a))
    return (a - lo) / (hi - lo) if hi > lo else a - lo


def blend(
    image: np.ndarray,
    label: np.ndarray,
    alpha: float | np.ndarray = 0.5,
    cmap: str = MAP_CMAP,
    rescale_arrays: bool = True,
    transparent_background: bool = True,
) -> np.ndarray:
    """Blend an image (C=1 or 3, *S) and a label (1, *S) as MONAI's ``blend_images`` does.

    The label is coloured by ``cmap`` and weighted by ``alpha``; with ``transparent_background``
    the label's zeros leave the image as it is.

    Args:
        image: (1 or 3, *S) array.
        label: (1, *S) array.
        alpha: weight of the label colour (scalar or array shaped like ``label``).
        cmap: matplotlib colour map name for the label.
        rescale_arrays: rescale both arrays to [0, 1] first (min-max).
        transparent_background: label zeros get weight 0.

    Returns:
        (3, *S) RGB array.

    Raises:
        ValueError: shapes that do not fit together.

    Example:
        >>> img = np.array([[[0.0, 1.0]]])
        >>> lab = np.array([[[0.0, 1.0]]])
        >>> blend(img, lab, alpha=1.0, cmap="gray")[:, 0]
        array([[0., 1.],
               [0., 1.],
               [0., 1.]])
    """
    image = np.asarray(image, dtype=float)
    label = np.asarray(label, dtype=float)
    if label.shape[0] != 1:
        raise ValueError(f"label must have 1 channel, got shape {label.shape}")
    if image.shape[0] not in (1, 3):
        raise ValueError(f"image must have 1 or 3 channels, got shape {image.shape}")
    if image.shape[1:] != label.shape[1:]:
        raise ValueError(f"image {image.shape} and label {label.shape} differ in spatial size")
    if rescale_arrays:
        image, label = _rescale(image), _rescale(label)
    if image.shape[0] == 1:
        image = np.repeat(image, 3, axis=0)
    rgb = np.moveaxis(matplotlib.colormaps[cmap](label[0]), -1, 0)[:3]
    w = np.array(alpha, dtype=float) * np.ones_like(label)
    if transparent_background:
        w[label == 0] = 0
    return (1 - w) * image + w * rgb


def pick_slice(reference: np.ndarray | None, depth: int, slice_index: int | None = None) -> int:
    """The slice along the last axis to show for a 3D image.

    Args:
        reference: (*S) target mask (label, or prediction >= 0.5), or None.
        depth: number of slices along the last axis.
        slice_index: forced slice; None picks the slice with the largest target area (the
            middle one when the target is empty or unknown).

    Raises:
        ValueError: ``slice_index`` outside ``[0, depth)``.

    Example:
        >>> ref = np.zeros((4, 4, 3)); ref[:2, :2, 2] = 1; ref[0, 0, 1] = 1
        >>> pick_slice(ref, 3)
        2
    """
    if slice_index is not None:
        if not 0 <= slice_index < depth:
            raise ValueError(f"slice_index must be in [0, {depth}), got {slice_index}")
        return int(slice_index)
    if reference is not None:
        area = (np.asarray(reference) > 0).reshape(-1, depth).sum(axis=0)
        if area.max() > 0:
            return int(np.argmax(area))
    return depth // 2


def _resize_nearest(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if a.shape == tuple(shape):
        return a
    idx = [
        np.minimum((np.arange(n) + 0.5) * a.shape[d] / n, a.shape[d] - 1).astype(int)
        for d, n in enumerate(shape)
    ]
    return a[np.ix_(*idx)]


def _boundary(mask: np.ndarray) -> np.ndarray:
    m = np.pad(mask.astype(bool), 1)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask.astype(bool) & ~inner


GREY_LEVELS = 64  # the image is shown in 64 grey levels: overlays then fit a lossless PNG palette


def _display_shape(shape: tuple[int, int], side: int) -> tuple[int, int]:
    """Scale to ``side`` pixels on the long side (shrinking or enlarging)."""
    scale = side / max(shape)
    return (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))


def focus_box(
    mask: np.ndarray,
    fraction: float = CROP_FRACTION,
    margin: float = CROP_MARGIN,
    min_side: int = CROP_MIN_SIDE,
) -> tuple[int, int, int, int] | None:
    """The part of a 2D image to show around a small target: ``(row0, row1, col0, col1)``, ends
    exclusive; None when the target is empty or the part would span more than ``fraction`` of the
    image's long side (then the whole image is shown).

    The part is a square around the target's bounding box: the box's long side plus ``margin``
    times it on either side, at least ``min_side`` pixels, shifted to lie inside the image.

    Example:
        >>> m = np.zeros((128, 100), bool); m[40:50, 30:36] = True
        >>> focus_box(m)
        (21, 69, 9, 57)
        >>> focus_box(np.ones((10, 10), bool)) is None
        True
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    long = max(r1 - r0, c1 - c0)
    side = max(min_side, round(long * (1 + 2 * margin)))
    if side > fraction * max(mask.shape):
        return None
    box = []
    for lo, hi, size in ((r0, r1, mask.shape[0]), (c0, c1, mask.shape[1])):
        n = min(side, size)
        start = min(max(0, (lo + hi - n) // 2), size - n)
        box += [int(start), int(start + n)]
    return tuple(box)  # type: ignore[return-value]


@dataclass
class SliceView:
    """Shows the maps of one kept image as 2D arrays at thumbnail resolution.

    For a 3D image (three spatial dims) every map is cut at the same slice along its last axis
    (scaled when a map has another size); 2D images are shown whole. With ``crop``, a small target
    (``focus``: label or prediction; see :func:`focus_box`) is shown cropped to its box with a
    margin (``box``). The shown part is scaled to ``side`` pixels on its long side: shrunk by area
    averaging (the image; maps by nearest neighbour) or enlarged by nearest neighbour (pixel
    blocks, nothing smoothed).

    Args:
        image: (C, *S) image; channel 0 is shown.
        reference: (*S) target mask used for the outline and to pick the slice, or None.
        slice_index: forced slice for 3D images.
        side: long side of the thumbnails, pixels.
        focus: (*S) mask of what must be seen (label or prediction), used to crop; default
            ``reference``.
        crop: crop to a small target.

    Example:
        >>> view = SliceView(np.zeros((1, 256, 200)), side=128)
        >>> view.shape
        (128, 100)
        >>> SliceView(np.zeros((1, 100, 80)), side=192).shape
        (192, 154)
    """

    image: np.ndarray
    reference: np.ndarray | None = None
    slice_index: int | None = None
    side: int = THUMB_SIDE
    focus: np.ndarray | None = None
    crop: bool = False

    def __post_init__(self) -> None:
        img = np.asarray(self.image, dtype=float)
        if img.ndim not in (3, 4):
            raise ValueError(f"image must be (C, H, W) or (C, H, W, D), got shape {img.shape}")
        self.spatial = img.shape[1:]
        self.is_3d = img.ndim == 4
        self.depth = self.spatial[-1] if self.is_3d else 1
        self.index = pick_slice(self.reference, self.depth, self.slice_index) if self.is_3d else 0
        full = self._slice(img[0])
        self.box: tuple[int, int, int, int] | None = None
        focus = self.focus if self.focus is not None else self.reference
        if self.crop and focus is not None:
            self.box = focus_box(self._full(np.asarray(focus) > 0))
        finite = np.isfinite(full)
        lo, hi = np.percentile(full[finite], [0.5, 99.5]) if finite.any() else (0.0, 0.0)
        base = self._crop(
            np.clip((np.where(finite, full, lo) - lo) / (hi - lo), 0, 1)
            if hi > lo
            else np.zeros_like(full)
        )
        self.shape = _display_shape(base.shape, self.side)
        if base.shape[0] > self.shape[0]:  # area-like shrink of the image itself
            pil = Image.fromarray(base.astype(np.float32), "F").resize(
                self.shape[::-1], Image.Resampling.BOX
            )
            base = np.asarray(pil, dtype=float)
        else:
            base = _resize_nearest(base, self.shape)
        self.base = np.round(np.clip(base, 0, 1) * (GREY_LEVELS - 1)) / (GREY_LEVELS - 1)
        self.outline = None
        if self.reference is not None:
            self.outline = _boundary(self.cut(np.asarray(self.reference) > 0))

    def _slice(self, a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        while a.ndim > len(self.spatial) and a.shape[0] == 1:  # a (1, *S) map: drop the channel
            a = a[0]
        if a.ndim == 3:
            k = min(a.shape[-1] - 1, int((self.index + 0.5) * a.shape[-1] / self.depth))
            a = a[..., k]
        if a.ndim != 2:
            raise ValueError(f"a map must have the image's spatial dims, got shape {a.shape}")
        return a

    def _full(self, a: np.ndarray) -> np.ndarray:
        """The slice of a (*S') array at the image's in-plane size."""
        return _resize_nearest(self._slice(a), tuple(self.spatial[:2]))

    def _crop(self, a: np.ndarray) -> np.ndarray:
        if self.box is None:
            return a
        r0, r1, c0, c1 = self.box
        return a[r0:r1, c0:c1]

    def cut(self, a: np.ndarray) -> np.ndarray:
        """The 2D view of a (*S') array, cropped and resized (nearest) to the thumbnail's shape."""
        a = self._slice(a)
        if self.box is not None:
            a = self._crop(_resize_nearest(a, tuple(self.spatial[:2])))
        return _resize_nearest(a, self.shape)

    def crop_note(self) -> str | None:
        """Words for a caption when the view is cropped, else None."""
        if self.box is None:
            return None
        r0, r1, c0, c1 = self.box
        h, w = self.spatial[:2]
        return (
            f"zoomed to the label/prediction box with margin: rows {r0}–{r1 - 1}, "
            f"columns {c0}–{c1 - 1} of {h}×{w}"
        )


def _to_png(rgb: np.ndarray) -> bytes:
    """(3, H, W) float RGB in [0, 1] -> PNG bytes; a palette PNG, lossless when <= 256 colours."""
    arr = (np.clip(np.moveaxis(rgb, 0, -1), 0, 1) * 255 + 0.5).astype(np.uint8)
    packed = (
        (arr[..., 0].astype(np.uint32) << 16) | (arr[..., 1].astype(np.uint32) << 8) | arr[..., 2]
    )
    colours, index = np.unique(packed, return_inverse=True)
    if colours.size <= 256:
        img = Image.fromarray(index.reshape(packed.shape).astype(np.uint8), "P")
        palette = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1)
        img.putpalette(palette.astype(np.uint8).reshape(-1).tolist())
    else:  # a continuous overlay (probabilities): 256 colours are plenty for a thumbnail
        img = Image.fromarray(arr, "RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _with_outline(rgb: np.ndarray, outline: np.ndarray | None) -> np.ndarray:
    if outline is None:
        return rgb
    color = np.array(matplotlib.colors.to_rgb(COLORS["outline"]))[:, None]
    rgb = rgb.copy()
    rgb[:, outline] = color
    return rgb


def overlay_png(view: SliceView, mask: np.ndarray | None, outline: bool = True) -> bytes:
    """The image with a binary map filled in (cividis yellow) and the reference outlined.

    Args:
        view: the image's :class:`SliceView`.
        mask: (*S') binary map, or None for the image alone.
        outline: draw the reference's boundary.
    """
    base = view.base[None]
    if mask is None:
        rgb = np.repeat(base, 3, axis=0)
    else:
        m = (view.cut(mask) > 0).astype(float)[None]
        rgb = blend(base, m, alpha=0.5, cmap=MAP_CMAP, rescale_arrays=False)
    return _to_png(_with_outline(rgb, view.outline if outline else None))


def probability_png(view: SliceView, probability: np.ndarray) -> bytes:
    """The image with a probability map in viridis, weighted by the probability (0 transparent)."""
    p = np.clip(view.cut(probability).astype(float), 0, 1)[None]
    rgb = blend(view.base[None], p, alpha=0.7 * p, cmap="viridis", rescale_arrays=False)
    return _to_png(rgb)
