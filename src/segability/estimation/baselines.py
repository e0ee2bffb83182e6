"""Label-free quality scores that mean SA must be compared against.

After Zenk et al., "Comparative benchmarking of failure detection methods in medical image
segmentation: Unveiling the role of confidence aggregation", Medical Image Analysis (2025): pixel
confidence aggregated over the image (mean entropy, foreground confidence, confidence away from the
boundary) and agreement between predictions (test-time flips, Monte-Carlo dropout).

Every score here is oriented so that **higher means better expected quality** (more confident,
more agreement), like mean SA. All functions are batched, work for 1, 2 or 3 spatial dimensions,
and return a (B,) tensor on the input's device.

Probabilities are (B, 1, *S) foreground probabilities of a binary target, or (B, K, *S) class
probabilities (e.g. a softmax) with ``target`` the class of interest. The predicted target is
``p > threshold`` for one channel and ``argmax == target`` for K channels; a pixel's confidence is
its largest class probability (``max(p, 1 - p)`` for one channel).
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from segability.core.functional import EmptyRule, dice_from_counts
from segability.errors import UsageError

__all__ = [
    "mean_entropy",
    "mean_max_prob_foreground",
    "boundary_confidence",
    "tta_flip_agreement",
    "mc_dropout_agreement",
    "pairwise_dice",
    "ensemble_agreement",
    "ensemble_scores",
    "ensemble_members",
    "forward_passes",
    "DROPOUT_TYPES",
]

Predict = Callable[[torch.Tensor], torch.Tensor]

DROPOUT_TYPES: tuple[type[torch.nn.Module], ...] = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


# --------------------------------------------------------------------------------- checks
def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _validate_prob(prob: torch.Tensor, target: int | None, name: str = "prob") -> None:
    if not isinstance(prob, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (B, K, *spatial), got {type(prob).__name__}")
    if prob.ndim not in (3, 4, 5):
        raise ValueError(f"{name} must have shape (B, K, *spatial) with 1-3 spatial dims, got {_shape(prob)}")
    if not prob.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor of probabilities, got dtype {prob.dtype}")
    if not bool(torch.isfinite(prob).all()):
        raise ValueError(f"{name} {_shape(prob)} contains NaN or Inf values")
    lo, hi = float(prob.min()), float(prob.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{name} values must be probabilities in [0, 1], got min {lo:g} and max {hi:g}")
    k = prob.shape[1]
    if k == 1:
        if target not in (None, 0):
            raise ValueError(f"target must be None or 0 for a one-channel {name}, got {target!r}")
    else:
        if target is None or isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < k:
            raise ValueError(f"target must be a class index in [0, {k}) for a {k}-channel {name}, got {target!r}")


def _compute(prob: torch.Tensor) -> torch.Tensor:
    return prob if prob.dtype in (torch.float32, torch.float64) else prob.float()


def _foreground(prob: torch.Tensor, target: int | None, threshold: float) -> torch.Tensor:
    """Predicted target mask (B, 1, *S) bool."""
    if prob.shape[1] == 1:
        return prob > threshold
    return (prob.argmax(dim=1, keepdim=True) == target)


def _confidence(prob: torch.Tensor) -> torch.Tensor:
    """Largest class probability per pixel (B, 1, *S)."""
    if prob.shape[1] == 1:
        return torch.maximum(prob, 1.0 - prob)
    return prob.amax(dim=1, keepdim=True)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` per image; NaN where the mask is empty."""
    m = mask.to(values.dtype).flatten(1)
    total = m.sum(1)
    mean = (values.flatten(1) * m).sum(1) / total.clamp_min(1)
    return torch.where(total > 0, mean, torch.full_like(mean, math.nan))


# ------------------------------------------------------------------------ pixel confidence
def mean_entropy(prob: torch.Tensor, *, target: int | None = None) -> torch.Tensor:
    """Minus the mean pixel entropy (nats): 0 for a certain map, ``-ln 2`` for a constant 0.5.

    One channel: binary entropy ``-(p ln p + (1 - p) ln(1 - p))``; K channels: the entropy of the
    class distribution over all K (``target`` is only checked). ``0 ln 0 = 0``.

    Args:
        prob: (B, 1, *S) or (B, K, *S) probabilities.
        target: class of interest for K channels.

    Returns:
        (B,) scores, higher = better expected quality.

    Example:
        >>> import torch
        >>> mean_entropy(torch.full((1, 1, 4, 4), 0.5))
        tensor([-0.6931])
    """
    _validate_prob(prob, target)
    p = _compute(prob)
    terms = torch.special.xlogy(p, p)
    if p.shape[1] == 1:
        terms = terms + torch.special.xlogy(1.0 - p, 1.0 - p)
    entropy = -terms.sum(dim=1)
    return -entropy.flatten(1).mean(1)


