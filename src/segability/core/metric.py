"""The stateful SA metric: keeps the additive counts of :mod:`segability.core.reduction`.

This is the one stateful wrapper of the SA reduction. :func:`segability.analyze` updates it with
each layer of a batch and reads the per-image scores; sliding windows update it once per window of
a volume under one image id, so the counts of the windows add up before SA is computed; the
Lightning callback, the MONAI handler and pruning read the mean over images.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from segability.core.functional import (
    EmptyRule,
    _shape,
    _validate_mask,
    validate_features,
    validate_guide,
)
from segability.core.reduction import SACounts, Status, sa_compute, sa_update

__all__ = ["SegmentationAbility", "ImageScores"]


@dataclass
class ImageScores:
    """Per-image SA of one layer: ``ids`` (N), ``sa`` (N, R), ``units`` (N, R, C) or None, ``status`` (N)."""

    ids: list[str]
    sa: torch.Tensor
    units: torch.Tensor | None
    status: list[Status]


class SegmentationAbility:
    """Accumulates SA counts per layer and image over batches (or over the windows of a volume).

    :meth:`update` adds the counts of a batch (see :func:`segability.core.reduction.sa_update`)
    under image ids; counts of the same id add up (the windows of one volume). :meth:`scores`
    turns them into per-image SA with a :class:`~segability.core.reduction.Status`; :meth:`compute`
    gives the mean over images, ignoring undefined (NaN) scores. :meth:`state_tensors` returns
    additive sums and counts, so the means can be all-reduced across processes.

    Args:
        units: also count every unit (channel).
        empty: convention when a feature map and its reference are both empty ("one" or "nan").
        chunk_size: channels resized at once for unit maps (memory bound); automatic when None.

    Example:
        >>> import torch
        >>> from segability import SegmentationAbility
        >>> f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]])
        >>> g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
        >>> metric = SegmentationAbility()
        >>> metric.update({"conv": f}, guide=g)
        >>> metric.scores()["conv"].sa
        tensor([[1.]])
        >>> metric.compute()["layers"]
        {'conv': tensor([1.], dtype=torch.float64)}
    """

    def __init__(self, *, units: bool = False, empty: EmptyRule = "one", chunk_size: int | None = None):
        if empty not in ("one", "nan"):
            raise ValueError(f'empty must be "one" or "nan", got {empty!r}')
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive number of channels or None, got {chunk_size!r}")
        self.units = units
        self.empty = empty
        self.chunk_size = chunk_size
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        self._parts: dict[str, list[tuple[list[str], SACounts]]] = {}
        self._loaded: dict[str, torch.Tensor] = {}
        self._counter = itertools.count()

    @property
    def layers(self) -> list[str]:
        """The layers seen so far, in the order first updated."""
        return list(self._parts)

    @torch.no_grad()
    def update(
        self,
        features: Mapping[str, torch.Tensor] | torch.Tensor,
        guide: torch.Tensor,
        references: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        ids: Sequence[str] | None = None,
        weights: torch.Tensor | None = None,
        prototypes: Mapping[str, torch.Tensor] | None = None,
        output_finite: torch.Tensor | None = None,
        prediction: int | None = None,
        validate: bool = True,
        cache: dict | None = None,
    ) -> None:
        """Add the counts of a batch.

        Args:
            features: {layer name: (B, C, *s)} or one tensor (named "features").
            guide: (B, 1, *S) target probability (the network's prediction or a label).
            references: (B, R, *S) binary masks the SA is measured against; the binarised guide
                (``guide > 0.5``) when None.
            mask: optional (B, 1, *S) pixels that shape the prototypes.
            ids: an id per image; counts of the same id add up. New ids when None.
            weights: optional (B, 1, *S) per-pixel weight of every count (windows: ``1 / n(x)``).
            prototypes: optional fixed {layer: (B, 2, C)} prototypes (a volume's, for its windows).
            output_finite: optional (B,) bool, False where the network output was not finite.
            prediction: index of the reference that is the network's prediction (an empty
                prediction makes SA against it undefined), or None.
            validate: check shapes and values (callers that built the inputs themselves, such as
                the analysis engine, skip it).
            cache: shared by the layers of one batch; see :func:`~segability.core.reduction.sa_update`.
        """
        if isinstance(features, torch.Tensor):
            features = {"features": features}
        if references is None:
            references = (guide > 0.5).to(guide.dtype if guide.is_floating_point() else torch.float32)
        batch = int(guide.shape[0]) if isinstance(guide, torch.Tensor) else 0
        if ids is None:
            ids = [str(next(self._counter)) for _ in range(batch)]
        ids = [str(i) for i in ids]
        if validate:
            self._validate(features, guide, references, mask, ids, prediction)
        cache = {} if cache is None else cache
        for name, feats in features.items():
            dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
            feats = feats.to(dtype)
            key = ("inputs", dtype, feats.device)
            if key not in cache:
                cache[key] = tuple(
                    None if t is None else t.to(device=feats.device, dtype=dtype) for t in (guide, references, mask, weights)
                )
            g, r, m, w = cache[key]
            counts = sa_update(
                feats, g, r, m,
                weights=w,
                prototypes=None if prototypes is None else prototypes.get(name),
                output_finite=output_finite,
                prediction=prediction,
                units=self.units,
                chunk_size=self.chunk_size,
                cache=cache.setdefault(("layer-cache", dtype, feats.device), {}),
            )  # fmt: skip
            self._parts.setdefault(name, []).append((ids, counts))

    def _validate(self, features, guide, references, mask, ids, prediction) -> None:
        if not isinstance(references, torch.Tensor):
            raise ValueError(f"references must be a torch.Tensor (B, R, *spatial), got {type(references).__name__}")
        if isinstance(guide, torch.Tensor) and (references.shape[0] != guide.shape[0] or references.shape[2:] != guide.shape[2:]):
            raise ValueError(f"references must be (B, R, *spatial) on the guide's grid {_shape(guide)}, got {_shape(references)}")
        if bool(((references != 0) & (references != 1)).any()):
            raise ValueError(f"references {_shape(references)} must be binary (0/1)")
        if prediction is not None and not 0 <= prediction < references.shape[1]:
            raise ValueError(f"prediction must index one of the {references.shape[1]} references, got {prediction}")
        for name, feats in features.items():
            validate_features(feats, name=f"features[{name!r}]")
            validate_guide(guide, feats, channels=1)
        if mask is not None:
            _validate_mask(mask, guide)
        if len(ids) != guide.shape[0]:
            raise ValueError(f"ids must give one id per image ({guide.shape[0]}), got {len(ids)}")

    def scores(self, layers: Sequence[str] | None = None) -> dict[str, ImageScores]:
        """Per-image SA of each layer, in the order the ids were first seen; counts of one id summed."""
        out = {}
        for name in self._parts if layers is None else layers:
            parts = self._parts.get(name)
            if not parts:
                continue
            ids = [i for part_ids, _ in parts for i in part_ids]
            counts = parts[0][1] if len(parts) == 1 else SACounts.cat([c for _, c in parts])
            order = list(dict.fromkeys(ids))
            if len(order) != len(ids):
                position = {i: k for k, i in enumerate(order)}
                index = torch.tensor([position[i] for i in ids], dtype=torch.long)
                counts = counts.group_sum(index, len(order))
            computed = sa_compute(counts, self.empty)
            out[name] = ImageScores(ids=order, sa=computed.layer, units=computed.units, status=computed.status)
        return out

    def compute(self) -> dict[str, dict[str, torch.Tensor]]:
        """Mean SA over images: ``{"layers": {layer: (R,)}, "units": {layer: (R, C)}}``.

        Undefined scores are left out of the mean; a mean over no image is NaN.
        """
        sums = self.state_tensors()
        layers, units = {}, {}
        for key, value in sums.items():
            kind, name = key.split("/", 1)
            if kind == "layer_sum":
                layers[name] = value / sums[f"layer_count/{name}"]
            elif kind == "unit_sum":
                units[name] = value / sums[f"unit_count/{name}"]
        return {"layers": layers, "units": units}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Sums and counts of the per-image SA (float64), to all-reduce across processes."""
        out: dict[str, torch.Tensor] = {}
        for name, s in self.scores().items():
            _add(out, f"layer_sum/{name}", f"layer_count/{name}", s.sa)
            if s.units is not None:
                _add(out, f"unit_sum/{name}", f"unit_count/{name}", s.units)
        for key, value in self._loaded.items():
            out[key] = value if key not in out else out[key] + value.to(out[key])
        return out

    def load_state_tensors(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with (e.g. all-reduced) tensors from :meth:`state_tensors`."""
        self.reset()
        for key in state:
            kind = key.split("/", 1)[0]
            if kind not in ("layer_sum", "layer_count", "unit_sum", "unit_count"):
                raise ValueError(f"state keys must come from state_tensors(), got {key!r}")
        self._loaded = {k: v.double() for k, v in state.items()}


def _add(out: dict[str, torch.Tensor], sum_key: str, count_key: str, values: torch.Tensor) -> None:
    ok = ~torch.isnan(values)
    out[sum_key] = torch.where(ok, values, torch.zeros_like(values)).sum(0).double()
    out[count_key] = ok.sum(0).double()

