"""The direct (obvious) ProtoSeg and SA: the reference segability's fast path is checked and timed against.

Written from the definition in He et al. (MedIA 2023), independently of ``segability.core``: every
channel of the features is resized to the guide's size with ``F.interpolate`` (linear, bilinear or
trilinear, ``align_corners=False``), the prototypes are guide-weighted means at full resolution,
every pixel's squared distance to every prototype is computed in full, and the per-unit scores are
a Python loop over channels. It costs O(C * S) time and memory per layer (C channels, S pixels of
the guide); ``docs/performance.md`` compares it with the fast path.

Used by ``tests/test_fast_vs_direct.py`` (exactness, float64) and ``benchmarks/bench_protoseg.py``
(speed and memory).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "resize_all",
    "direct_prototypes",
    "direct_distances",
    "direct_protoseg",
    "direct_layer_sa",
    "direct_unit_maps",
    "direct_unit_sa",
]

_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _check(features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None) -> None:
    if not isinstance(features, torch.Tensor) or features.ndim not in (3, 4, 5):
        raise ValueError("features must be a (B, C, *spatial) tensor with 1, 2 or 3 spatial dims")
    if not isinstance(guide, torch.Tensor) or guide.ndim != features.ndim or guide.shape[0] != features.shape[0]:
        raise ValueError(
            f"guide must be a (B, K, *spatial) tensor with the features' batch size and number of dims, "
            f"got guide {tuple(guide.shape)} and features {tuple(features.shape)}"
        )
    if mask is not None and tuple(mask.shape) != (guide.shape[0], 1, *guide.shape[2:]):
        raise ValueError(f"mask must have shape (B, 1, *spatial) = {(guide.shape[0], 1, *guide.shape[2:])}")


def _check_one_channel(guide: torch.Tensor, reference: torch.Tensor) -> None:
    if guide.shape[1] != 1:
        raise ValueError(f"guide must have one channel (B, 1, *spatial), got {tuple(guide.shape)}")
    if reference.ndim != guide.ndim or reference.shape[0] != guide.shape[0] or reference.shape[2:] != guide.shape[2:]:
        raise ValueError(
            f"reference must have shape (B, R, *spatial) matching the guide {tuple(guide.shape)}, "
            f"got {tuple(reference.shape)}"
        )


def resize_all(features: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Every channel of ``features`` (B, C, *s) resized to ``size``: (B, C, *size).

    Example:
        >>> resize_all(torch.tensor([[[0.0, 4.0]]]), (4,))
        tensor([[[0., 1., 3., 4.]]])
    """
    size = tuple(int(s) for s in size)
    if tuple(features.shape[2:]) == size:
        return features
    return F.interpolate(features, size=size, mode=_MODES[len(size)], align_corners=False)