def mean_max_prob_foreground(
    prob: torch.Tensor, *, target: int | None = None, threshold: float = 0.5
) -> torch.Tensor:
    """Mean confidence (largest class probability) over the predicted target pixels.

    Args:
        prob: (B, 1, *S) or (B, K, *S) probabilities.
        target: class of interest for K channels.
        threshold: foreground threshold for one channel.

    Returns:
        (B,) scores in [0.5, 1] (one channel); NaN for an empty prediction (nothing to average,
        never "confident").

    Example:
        >>> import torch
        >>> mean_max_prob_foreground(torch.tensor([[[0.9, 0.6, 0.2, 0.4]]]))
        tensor([0.7500])
    """
    _validate_prob(prob, target)
    p = _compute(prob)
    return _masked_mean(_confidence(p), _foreground(p, target, threshold))


def _dilate(mask: torch.Tensor, band: int) -> torch.Tensor:
    """Chebyshev dilation of a (B, 1, *S) float 0/1 mask by ``band`` pixels (max-pool)."""
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[mask.ndim - 3]
    return pool(mask, kernel_size=2 * band + 1, stride=1, padding=band)


def boundary_confidence(
    prob: torch.Tensor, band: int = 2, *, target: int | None = None, threshold: float = 0.5
) -> torch.Tensor:
    """Mean confidence outside a band around the predicted boundary.

    Confidence is naturally low along the boundary of a good segmentation; low confidence away from
    it is what signals a failure. The band holds every pixel with a pixel of the other predicted
    class within ``band`` pixels (Chebyshev distance, i.e. a ``2 band + 1`` cube): the max-pool
    dilation of the mask minus its erosion. The image border is not a boundary.

    Args:
        prob: (B, 1, *S) or (B, K, *S) probabilities.
        band: half-width of the excluded band in pixels (0 excludes nothing).
        target: class of interest for K channels.
        threshold: foreground threshold for one channel.

    Returns:
        (B,) scores; NaN when the band covers the whole image.

    Example:
        >>> import torch
        >>> p = torch.tensor([[[0.9, 0.9, 0.8, 0.7, 0.2, 0.1, 0.1, 0.05]]])
        >>> boundary_confidence(p, band=1)  # pixels 3 and 4 are left out: 5.35 / 6
        tensor([0.8917])
    """
    _validate_prob(prob, target)
    if isinstance(band, bool) or not isinstance(band, int) or band < 0:
        raise ValueError(f"band must be a non-negative integer (pixels), got {band!r}")
    p = _compute(prob)
    mask = _foreground(p, target, threshold).to(p.dtype)
    if band == 0:
        keep = torch.ones_like(mask, dtype=torch.bool)
    else:
        dilated = _dilate(mask, band)
        eroded = 1.0 - _dilate(1.0 - mask, band)
        keep = (dilated - eroded) < 0.5
    return _masked_mean(_confidence(p), keep)


# ------------------------------------------------------------------------ agreement
def pairwise_dice(masks: Sequence[torch.Tensor], *, empty: EmptyRule = "one") -> torch.Tensor:
    """Mean Dice over all pairs of binary masks, per image.

    Args:
        masks: two or more (B, ...) binary masks of one shape.
        empty: Dice of two empty masks: 1 (``"one"``: they agree) or NaN (``"nan"``).

    Returns:
        (B,) float tensor.

    Example:
        >>> import torch
        >>> a, b, c = (torch.tensor([[1, 1, 0, 0]]), torch.tensor([[1, 1, 0, 0]]),
        ...            torch.tensor([[0, 0, 1, 1]]))
        >>> pairwise_dice([a, b, c])  # pairs: 1, 0, 0
        tensor([0.3333])
    """
    if len(masks) < 2:
        raise ValueError(f"masks: need at least two masks, got {len(masks)}")
    flat = [m.flatten(1).to(torch.float32) for m in masks]
    if any(f.shape != flat[0].shape for f in flat):
        raise ValueError(f"masks must all have one shape, got {[tuple(m.shape) for m in masks]}")
    sizes = [f.sum(1) for f in flat]
    dices = [
        dice_from_counts((flat[i] * flat[j]).sum(1), sizes[i], sizes[j], empty)
        for i, j in itertools.combinations(range(len(flat)), 2)
    ]
    return torch.stack(dices).mean(0)


