"""The one SA reduction: additive counts from features, SA and a status from counts.

Split in the manner of torchmetrics' functional metrics. :func:`sa_update` turns one batch of
(features, guide, references) into :class:`SACounts` -- intersections and sizes that add up over
batches, over the windows of a volume (with per-pixel weights) or across processes. :func:`sa_compute`
turns counts into SA and decides, in this one place, whether each score is defined; it returns a
:class:`Status` per image, never prose. :func:`prototype_update` is the same split for prototypes,
so that a volume seen in windows gets one pair of prototypes (``sum_w sum_x W(x) F_w(x) / T``).

Every caller -- :func:`segability.analyze`, sliding windows, the Lightning callback, the MONAI
handler, pruning -- goes through :class:`segability.SegmentationAbility`, which keeps these counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum

import torch

from segability.core.functional import (
    EmptyRule,
    _logit_difference,
    _prototypes_low,
    dice_from_counts,
    low_resolution_weights,
    unit_overlaps,
)

__all__ = [
    "Status",
    "SACounts",
    "PrototypeCounts",
    "prototype_update",
    "sa_update",
    "sa_compute",
    "finite_per_image",
    "score_layer",
]


class Status(str, Enum):
    """Why a score is (not) defined; written to the tables as its string value.

    The core decides ``ok``, ``output_not_finite``, ``features_not_finite``,
    ``undefined_prototypes`` and ``empty_prediction``; the analysis adds the statuses of layers it
    cannot score (``not_features``, ``not_called``) and of images that failed (``failed``).
    """

    OK = "ok"
    OUTPUT_NOT_FINITE = "output_not_finite"
    FEATURES_NOT_FINITE = "features_not_finite"
    UNDEFINED_PROTOTYPES = "undefined_prototypes"
    EMPTY_PREDICTION = "empty_prediction"
    NOT_FEATURES = "not_features"
    NOT_CALLED = "not_called"
    FAILED = "failed"

    @property
    def message(self) -> str:
        """The human-readable reason shown beside the status ("" for ``ok``)."""
        return _MESSAGES[self]


_MESSAGES = {
    Status.OK: "",
    Status.OUTPUT_NOT_FINITE: "model output contains NaN or Inf",
    Status.FEATURES_NOT_FINITE: "features contain NaN or Inf",
    Status.UNDEFINED_PROTOTYPES: "guide has no target or no background: prototypes undefined",
    Status.EMPTY_PREDICTION: "empty prediction: SA against the prediction undefined",
    Status.NOT_FEATURES: "the layer output cannot be read as features",
    Status.NOT_CALLED: "the layer was not called in the forward pass",
    Status.FAILED: "the image could not be analysed",
}


def finite_per_image(t: torch.Tensor) -> torch.Tensor:
    """(B,) whether each image's values are all finite.

    A sum is finite when every term is (up to overflow): one cheap reduction; only a non-finite
    sum needs the element-wise check.
    """
    flat = t.flatten(1)
    finite = torch.isfinite(flat.sum(dim=1))
    if not bool(finite.all()):
        finite = torch.isfinite(flat).all(dim=1)
    return finite


# ------------------------------------------------------------------------------------ counts
@dataclass
class PrototypeCounts:
    """Additive prototype state: ``sums`` (B, K, C) of weighted features, ``total`` (B, K) weights."""

    sums: torch.Tensor
    total: torch.Tensor

    def __add__(self, other: PrototypeCounts) -> PrototypeCounts:
        return PrototypeCounts(self.sums + other.sums.to(self.sums), self.total + other.total.to(self.total))

    def prototypes(self) -> torch.Tensor:
        """(B, K, C) mean features per class; NaN where a class has no weight."""
        return _prototypes_from_sums(self.sums, self.total)


def _prototypes_from_sums(sums: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    protos = sums / total.unsqueeze(-1)
    return torch.where((total > 0).unsqueeze(-1), protos, torch.full_like(protos, math.nan))


@dataclass
class SACounts:
    """Additive SA state of one layer for B images and R references.

    ``intersection`` (B, R) and ``seg_size`` (B,) are weighted sums over pixels of the feature
    segmentation map times each reference and of the map alone; ``ref_size`` (B, R) the weighted
    reference sizes; ``unit_intersection`` (B, R, C) and ``unit_size`` (B, C) the same per unit.
    ``features_finite``, ``prototypes_defined`` and ``output_finite`` (B,) bool are combined with
    AND; ``prediction`` is the index of the reference that is the network's own prediction (SA
    against an empty prediction is undefined), or None.
    """

    intersection: torch.Tensor
    seg_size: torch.Tensor
    ref_size: torch.Tensor
    features_finite: torch.Tensor
    prototypes_defined: torch.Tensor
    output_finite: torch.Tensor
    unit_intersection: torch.Tensor | None = None
    unit_size: torch.Tensor | None = None
    prediction: int | None = None

    def __add__(self, other: SACounts) -> SACounts:
        if (self.unit_size is None) != (other.unit_size is None) or self.prediction != other.prediction:
            raise ValueError("cannot add SA counts with and without units, or with another prediction reference")
        out = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "prediction" or a is None:
                out[f.name] = a
            elif a.dtype == torch.bool:
                out[f.name] = a & b.to(a.device)
            else:
                out[f.name] = a + b.to(a)
        return SACounts(**out)

    def select(self, index: torch.Tensor) -> SACounts:
        """The counts of the images ``index`` (a long tensor)."""
        return self._map(lambda t: t[index.to(t.device)])

    def group_sum(self, index: torch.Tensor, groups: int) -> SACounts:
        """Sum the images that share a group: image ``i`` goes to group ``index[i]``; flags are ANDed."""

        def reduce(t: torch.Tensor) -> torch.Tensor:
            idx = index.to(t.device)
            if t.dtype == torch.bool:
                bad = torch.zeros(groups, dtype=torch.long, device=t.device).index_add_(0, idx, (~t).long())
                return bad == 0
            return torch.zeros((groups, *t.shape[1:]), dtype=t.dtype, device=t.device).index_add_(0, idx, t)

        return self._map(reduce)

    def to(self, device: torch.device | str) -> SACounts:
        return self._map(lambda t: t.to(device))

    def _map(self, fn) -> SACounts:
        return SACounts(
            **{
                f.name: (getattr(self, f.name) if f.name == "prediction" or getattr(self, f.name) is None
                         else fn(getattr(self, f.name)))
                for f in fields(self)
            }
        )  # fmt: skip

    @staticmethod
    def cat(parts: list[SACounts]) -> SACounts:
        """Concatenate the images of several counts (same references, same units)."""
        first = parts[0]
        out = {}
        for f in fields(first):
            values = [getattr(p, f.name) for p in parts]
            if f.name == "prediction" or values[0] is None:
                out[f.name] = values[0]
            else:
                out[f.name] = torch.cat([v.to(values[0].device) for v in values])
        return SACounts(**out)


@dataclass
class SAScores:
    """SA computed from counts: ``layer`` (B, R), ``units`` (B, R, C) or None, ``status`` per image."""

    layer: torch.Tensor
    units: torch.Tensor | None
    status: list[Status]


# ---------------------------------------------------------------------------------- functional
def prototype_update(
    features: torch.Tensor,
    guide: torch.Tensor,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> PrototypeCounts:
    """Additive prototype counts of a (B, C, *s) layer against a (B, 1, *S) guide (inputs valid).

    ``weights`` (B, 1, *S) multiplies every pixel's class weights (e.g. ``1 / n(x)`` for the
    windows covering ``x``): summed over the windows of a volume the totals then count each voxel
    once. Computed at the features' resolution against the adjoint-resized weights.
    """
    w = mask if weights is None else (weights if mask is None else mask * weights)
    low, total = low_resolution_weights(guide, w, tuple(features.shape[2:]))
    sums = torch.bmm(low.flatten(2), features.flatten(2).transpose(1, 2))
    return PrototypeCounts(sums, total)


def sa_update(
    features: torch.Tensor,
    guide: torch.Tensor,
    references: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    weights: torch.Tensor | None = None,
    prototypes: torch.Tensor | None = None,
    output_finite: torch.Tensor | None = None,
    prediction: int | None = None,
    units: bool = False,
    chunk_size: int | None = None,
    cache: dict | None = None,
) -> SACounts:
    """Counts of one layer's feature segmentation against R references (inputs assumed valid).

    Never holds more than one resized channel per class, plus one chunk of unit maps. Images whose
    features are not finite are scored on zeros and marked (their SA is then undefined).

    Args:
        features: (B, C, *s) features at any resolution.
        guide: (B, 1, *S) target probability in [0, 1] that shapes the prototypes.
        references: (B, R, *S) binary masks the maps are measured against.
        mask: optional (B, 1, *S) pixels that shape the prototypes.
        weights: optional (B, 1, *S) per-pixel weight of every count (sliding windows: ``1 / n(x)``).
        prototypes: optional fixed (B, 2, C) prototypes (a volume's, for its windows); taken from
            ``features`` and ``guide`` when None.
        output_finite: optional (B,) bool, False for images whose network output was not finite.
        prediction: index of the reference that is the network's prediction, or None.
        units: also count every unit's map.
        chunk_size: channels resized at once for the unit maps.
        cache: a dict shared by the layers of one batch (same guide, mask, weights and references):
            the adjoint-resized class weights per feature grid and the weighted references are
            computed once per grid instead of once per layer.

    Returns:
        :class:`SACounts` for the B images.

    Example:
        Prototypes 0 (background) and 3 (target); the map is ``[0, 0, 1, 1]``. Against the
        reference ``[0, 1, 1, 1]``: intersection 2, sizes 2 and 3, so SA = 4 / 5.

        >>> import torch
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> r = torch.tensor([[[0.0, 1.0, 1.0, 1.0]]])
        >>> counts = sa_update(f, g, r)
        >>> counts.intersection, counts.seg_size, counts.ref_size
        (tensor([[2.]]), tensor([2.]), tensor([[3.]]))
        >>> sa_compute(counts).layer
        tensor([[0.8000]])
    """
    cache = {} if cache is None else cache
    finite = finite_per_image(features)
    if not bool(finite.all()):
        features = torch.where(finite.view(-1, *([1] * (features.ndim - 1))), features, torch.zeros_like(features))
    size = tuple(guide.shape[2:])
    if prototypes is None:
        key = ("weights", tuple(features.shape[2:]), features.dtype)
        if key not in cache:
            cache[key] = low_resolution_weights(guide, mask, tuple(features.shape[2:]))
        low, total = cache[key]
        protos = _prototypes_low(features, low, total)
    else:
        protos = prototypes.to(device=features.device, dtype=features.dtype)
    defined = ~torch.isnan(protos).flatten(1).any(dim=1)
    # target logit > background logit, on one resized channel, thresholded in place
    seg = _logit_difference(features, protos, size).gt_(0).flatten(1)  # (B, N) of 0.0 / 1.0
    key = ("references", features.dtype)
    if key not in cache:
        refs = references.to(features.dtype).flatten(2)  # (B, R, N)
        w = None if weights is None else weights.to(features.dtype).flatten(2)  # (B, 1, N)
        refs_w = refs if w is None else refs * w
        cache[key] = (refs_w, refs_w.sum(-1), w)
    refs_w, ref_size, w = cache[key]
    # an element-wise product and sum: bmm with a 1 x 1 output is several times slower on CPU
    inter = (refs_w * seg.unsqueeze(1)).sum(-1)
    seg_size = seg.sum(-1) if w is None else (seg * w[:, 0]).sum(-1)
    counts = SACounts(
        intersection=inter,
        seg_size=seg_size,
        ref_size=ref_size,
        features_finite=finite,
        prototypes_defined=defined,
        output_finite=torch.ones_like(finite) if output_finite is None else output_finite.to(finite.device).bool(),
        prediction=prediction,
    )
    if units:
        ref_units = refs_w if w is None else torch.cat([refs_w, w], dim=1)
        # weighted unit sizes ride along as one more "reference": the weights themselves
        ref_grid = ref_units.reshape(ref_units.shape[0], ref_units.shape[1], *size)
        u_inter, u_size = unit_overlaps(features, protos, ref_grid, chunk_size=chunk_size)
        if w is None:
            counts.unit_intersection, counts.unit_size = u_inter, u_size
        else:
            counts.unit_intersection, counts.unit_size = u_inter[:, :-1], u_inter[:, -1]
    return counts


def sa_compute(counts: SACounts, empty: EmptyRule = "one") -> SAScores:
    """SA from counts, and the one rule for when a score is undefined (NaN).

    In order: a non-finite network output, non-finite features, undefined prototypes (the guide
    has no target or no background weight) make every SA of the image undefined; an empty
    prediction makes the SA against the prediction undefined. A feature map and a reference that
    are both empty score 1.0 (``empty="one"``) or NaN (``"nan"``).

    Returns:
        :class:`SAScores`: ``layer`` (B, R), ``units`` (B, R, C) or None, one :class:`Status` per image.
    """
    layer = dice_from_counts(
        counts.intersection, counts.seg_size.unsqueeze(-1).expand_as(counts.intersection), counts.ref_size, empty
    )
    units = None
    if counts.unit_intersection is not None:
        units = dice_from_counts(
            counts.unit_intersection,
            counts.unit_size.unsqueeze(1).expand_as(counts.unit_intersection),
            counts.ref_size.unsqueeze(-1),
            empty,
        )
    none = ~(counts.output_finite & counts.features_finite & counts.prototypes_defined)
    status = [Status.OK] * len(none)
    empty_pred = torch.zeros_like(none)
    if counts.prediction is not None:
        empty_pred = (counts.ref_size[:, counts.prediction] <= 0) & ~none
    checks = (
        (~counts.output_finite, Status.OUTPUT_NOT_FINITE),
        (~counts.features_finite, Status.FEATURES_NOT_FINITE),
        (~counts.prototypes_defined, Status.UNDEFINED_PROTOTYPES),
        (empty_pred, Status.EMPTY_PREDICTION),
    )
    for bad, code in reversed(checks):  # the first rule that applies names the status
        for i in torch.nonzero(bad).flatten().tolist():
            status[i] = code
    layer = layer.masked_fill(none.unsqueeze(-1).to(layer.device), math.nan)
    if units is not None:
        units = units.masked_fill(none.view(-1, 1, 1).to(units.device), math.nan)
    if counts.prediction is not None and bool(empty_pred.any()):
        layer[empty_pred.to(layer.device), counts.prediction] = math.nan
        if units is not None:
            units[empty_pred.to(units.device), counts.prediction] = math.nan
    return SAScores(layer=layer, units=units, status=status)



def score_layer(
    features: torch.Tensor,
    guide: torch.Tensor,
    references: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    units: bool = False,
    empty: EmptyRule = "one",
    chunk_size: int | None = None,
    cache: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """SA of one layer (and of its units) against R references at once: update, then compute.

    Returns:
        ``(layer_sa (B, R), unit_sa (B, R, C) or None, undefined (B,))``; undefined images are NaN.
    """
    counts = sa_update(features, guide, references, mask, units=units, chunk_size=chunk_size, cache=cache)
    scores = sa_compute(counts, empty)
    return scores.layer, scores.units, ~counts.prototypes_defined
