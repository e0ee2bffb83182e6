"""A stateful SA metric that accumulates over batches, in the manner of torchmetrics."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from segability.core.functional import (
    EmptyRule,
    _shape,
    _validate_mask,
    score_layer,
    validate_features,
    validate_guide,
)

__all__ = ["SegmentationAbility"]


class SegmentationAbility:
    """Accumulates the SA score per layer (and per unit) over batches.

    Each :meth:`update` scores every given layer on the batch (see
    :func:`segability.core.functional.score_layer`); :meth:`compute` returns the mean over all
    images seen so far, ignoring images whose SA is undefined (NaN). State is kept as sums and
    counts, so it can be all-reduced across processes (``state_tensors`` / ``load_state_tensors``).

    Args:
        units: also accumulate the SA of every unit.
        empty: convention when a feature map and its reference are both empty ("one" or "nan").
        chunk_size: channels resized at once for unit maps (memory bound); automatic when None.

    Example:
        >>> import torch
        >>> from segability import SegmentationAbility
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> metric = SegmentationAbility()
        >>> metric.update({"conv": f}, guide=g)
        {'conv': tensor([1.])}
        >>> metric.compute()["layers"]
        {'conv': tensor(1., dtype=torch.float64)}
    """

    def __init__(self, *, units: bool = False, empty: EmptyRule = "one", chunk_size: int | None = None):
        self.units = units
        self.empty = empty
        self.chunk_size = chunk_size
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._layer_sum: dict[str, torch.Tensor] = {}
        self._layer_count: dict[str, torch.Tensor] = {}
        self._unit_sum: dict[str, torch.Tensor] = {}
        self._unit_count: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(
        self,
        features: Mapping[str, torch.Tensor] | torch.Tensor,
        guide: torch.Tensor,
        reference: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Score a batch and add it to the state.

        Args:
            features: {layer name: (B, C, *s)} or one tensor (named "features").
            guide: (B, 1, *S) target probability (the network's prediction or a label).
            reference: (B, 1, *S) binary mask the SA is measured against; the binarised guide
                (``guide > 0.5``) when None.
            mask: optional (B, 1, *S) pixels that shape the prototypes.

        Returns:
            {layer: (B,) SA of each image of the batch}.
        """
        if isinstance(features, torch.Tensor):
            features = {"features": features}
        if reference is None:
            reference = (guide > 0.5).to(guide.dtype if guide.is_floating_point() else torch.float32)
        elif isinstance(reference, torch.Tensor) and isinstance(guide, torch.Tensor):
            # score_layer assumes valid inputs: a reference of another shape would fail deep inside
            # (or broadcast), and a soft reference would silently give a soft Dice.
            if reference.shape != guide.shape:
                raise ValueError(
                    f"reference must have the guide's shape {_shape(guide)}, got {_shape(reference)}"
                )
            if bool(((reference != 0) & (reference != 1)).any()):
                raise ValueError(f"reference {_shape(reference)} must be binary (0/1)")
        out = {}
        for name, feats in features.items():
            validate_features(feats, name=f"features[{name!r}]")
            validate_guide(guide, feats, channels=1)
            validate_guide(reference, feats, name="reference", channels=1)
            if mask is not None:
                _validate_mask(mask, guide)
            g = guide.to(device=feats.device, dtype=feats.dtype)
            r = reference.to(device=feats.device, dtype=feats.dtype)
            m = None if mask is None else mask.to(device=feats.device, dtype=feats.dtype)
            layer, unit, _ = score_layer(
                feats, g, r, m, units=self.units, empty=self.empty, chunk_size=self.chunk_size
            )
            sa = layer[:, 0]
            self._add(self._layer_sum, self._layer_count, name, sa)
            if unit is not None:
                self._add(self._unit_sum, self._unit_count, name, unit[:, 0])
            out[name] = sa
        return out

    @staticmethod
    def _add(sums: dict, counts: dict, name: str, values: torch.Tensor) -> None:
        valid = ~torch.isnan(values)
        total = torch.where(valid, values, torch.zeros_like(values)).sum(0).to(torch.float64)
        n = valid.sum(0).to(torch.float64)
        if name in sums:
            sums[name] = sums[name] + total.to(sums[name].device)
            counts[name] = counts[name] + n.to(counts[name].device)
        else:
            sums[name], counts[name] = total, n

    def compute(self) -> dict[str, dict[str, torch.Tensor]]:
        """Mean SA so far: ``{"layers": {layer: scalar}, "units": {layer: (C,)}}`` (NaN if no image)."""
        def mean(s, c):
            return {k: (s[k] / c[k]).where(c[k] > 0, torch.full_like(s[k], float("nan"))) for k in s}

        return {"layers": mean(self._layer_sum, self._layer_count), "units": mean(self._unit_sum, self._unit_count)}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Flat dict of the sums and counts (for all-reduce across processes)."""
        out = {}
        for prefix, d in (("ls", self._layer_sum), ("lc", self._layer_count), ("us", self._unit_sum), ("uc", self._unit_count)):
            out.update({f"{prefix}/{k}": v for k, v in d.items()})
        return out

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with (e.g. all-reduced) tensors from :meth:`state_tensors`."""
        self.reset()
        target = {"ls": self._layer_sum, "lc": self._layer_count, "us": self._unit_sum, "uc": self._unit_count}
        for key, value in state.items():
            prefix, name = key.split("/", 1)
            target[prefix][name] = value