def _predicted_mask(
    predict: Predict, images: torch.Tensor, target: int | None, threshold: float
) -> torch.Tensor:
    out = predict(images)
    if not isinstance(out, torch.Tensor) or out.ndim != images.ndim or out.shape[0] != images.shape[0] \
            or out.shape[2:] != images.shape[2:]:
        got = _shape(out) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"predict must return probabilities (B, K, *spatial) matching images {_shape(images)} "
            f"in batch and spatial size, got {got}"
        )
    _validate_prob(out.detach(), target, "predict(images)")
    return _foreground(_compute(out.detach()), target, threshold)


def _validate_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4, 5):
        got = _shape(images) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (B, C, *spatial) with 1-3 spatial dims, got {got}")


def _flip_dims(flips: Sequence[int | Sequence[int]] | None, ndim: int) -> list[tuple[int, ...]]:
    spatial = range(2, ndim)
    if flips is None:
        return [(d,) for d in spatial]
    out = []
    for f in flips:
        dims = (f,) if isinstance(f, int) else tuple(f)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) or d not in spatial for d in dims):
            raise ValueError(
                f"flips must be spatial dims of images (ints in {list(spatial)}) or tuples of them, got {f!r}"
            )
        out.append(dims)
    if not out:
        raise ValueError("flips must hold at least one flip")
    return out


@torch.no_grad()
def tta_flip_agreement(
    predict: Predict,
    images: torch.Tensor,
    flips: Sequence[int | Sequence[int]] | None = None,
    *,
    target: int | None = None,
    threshold: float = 0.5,
    empty: EmptyRule = "one",
) -> torch.Tensor:
    """Agreement between the prediction and the predictions on flipped inputs.

    Each flipped input's prediction is flipped back, all are binarised, and the score is the mean
    Dice over all pairs of {prediction, flipped predictions}: 1 for a flip-equivariant model.

    Args:
        predict: images (B, C, *S) -> probabilities (B, K, *S), e.g. ``lambda x: model(x).sigmoid()``.
        images: (B, C, *S) batch, on the model's device.
        flips: dims (or tuples of dims) of ``images`` to flip; default each spatial dim on its own.
        target: class of interest for K-channel outputs.
        threshold: foreground threshold for one-channel outputs.
        empty: Dice of two empty predictions (``"one"``: they agree).

    Returns:
        (B,) agreement in [0, 1].

    Example:
        >>> import torch
        >>> x = torch.rand(2, 1, 8, 8)
        >>> tta_flip_agreement(lambda t: t, x)  # the identity is flip-equivariant
        tensor([1., 1.])
    """
    _validate_images(images)
    masks = [_predicted_mask(predict, images, target, threshold)]
    for dims in _flip_dims(flips, images.ndim):
        flipped = _predicted_mask(predict, images.flip(dims), target, threshold)
        masks.append(flipped.flip(dims))
    return pairwise_dice(masks, empty=empty)


