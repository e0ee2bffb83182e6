"""SA while a network learns: callbacks for training frameworks, and the accumulator they share.

:class:`SAAccumulator` turns batches into running sums of the layer (and unit) SA, kept as one
flat tensor that can be summed across processes, and reports the means as a table. It is the
plain-PyTorch integration (call :meth:`SAAccumulator.update` from any loop); the framework
callbacks are thin shells around it:

- :class:`segability.integrations.lightning.SACallback` (needs ``lightning``),
- :class:`segability.integrations.monai.SAHandler` (needs ``monai`` and ``pytorch-ignite``).

The submodules are not imported here, so ``import segability.integrations`` needs neither
framework.

The scores are those of :func:`segability.analyze` on the same images: per image, the Dice of the
layer's feature segmentation map against the label (``sa``) and against the network's binarised
prediction (``sa_pred``), then the mean over the images where it is defined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from segability.analysis import (
    INPUT,
    GuideKind,
    OutputKind,
    label_target,
    layer_features,
    model_probabilities,
)
from segability.capture import FeatureRecorder, LayerSpec, conv_layers, eval_mode, resolve_layers
from segability.core.reduction import score_layer

__all__ = ["SAAccumulator", "split_batch"]

# Columns of the state, per layer: sums and counts of the per-image SA (vs label, vs prediction)
# and of the per-image, per-unit SA (same two references).
_SA, _SA_N, _PRED, _PRED_N, _USA, _USA_N, _UPRED, _UPRED_N = range(8)
_WIDTH = 8


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images and labels of a batch: an ``(x, y)`` pair, a dict with "image"/"label", or a tensor.

    Args:
        batch: a tensor (images only), a tuple/list whose first two items are images and labels,
            or a dict with an "image" key and an optional "label" key.

    Returns:
        ``(images, labels or None)``.

    Raises:
        ValueError: for any other batch structure.

    Example:
        >>> import torch
        >>> x, y = split_batch({"image": torch.zeros(2, 1, 4, 4), "label": torch.ones(2, 1, 4, 4)})
        >>> tuple(x.shape), float(y.sum())
        ((2, 1, 4, 4), 32.0)
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        if "image" not in batch:
            raise ValueError(
                f"batch dicts must have an 'image' key (and a 'label' key for sa), got keys {sorted(map(str, batch))}; "
                "give batch_to_xy= to read other batches"
            )
        return batch["image"], batch.get("label")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        label = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], label
    raise ValueError(
        "batch must be an images tensor, an (images, labels) pair or a dict with 'image'/'label', "
        f"got {type(batch).__name__}; give batch_to_xy= to read other batches"
    )


class _GatedRecorder(FeatureRecorder):
    """A FeatureRecorder whose hooks record only while ``active``: it can stay registered through
    training steps without keeping any activation."""

    def __init__(self, model: nn.Module, layers: LayerSpec):
        super().__init__(model, layers)
        self.active = False

    def _hook(self, name: str):
        record = super()._hook(name)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                record(module, args, output)

        return hook

    @property
    def registered(self) -> bool:
        return bool(self._handles)


class SAAccumulator:
    """Running layer (and unit) SA over batches, reducible across processes.

    Each :meth:`update` runs one forward pass of ``model`` on a batch with hooks on the chosen
    layers, scores every layer (and the input image, as the layer ``"input"``) exactly as
    :func:`segability.analyze` does, and adds the per-image scores to sums and counts.
    :meth:`table` returns the means. The sums live in one flat float64 tensor
    (:meth:`state_tensor`), so a distributed run sums it across processes once per epoch and
    loads it back (:meth:`load_state_tensor`).

    Hooks: :meth:`open` registers them until :meth:`close` (they record only during
    :meth:`update`, never in the caller's own forward passes); without :meth:`open`, each
    :meth:`update` registers them for its own forward pass and removes them in ``finally``.

    Args:
        model: the network; its output is read as in :func:`segability.analyze`.
        layers: "auto" (every convolution) or a selection (see
            :func:`segability.capture.resolve_layers`).
        units: also accumulate the SA of every unit; the table then gives each layer's mean unit SA.
        guide: prototypes from the network's probability map ("prediction") or the label ("label").
        output: "auto", "sigmoid", "softmax" or "probabilities".
        target: the target class (K-channel outputs or multi-class labels); default 1.
        output_key: key of a dict output.
        mask: pixels that shape the prototypes: None, "nonzero" or a callable images -> (B, 1, *S).
        reshape: callable turning a layer output into (B, C, *spatial) features, or None.
        empty: Dice convention for two empty maps ("one" or "nan").
        chunk_size: channels resized at once for unit maps.

    Example:
        >>> import torch
        >>> from monai.networks.nets import UNet
        >>> net = UNet(2, 1, 1, channels=(4, 8), strides=(2,))
        >>> acc = SAAccumulator(net)
        >>> acc.update(torch.rand(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float())
        >>> list(acc.table().columns)
        ['depth', 'layer', 'sa', 'sa_pred', 'images']
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec | Literal["auto"] = "auto",
        *,
        units: bool = False,
        guide: GuideKind = "prediction",
        output: OutputKind = "auto",
        target: int | None = None,
        output_key: str | None = None,
        mask: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
        reshape: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
        empty: Literal["one", "nan"] = "one",
        chunk_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if guide not in ("prediction", "label"):
            raise ValueError(f'guide must be "prediction" or "label", got {guide!r}')
        if output not in ("auto", "sigmoid", "softmax", "probabilities"):
            raise ValueError(f'output must be "auto", "sigmoid", "softmax" or "probabilities", got {output!r}')
        if empty not in ("one", "nan"):
            raise ValueError(f'empty must be "one" or "nan", got {empty!r}')
        if not (mask is None or mask == "nonzero" or callable(mask)):
            raise ValueError(f"mask must be None, 'nonzero' or a callable images -> (B, 1, *spatial), got {mask!r}")
        if layers == "auto":
            names = conv_layers(model)
            if not names:
                raise ValueError("layers='auto' found no convolution in the model: choose layers by name or type")
        else:
            names = [n for n, _ in resolve_layers(model, layers)]
        if INPUT in names:
            raise ValueError(f"a model layer is named {INPUT!r}, which is reserved for the input image")
        self.model = model
        self.layers = [INPUT, *names]
        self.units = units
        self.guide = guide
        self.output = output
        self.target_given = target is not None
        self.target = 1 if target is None else int(target)
        self.output_key = output_key
        self.mask = mask
        self.reshape = reshape
        self.empty = empty
        self.chunk_size = chunk_size
        self._recorder = _GatedRecorder(model, names)
        self._depth: dict[str, int] = {}
        self.reset()

    # ------------------------------------------------------------------------------ hooks
    def open(self) -> SAAccumulator:
        """Register the hooks until :meth:`close` (idempotent)."""
        if not self._recorder.registered:
            self._recorder.__enter__()
        return self

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        self._recorder.active = False
        self._recorder.remove()
        self._recorder.clear()

    def __enter__(self) -> SAAccumulator:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _recording(self) -> Iterator[_GatedRecorder]:
        scoped = not self._recorder.registered
        rec = self._recorder
        try:
            if scoped:
                rec.__enter__()
            rec.clear()
            rec.active = True
            yield rec
        finally:
            rec.active = False
            if scoped:
                rec.remove()

    # ------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the accumulated sums (the layer order found so far is kept)."""
        self._state: torch.Tensor | None = None

    def _zeros(self, device: torch.device) -> torch.Tensor:
        dtype = torch.float32 if device.type == "mps" else torch.float64
        return torch.zeros(len(self.layers) * _WIDTH + 1, dtype=dtype, device=device)

    def state_tensor(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The sums and counts as one flat tensor (zeros when nothing was seen), for all-reduce.

        Args:
            device: where to put a zero state when nothing was seen yet (default: the model's
                device), so that every process takes part in the reduction with the same shape.
        """
        if self._state is not None:
            return self._state
        return self._zeros(torch.device(device) if device is not None else _device_of(self.model))

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the sums with ``state`` (e.g. summed across processes)."""
        expected = len(self.layers) * _WIDTH + 1
        if not isinstance(state, torch.Tensor) or state.shape != (expected,):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must be a tensor of shape ({expected},) from state_tensor(), got {got}")
        self._state = state

    @property
    def images(self) -> int:
        """Images accumulated so far (this process)."""
        return 0 if self._state is None else int(self._state[-1])

    # ------------------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        forward: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        """Run the model on a batch and add its scores.

        Args:
            images: (B, C, *S) images.
            labels: (B, 1, *S) / (B, *S) label maps or (B, K, *S) one-hot labels; None without labels
                (``sa`` stays NaN).
            forward: how to run the model on ``images`` (default ``model(images)``), e.g.
                ``lambda x: module.net(x)``; it must call the hooked layers once per image batch.

        Raises:
            ValueError: malformed images, labels or model output.
        """
        if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4, 5):
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor (B, C, *spatial) with 1-3 spatial dims, got {shape}")
        if self.guide == "label" and labels is None:
            raise ValueError('guide="label" needs labels, but a batch came without them')
        images, labels = _plain(images), _plain(labels)  # e.g. MONAI MetaTensors: plain tensors
        dev = _device_of(self.model)
        x = images.to(dev)
        x = x if x.is_floating_point() else x.float()
        run = forward if forward is not None else self.model
        with self._recording() as rec, eval_mode(self.model):
            out = run(x)
        try:
            self._score(rec, x, labels, out)
        finally:
            rec.clear()

    def _score(self, rec: _GatedRecorder, x: torch.Tensor, labels: torch.Tensor | None, out: Any) -> None:
        prob, pred, k = model_probabilities(out, self.output, self.target, self.output_key)
        if not self._depth:
            self._depth = {INPUT: 0, **{n: d for d, n in enumerate(rec.order, start=1)}}
        label = None
        if labels is not None:
            lab = labels.to(x.device)
            if lab.ndim == x.ndim - 1:
                lab = lab.unsqueeze(1)
            if lab.shape[0] != x.shape[0] or lab.shape[2:] != prob.shape[2:]:
                raise ValueError(f"labels {tuple(lab.shape)} do not match the model output {tuple(prob.shape)}")
            label = label_target(lab, k, self.target, self.target_given)
        valid = torch.isfinite(prob.flatten(1)).all(dim=1)
        prob = torch.nan_to_num(prob, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
        pred = torch.where(valid.view(-1, *([1] * (pred.ndim - 1))), pred, torch.zeros_like(pred))
        guide = label if self.guide == "label" else prob
        refs = pred if label is None else torch.cat([label, pred], dim=1)
        # As in analyze: with an empty prediction, sa_pred compares against nothing (undefined).
        empty_pred = valid & (pred.flatten(1).sum(1) == 0)
        mask = self._mask(x)
        if self._state is None:
            self._state = self._zeros(x.device)
        rows = self._state[:-1].view(len(self.layers), _WIDTH)
        for i, name in enumerate(self.layers):
            if name == INPUT:
                feats = x.float()
            else:
                tensors = rec.pop(name)
                if not tensors:
                    continue
                feats = self._features(tensors[-1], x.shape[0], tuple(x.shape[2:]))
                if feats is None:
                    continue
            self._add(rows[i], feats, guide, refs, label is not None, mask, valid, empty_pred)
        self._state[-1] += x.shape[0]

    def _features(self, feats: torch.Tensor, batch: int, spatial: tuple[int, ...]) -> torch.Tensor | None:
        """The layer output as (B, C, *spatial) features, or None (the rules of analyze)."""
        return layer_features(feats, batch, spatial, self.reshape)[0]

    def _mask(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mask is None:
            return None
        if self.mask == "nonzero":
            return (x != 0).any(dim=1, keepdim=True).float()
        return self.mask(x).to(device=x.device, dtype=torch.float32)

    def _add(self, row, feats, guide, refs, has_label, mask, valid, empty_pred) -> None:
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        feats = feats.to(dtype)
        finite = torch.isfinite(feats.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            feats = torch.where(finite.view(-1, *([1] * (feats.ndim - 1))), feats, torch.zeros_like(feats))
        m = None if mask is None else mask.to(dtype)
        layer, unit, _ = score_layer(
            feats, guide.to(dtype), refs.to(dtype), m, units=self.units, empty=self.empty, chunk_size=self.chunk_size
        )
        bad = ~valid | ~finite
        nan = torch.full_like(layer[:, 0], math.nan)
        sa_pred = torch.where(bad | empty_pred, nan, layer[:, -1])
        _sum_into(row, _PRED, sa_pred)
        if has_label:
            _sum_into(row, _SA, torch.where(bad, nan, layer[:, 0]))
        if unit is not None:
            keep = (~bad).view(-1, 1)
            _sum_into(row, _UPRED, torch.where(keep & ~empty_pred.view(-1, 1), unit[:, -1], math.nan))
            if has_label:
                _sum_into(row, _USA, torch.where(keep, unit[:, 0], math.nan))

    # ------------------------------------------------------------------------------ results
    def table(self) -> pd.DataFrame:
        """Mean SA per layer over the images accumulated (or loaded) so far.

        Returns:
            One row per layer in forward order (``input`` first): ``depth``, ``layer``, ``sa``
            (NaN without labels), ``sa_pred``, ``images`` (images accumulated); with ``units``
            also ``unit_sa`` and ``unit_sa_pred``, each layer's mean over images and units.
        """
        state = self.state_tensor().detach().double().cpu()
        rows = state[:-1].view(len(self.layers), _WIDTH)

        def mean(s: torch.Tensor, n: torch.Tensor) -> list[float]:
            return [float(a / b) if b > 0 else math.nan for a, b in zip(s.tolist(), n.tolist(), strict=True)]

        depth = dict(self._depth) or {INPUT: 0}
        for name in self.layers:  # layers not called (yet): after the called ones, as in analyze
            depth.setdefault(name, len(depth))
        table = pd.DataFrame(
            {
                "depth": [depth[n] for n in self.layers],
                "layer": self.layers,
                "sa": mean(rows[:, _SA], rows[:, _SA_N]),
                "sa_pred": mean(rows[:, _PRED], rows[:, _PRED_N]),
                "images": int(state[-1]),
            }
        )
        if self.units:
            table["unit_sa"] = mean(rows[:, _USA], rows[:, _USA_N])
            table["unit_sa_pred"] = mean(rows[:, _UPRED], rows[:, _UPRED_N])
        return table.sort_values("depth", kind="stable").reset_index(drop=True)


def _sum_into(row: torch.Tensor, column: int, values: torch.Tensor) -> None:
    """Add the non-NaN values (any shape) to ``row[column]`` and their count to ``row[column + 1]``."""
    ok = ~torch.isnan(values)
    row[column] += torch.where(ok, values, torch.zeros_like(values)).sum().to(row.dtype)
    row[column + 1] += ok.sum().to(row.dtype)


def _plain(t: torch.Tensor | None) -> torch.Tensor | None:
    if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor:
        return t.as_subclass(torch.Tensor)
    return t


def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    if param is None:
        param = next(iter(model.buffers()), None)
    return param.device if param is not None else torch.device("cpu")
