"""Prototype segmentation (ProtoSeg) and the segmentation ability (SA) score, on tensors.

This is the functional core of segability: tensors in, tensors out, on the input's device, for 1, 2
or 3 spatial dimensions. Notation: features ``F`` (B, C, *s), guide ``G`` (B, K, *S), optional mask
``M`` (B, 1, *S). Features whose spatial size ``s`` differs from the guide's ``S`` are (conceptually)
resized to ``S`` by linear interpolation with ``align_corners=False``. The resize is never applied
to all channels: since it is linear, the prototypes are taken at the features' resolution against
the adjoint-resized guide, and the class logits are projected to K channels before resizing. The
result equals the direct computation up to floating-point rounding (``docs/performance.md``).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch

from segability.core.resize import resize, resize_adjoint, resize_adjoint_ones

__all__ = [
    "UndefinedPrototypeWarning",
    "prototypes",
    "protoseg",
    "protoseg_units",
    "sa_score",
    "dice_from_counts",
    "class_weights",
    "prototypes_from_weights",
    "low_resolution_weights",
    "class_logits",
    "unit_overlaps",
    "undefined_images",
    "validate_features",
    "validate_guide",
]

EmptyRule = Literal["one", "nan"]

# Elements of one chunk of resized unit maps (B x channels x prod(S)); ~64 MB in float32. On CPU
# a chunk that stays in cache is faster (measured 1.5-3.5x with benchmarks/bench_protoseg.py).
DEFAULT_CHUNK_ELEMENTS = 16 * 2**20
CPU_CHUNK_ELEMENTS = 2**20


class UndefinedPrototypeWarning(UserWarning):
    """A guide has no target (or no background) weight inside the mask for some image."""


# --------------------------------------------------------------------------------------- checks
def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def validate_features(features: torch.Tensor, name: str = "features") -> None:
    """Raise ``ValueError`` unless ``features`` is a finite floating (B, C, *S) tensor, 1-3D."""
    if not isinstance(features, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, C, *spatial), got {type(features).__name__}")
    if features.ndim not in (3, 4, 5):
        raise ValueError(
            f"{name} must have shape (B, C, *spatial) with 1, 2 or 3 spatial dims, got shape {_shape(features)}"
        )
    if not features.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {features.dtype}")
    # One pass: NaN propagates through aminmax and +-Inf shows as an extreme.
    lo, hi = (float(v) for v in torch.aminmax(features))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} {_shape(features)} contains NaN or Inf values")


def validate_guide(
    guide: torch.Tensor, features: torch.Tensor, name: str = "guide", *, channels: int | None = None
) -> None:
    """Raise ``ValueError`` unless ``guide`` is a finite (B, K, *S) tensor in [0, 1] matching ``features``."""
    if not isinstance(guide, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, K, *spatial), got {type(guide).__name__}")
    if guide.ndim != features.ndim:
        raise ValueError(
            f"{name} must have the same number of dimensions as features: {name} {_shape(guide)}, "
            f"features {_shape(features)}"
        )
    if guide.shape[0] != features.shape[0]:
        raise ValueError(
            f"{name} and features must have the same batch size: {name} {_shape(guide)}, features {_shape(features)}"
        )
    if channels is not None and guide.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channel(s), got shape {_shape(guide)}")
    g = guide if guide.is_floating_point() else guide.to(torch.float32)
    lo, hi = (float(v) for v in torch.aminmax(g))  # one pass; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} {_shape(guide)} contains NaN or Inf values")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} {_shape(guide)} values must lie in [0, 1], got min {lo:g} and max {hi:g}")


def _validate_mask(mask: torch.Tensor, guide: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a torch.Tensor of shape (B, 1, *spatial), got {type(mask).__name__}")
    expected = (guide.shape[0], 1, *guide.shape[2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask must have shape {expected} (guide is {_shape(guide)}), got {_shape(mask)}")
    m = mask if mask.is_floating_point() else mask.to(torch.float32)
    lo, hi = (float(v) for v in torch.aminmax(m))
    if not (lo >= 0.0 and hi <= 1.0):  # also False for NaN
        raise ValueError(f"mask {_shape(mask)} values must be finite and lie in [0, 1]")


def _prepare(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    validate_features(features)
    validate_guide(guide, features)
    if mask is not None:
        _validate_mask(mask, guide)
        mask = mask.to(device=features.device, dtype=_compute_dtype(features))
    feats = features.to(_compute_dtype(features))
    return feats, guide.to(device=features.device, dtype=feats.dtype), mask


def _compute_dtype(features: torch.Tensor) -> torch.dtype:
    # Half precision sums over millions of pixels are too coarse; compute those in float32.
    return features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32


# ---------------------------------------------------------------------------------- internals
def class_weights(guide: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class pixel weights (B, K, *S): ``[1 - G, G]`` for a one-channel guide, else ``G``; times mask."""
    weights = torch.cat([1.0 - guide, guide], dim=1) if guide.shape[1] == 1 else guide
    return weights if mask is None else weights * mask