def mc_dropout_agreement(
    model: torch.nn.Module,
    images: torch.Tensor,
    predict: Predict | None = None,
    n: int = 8,
    seed: int = 0,
    *,
    target: int | None = None,
    threshold: float = 0.5,
    empty: EmptyRule = "one",
) -> torch.Tensor:
    """Agreement between ``n`` Monte-Carlo dropout predictions (mean pairwise Dice).

    The model is put in eval mode with only its dropout layers in train mode (BatchNorm keeps its
    running statistics), run ``n`` times, and every module's ``training`` flag is restored
    afterwards, also when a pass raises. The random stream is seeded with ``seed`` inside a forked
    RNG, so the global torch RNG is left as it was.

    Args:
        model: the network; must contain a dropout layer with ``p > 0``.
        images: (B, C, *S) batch on the model's device.
        predict: images -> probabilities (B, K, *S) using ``model``; default ``model`` itself
            (when it already outputs probabilities).
        n: number of passes (at least 2).
        seed: seed of the dropout masks.
        target: class of interest for K-channel outputs.
        threshold: foreground threshold for one-channel outputs.
        empty: Dice of two empty predictions (``"one"``: they agree).

    Returns:
        (B,) agreement in [0, 1].

    Raises:
        ValueError: no dropout layer with ``p > 0``, ``n < 2``, or bad outputs.

    Example:
        >>> import torch
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1), torch.nn.Dropout(0.5), torch.nn.Sigmoid())
        >>> score = mc_dropout_agreement(net, torch.rand(2, 1, 8, 8), n=4)
        >>> score.shape, net.training
        (torch.Size([2]), True)
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    _validate_images(images)
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 (passes), got {n!r}")
    dropouts = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES) and float(m.p) > 0]
    if not dropouts:
        raise ValueError(
            "model has no dropout layer with p > 0 (torch.nn.Dropout*, AlphaDropout); MC dropout needs one"
        )
    run = model if predict is None else predict
    flags = {m: m.training for m in model.modules()}
    devices = [images.device] if images.device.type == "cuda" else []
    try:
        model.eval()
        for m in dropouts:
            m.train()
        masks = []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _ in range(n):
                masks.append(_predicted_mask(run, images, target, threshold))
    finally:
        for m, flag in flags.items():
            m.training = flag
    return pairwise_dice(masks, empty=empty)


# ------------------------------------------------------------------------ deep ensemble
def ensemble_members(
    model: torch.nn.Module, state_dicts: Sequence[Mapping[str, torch.Tensor]], *, names: Sequence[str] | None = None
) -> list[torch.nn.Module]:
    """The deployed ``model`` and one copy of its architecture per state dict: a deep ensemble.

    Member 0 is ``model`` itself (the deployed model, whose outputs are ranked); each further member
    is a deep copy of it with one of ``state_dicts`` loaded strictly, in eval mode.

    Args:
        model: the deployed network.
        state_dicts: the weights of the other members (same architecture).
        names: what each state dict is called in messages (its file); default ``member 1``, ...

    Returns:
        ``[model, member 1, ...]``.

    Raises:
        UsageError: (argument ``ensemble_weights``) no state dict, or one that does not fit the
            architecture (its name and the mismatching keys in the message).

    Example:
        >>> import torch
        >>> net = torch.nn.Conv2d(1, 1, 1)
        >>> other = {"weight": torch.ones(1, 1, 1, 1), "bias": torch.zeros(1)}
        >>> [float(m.weight.sum()) for m in ensemble_members(net, [other])][1]
        1.0
    """
    if not state_dicts:
        raise UsageError("ensemble_weights: give at least one other member's weights", argument="ensemble_weights")
    labels = list(names) if names is not None else [f"member {i}" for i in range(1, len(state_dicts) + 1)]
    if len(labels) != len(state_dicts):
        raise ValueError(f"names: {len(labels)} names for {len(state_dicts)} state dicts")
    own = model.state_dict()
    members = [model]
    for state, label in zip(state_dicts, labels, strict=True):
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                 if k in state and tuple(state[k].shape) != tuple(own[k].shape)]  # fmt: skip
        if missing or unexpected or wrong:
            parts = [f"{len(v)} {what}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                     for v, what in ((missing, "keys missing"), (unexpected, "unexpected keys"), (wrong, "other shapes")) if v]  # fmt: skip
            raise UsageError(
                f"ensemble_weights: {label} does not fit the architecture of the model ({'; '.join(parts)}); "
                "every member must be the same network as --model with its own weights",
                argument="ensemble_weights",
            )
        member = copy.deepcopy(model)
        member.load_state_dict(state, strict=True)
        members.append(member.eval())
    return members


@torch.no_grad()
def _member_probabilities(
    members: Sequence[Predict], images: torch.Tensor, target: int | None
) -> list[torch.Tensor]:
    _validate_images(images)
    if isinstance(members, torch.nn.Module) or not isinstance(members, Sequence) or len(members) < 2:
        got = len(members) if isinstance(members, Sequence) else type(members).__name__
        raise ValueError(f"members must be a sequence of at least two predict functions (the ensemble), got {got}")
    probs = []
    for i, member in enumerate(members):
        out = member(images)
        if not isinstance(out, torch.Tensor) or out.ndim != images.ndim or out.shape[0] != images.shape[0] \
                or out.shape[2:] != images.shape[2:]:
            got = _shape(out) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"members[{i}] must return probabilities (B, K, *spatial) matching images {_shape(images)}, got {got}")
        if probs and out.shape != probs[0].shape:
            raise ValueError(f"members[{i}] returns {_shape(out)}, members[0] {_shape(probs[0])}: one architecture expected")
        _validate_prob(out, target, f"members[{i}](images)")
        probs.append(_compute(out))
    return probs


def ensemble_agreement(
    members: Sequence[Predict],
    images: torch.Tensor,
    *,
    target: int | None = None,
    threshold: float = 0.5,
    empty: EmptyRule = "one",
) -> torch.Tensor:
    """Deep-ensemble agreement: the mean Dice over all pairs of the members' binarised predictions.

    Zenk et al. (MedIA 2025) rank a model's outputs by this score; it was the strongest method of
    their failure-detection benchmark. Cost: one forward pass per member (the deployed model's pass
    is the prediction itself, so ``len(members) - 1`` extra).

    Args:
        members: images (B, C, *S) -> probabilities (B, K, *S), one per ensemble member (at least
            two), e.g. ``[lambda x, m=m: m(x).sigmoid() for m in ensemble_members(net, states)]``.
        images: (B, C, *S) batch on the members' device.
        target: class of interest for K-channel outputs.
        threshold: foreground threshold for one-channel outputs.
        empty: Dice of two empty predictions (``"one"``: they agree).

    Returns:
        (B,) agreement in [0, 1], higher = better expected quality.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[0.9, 0.8, 0.1, 0.2]]])
        >>> ensemble_agreement([lambda t: t, lambda t: t.roll(1, -1)], x)  # {0, 1} vs {1, 2}
        tensor([0.5000])
    """
    return ensemble_scores(members, images, target=target, threshold=threshold, empty=empty)["ensemble_dice"]


def ensemble_scores(
    members: Sequence[Predict],
    images: torch.Tensor,
    *,
    target: int | None = None,
    threshold: float = 0.5,
    empty: EmptyRule = "one",
) -> dict[str, torch.Tensor]:
    """Both deep-ensemble scores from one forward pass per member.

    - ``ensemble_dice``: :func:`ensemble_agreement` (mean pairwise Dice of the binarised predictions);
    - ``ensemble_entropy``: :func:`mean_entropy` of the members' mean probability map (minus the
      mean pixel entropy of the ensemble prediction: its uncertainty, disagreement included).

    Args:
        members, images, target, threshold, empty: as in :func:`ensemble_agreement`.

    Returns:
        ``{"ensemble_dice": (B,), "ensemble_entropy": (B,)}``, higher = better expected quality.

    Example:
        >>> import torch
        >>> x = torch.tensor([[[1.0, 0.0]]])
        >>> s = ensemble_scores([lambda t: t, lambda t: 1 - t], x)  # disagree everywhere; mean 0.5
        >>> float(s["ensemble_dice"]), round(float(s["ensemble_entropy"]), 4)
        (0.0, -0.6931)
    """
    probs = _member_probabilities(members, images, target)
    masks = [_foreground(p, target, threshold) for p in probs]
    mean = torch.stack(probs).mean(0)
    return {"ensemble_dice": pairwise_dice(masks, empty=empty), "ensemble_entropy": mean_entropy(mean, target=target)}


def forward_passes(method: str, *, spatial_dims: int = 2, n_mc: int = 8, n_members: int | None = None) -> int:
    """Forward passes one image costs for a baseline score (its cost as a multiple of one pass).

    The deployed model's own pass counts as one: single-pass scores cost 1, the flips 1 + one per
    spatial axis, MC dropout ``n_mc`` (its passes replace the deterministic one only for scoring),
    an ensemble one per member.

    Example:
        >>> forward_passes("tta_flip"), forward_passes("ensemble_dice", n_members=5)
        (3, 5)
    """
    if method in ("entropy", "mean_entropy", "max_prob_foreground", "boundary_confidence"):
        return 1
    if method == "tta_flip":
        return 1 + int(spatial_dims)
    if method == "mc_dropout":
        return int(n_mc)
    if method in ("ensemble_dice", "ensemble_entropy"):
        if n_members is None or n_members < 2:
            raise ValueError(f"n_members must be the ensemble's size (>= 2) for {method!r}, got {n_members!r}")
        return int(n_members)
    raise ValueError(f"method: unknown baseline {method!r}")


def stream_ensemble_scores(
    members: Sequence[Predict],
    items: Iterable[tuple[str, torch.Tensor]],
    *,
    target: int | None = None,
    threshold: float = 0.5,
    progress: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """:func:`ensemble_scores` over ``(image id, image (C, *S))`` pairs, one image at a time.

    Returns:
        ``{"image": [...], "ensemble_dice": [...], "ensemble_entropy": [...]}`` (plain lists, for a table).

    Example:
        >>> import torch
        >>> out = stream_ensemble_scores([lambda t: t, lambda t: t], [("a", torch.rand(1, 4, 4))])
        >>> out["image"], out["ensemble_dice"]
        (['a'], [1.0])
    """
    cols: dict[str, list[float]] = {"image": [], "ensemble_dice": [], "ensemble_entropy": []}
    for image_id, image in items:
        scores = ensemble_scores(members, image[None], target=target, threshold=threshold)
        cols["image"].append(str(image_id))
        for k, v in scores.items():
            cols[k].append(float(v[0]))
        if progress is not None:
            progress(1)
    return cols