def _class_weights(guide: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    weights = torch.cat([1.0 - guide, guide], dim=1) if guide.shape[1] == 1 else guide
    return weights if mask is None else weights * mask


def _weighted_means(up: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B, K, C) means of the resized features ``up`` (B, C, *S) under ``weights`` (B, K, *S)."""
    sums = torch.einsum("bkn,bcn->bkc", weights.flatten(2), up.flatten(2))
    return sums / weights.flatten(2).sum(-1).unsqueeze(-1)


def direct_prototypes(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Prototypes (B, K, C): weighted means of the full-resolution resized features.

    ``p_k = sum_x W_k(x) up(F)(x) / sum_x W_k(x)`` with ``W = [1 - G, G] * M`` for a one-channel
    guide, ``W = G * M`` otherwise.

    Example:
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> direct_prototypes(f, g)
        tensor([[[0.],
                 [3.]]])
    """
    _check(features, guide, mask)
    up = resize_all(features, tuple(guide.shape[2:]))
    return _weighted_means(up, _class_weights(guide.to(features.dtype), mask))


def direct_distances(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Squared distances (B, K, *S) of every resized feature vector to every prototype.

    Example:
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> direct_distances(f, g)
        tensor([[[ 0.,  0.,  4., 16.],
                 [ 9.,  9.,  1.,  1.]]])
    """
    _check(features, guide, mask)
    size = tuple(guide.shape[2:])
    up = resize_all(features, size)  # (B, C, *S): every channel at full resolution
    protos = _weighted_means(up, _class_weights(guide.to(features.dtype), mask))  # (B, K, C)
    view = (protos.shape[0], protos.shape[2], *([1] * len(size)))
    return torch.stack([((up - protos[:, k].reshape(view)) ** 2).sum(1) for k in range(protos.shape[1])], dim=1)


def direct_protoseg(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """ProtoSeg probabilities (B, K, *S): softmax over classes of minus the squared distances.

    Example:
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> direct_protoseg(f, g).argmax(1)
        tensor([[0, 0, 1, 1]])
    """
    return torch.softmax(-direct_distances(features, guide, mask), dim=1)


def _dice(seg: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Dice of seg (B, 1, *S) with each reference channel (B, R, *S): (B, R); 1.0 when both empty."""
    dtype = reference.dtype if reference.is_floating_point() else torch.float64
    seg, ref = seg.to(dtype), reference.to(dtype)
    inter = (seg * ref).flatten(2).sum(-1)
    total = seg.flatten(2).sum(-1) + ref.flatten(2).sum(-1)
    return torch.where(total > 0, 2.0 * inter / total.clamp_min(1e-12), torch.ones_like(total))


def direct_layer_sa(
    features: torch.Tensor,
    guide: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SA of a whole layer (B, R): Dice of "nearer the target prototype" against each reference.

    Args:
        features: (B, C, *s).
        guide: (B, 1, *S) target probability.
        reference: (B, R, *S) binary masks.
        mask: optional (B, 1, *S) weights of the pixels that shape the prototypes.

    Example:
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> direct_layer_sa(f, g, torch.tensor([[[0.0, 1.0, 1.0, 1.0]]]))
        tensor([[0.8000]])
    """
    _check(features, guide, mask)
    _check_one_channel(guide, reference)
    dist = direct_distances(features, guide, mask)
    seg = dist[:, 1:2] < dist[:, 0:1]  # strictly nearer the target prototype
    return _dice(seg, reference)


def _one_unit(
    channel: torch.Tensor, weights: torch.Tensor, size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (B, 1, *S) and margin ``d_background - d_target`` of one channel (B, 1, *s) on its own."""
    up = resize_all(channel, size)  # (B, 1, *S)
    protos = (weights * up).flatten(2).sum(-1) / weights.flatten(2).sum(-1)  # (B, 2)
    view = (protos.shape[0], 1, *([1] * len(size)))
    d_back = (up - protos[:, 0].reshape(view)) ** 2
    d_target = (up - protos[:, 1].reshape(view)) ** 2
    return d_target < d_back, d_back - d_target


def direct_unit_maps(
    features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unit's binary map and its margin, one channel at a time: ``(maps, margins)``, both (B, C, *S).

    ``maps`` is True where the unit's resized value is strictly nearer its target prototype;
    ``margins`` is ``d_background - d_target`` (a tie is 0). Holds all maps: for tests only.

    Example:
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0], [5.0, 5.0, 0.0, 0.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> direct_unit_maps(f, g)[0].int()
        tensor([[[0, 0, 1, 1],
                 [0, 0, 1, 1]]], dtype=torch.int32)
    """
    _check(features, guide, mask)
    if guide.shape[1] != 1:
        raise ValueError(f"guide must have one channel (B, 1, *spatial), got {tuple(guide.shape)}")
    size = tuple(guide.shape[2:])
    weights = _class_weights(guide.to(features.dtype), mask)
    pairs = [_one_unit(features[:, c : c + 1], weights, size) for c in range(features.shape[1])]
    return torch.cat([m for m, _ in pairs], dim=1), torch.cat([d for _, d in pairs], dim=1)


def direct_unit_sa(
    features: torch.Tensor,
    guide: torch.Tensor,
    reference: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """SA of every unit (B, R, C), by a Python loop over the channels (each resized on its own).

    Args:
        features: (B, C, *s).
        guide: (B, 1, *S) target probability.
        reference: (B, R, *S) binary masks.
        mask: optional (B, 1, *S).

    Example:
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0], [5.0, 5.0, 0.0, 0.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> direct_unit_sa(f, g, g)
        tensor([[[1., 1.]]])
    """
    _check(features, guide, mask)
    _check_one_channel(guide, reference)
    size = tuple(guide.shape[2:])
    weights = _class_weights(guide.to(features.dtype), mask)
    scores = []
    for c in range(features.shape[1]):
        seg, _ = _one_unit(features[:, c : c + 1], weights, size)
        scores.append(_dice(seg, reference))
    return torch.stack(scores, dim=-1)