def undefined_images(weights: torch.Tensor) -> torch.Tensor:
    """Boolean (B,): images for which some class has zero total weight (undefined prototype)."""
    return (weights.flatten(2).sum(-1) <= 0).any(dim=1)


def prototypes_from_weights(features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean features (B, K, C) of ``features`` resized to the weights' grid.

    Computed at the features' resolution against the adjoint-resized weights. Classes with zero
    total weight get NaN prototypes.
    """
    total = weights.flatten(2).sum(-1)  # (B, K)
    low = resize_adjoint(weights, features.shape[2:])  # (B, K, *s)
    sums = torch.bmm(low.flatten(2), features.flatten(2).transpose(1, 2))  # (B, K, C)
    protos = sums / total.unsqueeze(-1)
    return torch.where((total > 0).unsqueeze(-1), protos, torch.full_like(protos, math.nan))


def low_resolution_weights(
    guide: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``resize_adjoint`` of the class weights (B, K, *size) and their totals (B, K), without building them.

    Same as ``resize_adjoint(class_weights(guide, mask), size)``; for a one-channel guide the
    background is derived as ``U^T M - U^T (G M)`` instead of materialising ``(1 - G) M``.
    """
    gm = guide if mask is None else guide * mask
    low, total = resize_adjoint(gm, size), gm.flatten(2).sum(-1)
    if guide.shape[1] != 1:
        return low, total
    if mask is None:
        m_low = resize_adjoint_ones(guide.shape[2:], size, dtype=guide.dtype, device=guide.device)
        m_low = m_low.expand_as(low)
        m_total = torch.full_like(total, float(math.prod(guide.shape[2:])))
    else:
        m_low, m_total = resize_adjoint(mask, size), mask.flatten(2).sum(-1)
    return torch.cat([m_low - low, low], dim=1), torch.cat([m_total - total, total], dim=1)


def _prototypes_low(features: torch.Tensor, low: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    sums = torch.bmm(low.flatten(2), features.flatten(2).transpose(1, 2))  # (B, K, C)
    protos = sums / total.unsqueeze(-1)
    return torch.where((total > 0).unsqueeze(-1), protos, torch.full_like(protos, math.nan))


def class_logits(features: torch.Tensor, protos: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Negated squared distances to the prototypes, up to a per-pixel constant, at ``size``: (B, K, *S).

    ``-||u - p_k||^2 = 2 u.p_k - ||p_k||^2 - ||u||^2``; the last term is the same for every class and
    cancels in the softmax, and the rest is linear in ``u``, so it is projected to K channels at the
    features' resolution and only those K channels are resized.

    Features and prototypes are first centred on the prototypes' mean ``c`` (this changes the
    logits by a per-pixel constant only). Without it, features sharing a large offset (e.g. after a
    ReLU) make ``2 u.p_k`` and ``||p_k||^2`` huge and nearly equal, and float32 loses the
    difference between classes. The centred copy is made a chunk of channels at a time.
    """
    b, _, *spatial = features.shape
    return resize(_low_logits(features, protos, size).reshape(b, protos.shape[1], *spatial), size)


def _low_logits(features: torch.Tensor, protos: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(B, K, s) centred class logits at the features' resolution (see :func:`class_logits`).

    The centred copy is made in chunks of at most half a resized channel (``B * prod(size) / 2``
    elements) or :data:`DEFAULT_CHUNK_ELEMENTS` (64 MB of float32), whichever is larger: small
    enough never to outweigh much the resized channel per class that follows, large enough that a
    full-resolution layer is not projected one channel at a time (ten times slower in 3D).
    """
    c = features.shape[1]
    center = protos.mean(1, keepdim=True)  # (B, 1, C); NaN for undefined images, as it should be
    p = protos - center
    flat = features.flatten(2)
    budget = max(flat.shape[0] * math.prod(size) // 2, DEFAULT_CHUNK_ELEMENTS)
    step = max(1, min(c, budget // max(1, flat.shape[0] * flat.shape[2])))
    low = None
    for s in range(0, c, step):
        part = torch.bmm(p[:, :, s : s + step], flat[:, s : s + step] - center[:, 0, s : s + step, None])
        low = part if low is None else low + part
    return 2.0 * low - (p * p).sum(-1, keepdim=True)


def _logit_difference(features: torch.Tensor, protos: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """(B, 1, *S) target minus background logit of a two-class guide; only this channel is resized."""
    b, _, *spatial = features.shape
    low = _low_logits(features, protos, size)  # (B, 2, s)
    return resize((low[:, 1:2] - low[:, 0:1]).reshape(b, 1, *spatial), size)


def _warn_or_raise(bad: torch.Tensor, strict: bool, what: str) -> None:
    if not bool(bad.any()):
        return
    idx = torch.nonzero(bad).flatten().tolist()
    msg = (
        f"the guide has no target or no background weight inside the mask for image index(es) {idx}: "
        f"their prototypes are undefined, so their {what} are NaN"
    )
    if strict:
        raise ValueError(msg + " (strict=True)")
    warnings.warn(msg, UndefinedPrototypeWarning, stacklevel=3)


def _unit_margins(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """(B, C, *s): positive where a unit's value is strictly closer to its target prototype.

    For one channel, ``|u - p_b| > |u - p_t|  <=>  (u - (p_t + p_b) / 2) * (p_t - p_b) > 0``; that
    expression is affine in ``u``, so it commutes with the linear resize.
    """
    p_b, p_t = protos[:, 0], protos[:, 1]  # (B, C)
    view = (*p_b.shape, *([1] * (features.ndim - 2)))
    return (features - ((p_t + p_b) / 2).reshape(view)) * (p_t - p_b).reshape(view)


def _chunk_channels(
    batch: int, channels: int, size: tuple[int, ...], chunk_size: int | None, device: torch.device
) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of channels, got {chunk_size}")
        return chunk_size
    per_channel = max(1, batch * math.prod(size))
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else DEFAULT_CHUNK_ELEMENTS
    return max(1, min(channels, budget // per_channel))


def unit_overlaps(
    features: torch.Tensor,
    protos: torch.Tensor,
    references: torch.Tensor,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlap counts of every unit's binary map with R references, without storing the maps.

    Args:
        features: (B, C, *s).
        protos: (B, 2, C) background and target prototypes.
        references: (B, R, *S) binary reference masks at the guide's resolution.
        chunk_size: channels resized at once (bounds memory); automatic when None.

    Returns:
        ``(intersection (B, R, C), unit map sizes (B, C))``.
    """
    b, c, *_ = features.shape
    size = tuple(references.shape[2:])
    margins = _unit_margins(features, protos)
    refs = references.to(features.dtype).flatten(2)  # (B, R, N)
    step = _chunk_channels(b, c, size, chunk_size, features.device)
    inters, sizes = [], []
    for start in range(0, c, step):
        # In place: 1.0 / 0.0 in the features' dtype, no bool map and no copy (margins is ours).
        maps = resize(margins[:, start : start + step], size).gt_(0).flatten(2)
        sizes.append(maps.sum(-1))
        inters.append(torch.bmm(refs, maps.transpose(1, 2)))
    return torch.cat(inters, dim=2), torch.cat(sizes, dim=1)


def dice_from_counts(
    intersection: torch.Tensor, size_a: torch.Tensor, size_b: torch.Tensor, empty: EmptyRule = "one"
) -> torch.Tensor:
    """``2 |A n B| / (|A| + |B|)``; when both are empty, 1.0 (``empty="one"``) or NaN (``"nan"``)."""
    if empty not in ("one", "nan"):
        raise ValueError(f'empty must be "one" or "nan", got {empty!r}')
    denom = size_a + size_b
    fill = 1.0 if empty == "one" else math.nan
    return torch.where(denom > 0, 2.0 * intersection / denom.clamp_min(1e-12), torch.full_like(denom, fill))


# ------------------------------------------------------------------------------------- public
def prototypes(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None, *, strict: bool = False
) -> torch.Tensor:
    """Class prototypes: the guide-weighted mean feature of each class.

    ``p_k = sum_x F(x) W_k(x) / sum_x W_k(x)`` with ``W = [1 - G, G] * M`` for a one-channel guide
    (background first) and ``W = G * M`` for a K-channel guide. Features at another spatial size
    than the guide are resized to it (linear interpolation, ``align_corners=False``) first.

    Args:
        features: (B, C, *S') feature maps, 1-3 spatial dims.
        guide: (B, 1, *S) target probability (or label), or (B, K, *S) class probabilities, in [0, 1].
        mask: optional (B, 1, *S) weights in [0, 1] of the pixels that count.
        strict: raise instead of warning when a prototype is undefined.

    Returns:
        (B, K, C) prototypes, K = 2 for a one-channel guide; NaN for images whose guide has no
        weight in some class (a warning names them).

    Raises:
        ValueError: on malformed inputs (names the argument and its shape), or an undefined
            prototype when ``strict=True``.

    Example:
        >>> import torch, segability
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> segability.prototypes(f, g)
        tensor([[[0.],
                 [3.]]])
    """
    feats, guide, mask = _prepare(features, guide, mask)
    low, total = low_resolution_weights(guide, mask, tuple(feats.shape[2:]))
    bad = (total <= 0).any(dim=1)
    _warn_or_raise(bad, strict, "prototypes")
    protos = _prototypes_low(feats, low, total)
    protos[bad] = math.nan  # the whole image, as documented, not only its empty class
    return protos.to(features.dtype)


def protoseg(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None, *, strict: bool = False
) -> torch.Tensor:
    """Prototype segmentation: soft assignment of every pixel to the nearest class prototype.

    The probability of class k at pixel x is the softmax over classes of ``-||F(x) - p_k||^2``
    (see :func:`prototypes`); the binary feature segmentation map is its argmax over channels. The
    mask only shapes the prototypes: every pixel gets a probability.

    Args:
        features: (B, C, *S') feature maps, 1-3 spatial dims, any spatial size.
        guide: (B, 1, *S) or (B, K, *S) in [0, 1].
        mask: optional (B, 1, *S) in [0, 1].
        strict: raise instead of warning when a prototype is undefined.

    Returns:
        (B, 2, *S) probabilities (channel 0 background, 1 target) for a one-channel guide, else
        (B, K, *S); same dtype and device as ``features``; NaN for images with an undefined prototype.

    Raises:
        ValueError: on malformed inputs, or an undefined prototype when ``strict=True``.

    Example:
        >>> import torch, segability
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> segability.protoseg(f, g).argmax(1)
        tensor([[0, 0, 1, 1]])
    """
    feats, guide, mask = _prepare(features, guide, mask)
    low, total = low_resolution_weights(guide, mask, tuple(feats.shape[2:]))
    _warn_or_raise((total <= 0).any(dim=1), strict, "probabilities")
    protos = _prototypes_low(feats, low, total)
    size = tuple(guide.shape[2:])
    if protos.shape[1] != 2:
        return torch.softmax(class_logits(feats, protos, size), dim=1).to(features.dtype)
    # Two classes: the softmax is the sigmoid of the logit difference, so one channel is resized
    # and the K-channel logits are never built.
    d = _logit_difference(feats, protos, size)  # (B, 1, *S)
    out = torch.empty((d.shape[0], 2, *size), dtype=d.dtype, device=d.device)
    torch.sigmoid(d, out=out[:, 1:2])
    torch.sigmoid(d.neg_(), out=out[:, 0:1])
    return out.to(features.dtype)


def protoseg_units(
    features: torch.Tensor,
    guide: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    strict: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Binary target map of every unit (channel) on its own, all units at once.

    Unit c is the one-channel feature ``F[:, c]``: its prototypes are the c-th components of
    :func:`prototypes`, and a pixel is target when it is strictly nearer the target prototype
    (equal to :func:`protoseg` run on that channel alone, then argmax).

    Args:
        features: (B, C, *S') feature maps.
        guide: (B, 1, *S) target probability or label in [0, 1].
        mask: optional (B, 1, *S) in [0, 1].
        strict: raise instead of warning when a prototype is undefined.
        chunk_size: channels resized at once; automatic when None.

    Returns:
        (B, C, *S) tensor of 0.0 / 1.0 in the features' dtype; NaN for images with an undefined
        prototype.

    Example:
        >>> import torch, segability
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0], [5.0, 5.0, 0.0, 0.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> segability.protoseg_units(f, g)
        tensor([[[0., 0., 1., 1.],
                 [0., 0., 1., 1.]]])
    """
    feats, guide, mask = _prepare(features, guide, mask)
    if guide.shape[1] != 1:
        raise ValueError(
            f"protoseg_units takes a one-channel guide (B, 1, *spatial), got {_shape(guide)}; "
            "for class k of a multi-class guide pass guide[:, k:k+1]"
        )
    low, total = low_resolution_weights(guide, mask, tuple(feats.shape[2:]))
    bad = (total <= 0).any(dim=1)
    _warn_or_raise(bad, strict, "unit maps")
    protos = _prototypes_low(feats, low, total)
    margins = _unit_margins(feats, protos)
    size = tuple(guide.shape[2:])
    step = _chunk_channels(feats.shape[0], feats.shape[1], size, chunk_size, feats.device)
    out = torch.cat(
        [resize(margins[:, s : s + step], size).gt_(0) for s in range(0, feats.shape[1], step)], dim=1
    )
    out[bad] = math.nan
    return out.to(features.dtype)


def sa_score(
    segmentation: torch.Tensor, reference: torch.Tensor, *, empty: EmptyRule = "one"
) -> torch.Tensor:
    """Segmentation ability score: Dice of binary maps, per image.

    ``SA = 2 |S n R| / (|S| + |R|)`` over all channels and pixels of each image. When both maps are
    empty the score is 1.0 (``empty="one"``, as MONAI ``DiceMetric(ignore_empty=False)``) or NaN
    (``empty="nan"``). An empty reference with a non-empty segmentation scores 0. NaN anywhere in an
    image's segmentation (an undefined prototype) gives NaN.

    Args:
        segmentation: (B, ...) binary map (bool, integer or float 0/1).
        reference: same shape, binary.
        empty: the convention for two empty maps.

    Returns:
        (B,) float tensor (float64 if either input is float64, else float32).

    Example:
        >>> import torch, segability
        >>> s = torch.tensor([[1, 1, 0, 0]])
        >>> r = torch.tensor([[1, 0, 0, 0]])
        >>> segability.sa_score(s, r)
        tensor([0.6667])
    """
    for name, t in (("segmentation", segmentation), ("reference", reference)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim < 1:
            raise ValueError(f"{name} must have a batch dimension, got a scalar")
    if segmentation.shape != reference.shape:
        raise ValueError(
            f"segmentation and reference must have the same shape, got {_shape(segmentation)} and {_shape(reference)}"
        )
    dtype = torch.float64 if torch.float64 in (segmentation.dtype, reference.dtype) else torch.float32
    # reshape, not flatten(1): a (B,) input (one value per image) has no dimension 1.
    seg = segmentation.to(dtype).reshape(segmentation.shape[0], -1)
    ref = reference.to(device=segmentation.device, dtype=dtype).reshape(reference.shape[0], -1)
    if bool(torch.isinf(seg).any()):
        raise ValueError(f"segmentation {_shape(segmentation)} contains Inf values")
    for name, t in (("segmentation", seg), ("reference", ref)):
        finite = t[torch.isfinite(t)]
        if bool(((finite != 0) & (finite != 1)).any()):
            raise ValueError(f"{name} must be binary (0/1); threshold probabilities first")
    if not bool(torch.isfinite(ref).all()):
        raise ValueError("reference contains NaN or Inf values")
    undefined = torch.isnan(seg).any(dim=1)
    seg = torch.nan_to_num(seg, nan=0.0)
    dice = dice_from_counts((seg * ref).sum(1), seg.sum(1), ref.sum(1), empty)
    return torch.where(undefined, torch.full_like(dice, math.nan), dice)
