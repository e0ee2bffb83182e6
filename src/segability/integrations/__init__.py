"""SA while a network learns: callbacks for training frameworks, and the accumulator they share.

:class:`SAAccumulator` runs batches through the analysis engine (:class:`segability.analysis.Engine`,
the code path of :func:`segability.analyze`) and keeps the running sums of the layer (and unit)
SA as one flat tensor that can be summed across processes; it reports the means as a table. It is
the plain-PyTorch integration (call :meth:`SAAccumulator.update` from any loop); the framework
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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis import (
    INPUT,
    AnalysisConfig,
    Capture,
    EmptyRule,
    Engine,
    GuideKind,
    OutputKind,
    Readout,
    Scoring,
)
from segability.analysis.features import model_device
from segability.analysis.inputs import batches
from segability.capture import FeatureRecorder, LayerSpec, eval_mode
from segability.errors import UsageError

__all__ = ["SAAccumulator", "split_batch", "accumulator_config", "named_means"]

# The state, per layer: a sum and a count of the per-image SA for each column (units: over images
# and units), in the order of the table's columns; then the number of images.
COLUMNS = ("sa", "sa_pred", "unit_sa", "unit_sa_pred")
_WIDTH = 2 * len(COLUMNS)


def accumulator_config(
    layers: LayerSpec | Literal["auto"] = "auto",
    *,
    units: bool = False,
    guide: GuideKind = "prediction",
    output: OutputKind = "auto",
    target: int | None = None,
    output_key: str | None = None,
    mask: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
    reshape: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    empty: EmptyRule = "one",
    chunk_size: int | None = None,
) -> AnalysisConfig:
    """The options of an :class:`SAAccumulator`, validated once (see :class:`AnalysisConfig`).

    Raises:
        UsageError: an option out of its range, named by its argument; a mask tensor (it belongs
            to a fixed set of images: give ``"nonzero"`` or a callable here).
    """
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        raise UsageError(
            "mask must be None, 'nonzero' or a callable images -> (B, 1, *spatial) for batches seen one at a time, "
            "got a tensor",
            argument="mask",
        )
    return AnalysisConfig(
        readout=Readout(output=output, target=target, output_key=output_key),
        scoring=Scoring(guide=guide, units=units, mask=mask, empty=empty, chunk_size=chunk_size),
        capture=Capture(layers=layers, reshape=reshape),
    )


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
    """Hooks that may stay registered through training steps: they pass outputs on (and count
    calls) only inside :meth:`recording`, and only for the layers it names; nothing is kept."""

    def __init__(self, model: nn.Module, layers: LayerSpec):
        super().__init__(model, layers)
        self._wanted: frozenset[str] = frozenset()

    def _hook(self, name: str):
        record = super()._hook(name)

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name in self._wanted:
                record(module, args, output)

        return hook

    @property
    def registered(self) -> bool:
        return bool(self._handles)

    @contextmanager
    def recording(self, names: list[str], callback: Callable[[str, torch.Tensor], None]) -> Iterator[_GatedRecorder]:
        """Hand the outputs of ``names`` to ``callback`` for the duration of the block; hooks not
        registered already (the accumulator is not open) are registered for the block only and
        removed in ``finally``."""
        scoped = not self.registered
        try:
            if scoped:
                self.__enter__()
            self.clear()
            self.callback, self._wanted = callback, frozenset(names)
            yield self
        finally:
            self.callback, self._wanted = None, frozenset()
            if scoped:
                self.remove()


class _Engine(Engine):
    """The analysis engine, running the model through the accumulator's hooks and forward callable."""

    def __init__(self, model: nn.Module, config: AnalysisConfig):
        super().__init__(model, config)
        self.recorder = _GatedRecorder(model, self.names)
        self.forward: Callable[[torch.Tensor], Any] = model

    def run_model(self, x, names, on_output):
        with self.recorder.recording(names, on_output) as rec:
            out = self.forward(x)
        return out, dict(rec.calls), list(rec.order)


class SAAccumulator:
    """Running layer (and unit) SA over batches, reducible across processes.

    Each :meth:`update` scores a batch through the analysis engine, exactly as
    :func:`segability.analyze` does (every chosen layer and the input image, as the layer
    ``"input"``; one forward pass, two for outputs beyond the engine's memory budget or changed in
    place), and adds the per-image scores of :class:`segability.SegmentationAbility`
    (``state_tensors()``) to sums and counts. :meth:`table` returns the means. The sums live in one
    flat float64 tensor (:meth:`state_tensor`, layers in a fixed order), so a distributed run sums
    it across processes once per epoch and loads it back (:meth:`load_state_tensor`).

    Hooks: :meth:`open` registers them until :meth:`close` (they record only during
    :meth:`update`, never in the caller's own forward passes); without :meth:`open`, each
    :meth:`update` registers them for its own forward passes and removes them in ``finally``.

    Args:
        model: the network; its output is read as in :func:`segability.analyze`.
        layers: "auto" (each stage of the network: :func:`segability.capture.default_layers`; every convolution of a plain conv net) or a selection (see
            :func:`segability.capture.resolve_layers`).
        units: also accumulate the SA of every unit; the table then gives each layer's mean unit SA.
        guide, mask, empty, chunk_size: see :class:`segability.analysis.Scoring` (``mask``: None,
            "nonzero" or a callable images -> (B, 1, *S)).
        output, target, output_key: see :class:`segability.analysis.Readout`.
        reshape: see :class:`segability.analysis.Capture`.

    Raises:
        UsageError: an option out of its range (see :func:`accumulator_config`), an unknown layer.

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
        empty: EmptyRule = "one",
        chunk_size: int | None = None,
    ):
        config = accumulator_config(
            layers, units=units, guide=guide, output=output, target=target, output_key=output_key, mask=mask,
            reshape=reshape, empty=empty, chunk_size=chunk_size,
        )  # fmt: skip
        self._start(model, config)

    @classmethod
    def from_config(cls, model: nn.Module, config: AnalysisConfig) -> SAAccumulator:
        """An accumulator with options already validated (e.g. by :func:`accumulator_config`)."""
        if not isinstance(config, AnalysisConfig):
            raise UsageError(f"config must be an AnalysisConfig, got {type(config).__name__}", argument="config")
        if config.windows is not None or config.scoring.keep_maps:
            raise UsageError("config: an accumulator takes no windows and keeps no maps", argument="config")
        acc = cls.__new__(cls)
        acc._start(model, config)
        return acc

    def _start(self, model: nn.Module, config: AnalysisConfig) -> None:
        self.config = config
        self._engine = _Engine(model, config)
        self.model = model
        self.layers = [INPUT, *self._engine.names]
        self.units = config.scoring.units
        self._recorder = self._engine.recorder
        self.reset()

    # ------------------------------------------------------------------------------ hooks
    def open(self) -> SAAccumulator:
        """Register the hooks until :meth:`close` (idempotent)."""
        if not self._recorder.registered:
            self._recorder.__enter__()
        return self

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        self._recorder.remove()
        self._recorder.clear()

    def __enter__(self) -> SAAccumulator:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the accumulated sums (the layer order found so far is kept)."""
        self._state = torch.zeros(len(self.layers) * _WIDTH + 1, dtype=torch.float64)
        self._engine.metric.reset()

    def state_tensor(self, device: str | torch.device | None = None) -> torch.Tensor:
        """The sums and counts as one flat tensor (zeros when nothing was seen), for all-reduce.

        Per layer (``input`` first, then the chosen layers in the order of :attr:`layers`): a sum
        and a count for each of ``sa``, ``sa_pred``, ``unit_sa``, ``unit_sa_pred``; then the
        number of images. float64 (float32 on MPS, which has no float64).

        Args:
            device: where to put it (default: the model's device), so that every process takes
                part in the reduction with a tensor on its own device and of the same shape.
        """
        dev = torch.device(device) if device is not None else model_device(self.model)[0]
        return self._state.to(device=dev, dtype=torch.float32 if dev.type == "mps" else torch.float64)

    def load_state_tensor(self, state: torch.Tensor) -> None:
        """Replace the sums with ``state`` (e.g. summed across processes)."""
        expected = len(self.layers) * _WIDTH + 1
        if not isinstance(state, torch.Tensor) or state.shape != (expected,):
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise UsageError(f"state must be a tensor of shape ({expected},) from state_tensor(), got {got}", argument="state")
        self._state = state.detach().to(device="cpu", dtype=torch.float64)

    @property
    def images(self) -> int:
        """Images accumulated (or loaded) so far."""
        return int(self._state[-1])

    # ------------------------------------------------------------------------------ update
    @torch.no_grad()
    def update(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        forward: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        """Score a batch and add its scores.

        Args:
            images: (B, C, *S) images.
            labels: (B, 1, *S) / (B, *S) label maps or (B, K, *S) one-hot labels; None without labels
                (``sa`` stays NaN).
            forward: how to run the model on ``images`` (default ``model(images)``), e.g.
                ``lambda x: module.net(x)``; it must call the hooked layers once per image batch.

        Raises:
            UsageError: malformed images, labels or model output.
        """
        if not isinstance(images, torch.Tensor) or images.ndim not in (3, 4, 5) or images.shape[0] == 0:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise UsageError(f"images must be a tensor (B, C, *spatial) with B >= 1 and 1-3 spatial dims, got {shape}", argument="images")
        if forward is not None and not callable(forward):
            raise UsageError(f"forward must be a callable or None, got {type(forward).__name__}", argument="forward")
        (batch,) = batches(images, labels, None, None, images.shape[0])
        engine = self._engine
        # The model may have moved since the accumulator was made (Lightning moves it after setup).
        engine.device, engine.dtype = model_device(self.model)
        engine.forward = self.model if forward is None else forward
        try:
            # Lightning validates under torch.inference_mode, whose tensors have no version
            # counter; the engine needs one to see outputs changed in place after their layer.
            with torch.inference_mode(False), torch.no_grad(), eval_mode(self.model):
                engine.score(batch)
            self._add(engine.metric.state_tensors(), len(batch.ids))
        finally:
            engine.metric.reset()
            engine.forward = self.model

    def _add(self, sums: dict[str, torch.Tensor], images: int) -> None:
        """Add a batch's ``SegmentationAbility.state_tensors()`` to the flat state."""
        rows = self._state[:-1].view(len(self.layers), len(COLUMNS), 2)
        sums = {k: v.detach().to(device="cpu", dtype=torch.float64) for k, v in sums.items()}
        for i, name in enumerate(self.layers):
            for kind, columns in (("layer", (0, 1)), ("unit", (2, 3))):
                total = sums.get(f"{kind}_sum/{name}")
                if total is None:  # the layer was not scored on this batch
                    continue
                count = sums[f"{kind}_count/{name}"]
                # The engine's references are [label,] prediction: two when the batch had labels.
                pairs = zip(columns, (0, 1), strict=True) if total.shape[0] == 2 else [(columns[1], 0)]
                for column, r in pairs:
                    rows[i, column, 0] += total[r].sum()
                    rows[i, column, 1] += count[r].sum()
        self._state[-1] += images

    # ------------------------------------------------------------------------------ results
    def table(self) -> pd.DataFrame:
        """Mean SA per layer over the images accumulated (or loaded) so far.

        Returns:
            One row per layer in forward order (``input`` first): ``depth``, ``layer``, ``sa``
            (NaN without labels), ``sa_pred``, ``images`` (images accumulated); with ``units``
            also ``unit_sa`` and ``unit_sa_pred``, each layer's mean over images and units. A mean
            over no defined score is NaN.
        """
        rows = self._state[:-1].view(len(self.layers), len(COLUMNS), 2)
        means = torch.where(rows[..., 1] > 0, rows[..., 0] / rows[..., 1].clamp(min=1), torch.nan)
        depth = dict(self._engine.depth)
        for name in self.layers:  # layers not called (yet): after the called ones, as in analyze
            depth.setdefault(name, len(depth))
        table = pd.DataFrame({"depth": [depth[n] for n in self.layers], "layer": self.layers})
        for k, column in enumerate(COLUMNS[: 4 if self.units else 2]):
            table[column] = means[:, k].tolist()
        table.insert(4, "images", self.images)
        return table.sort_values("depth", kind="stable").reset_index(drop=True)


class _Monitor:
    """What the Lightning callback and the MONAI handler share: their options (validated once, as
    an :class:`AnalysisConfig`), an :class:`SAAccumulator` on the scored network, the batches
    scored per epoch, the named means written at the end of an epoch, and the history.

    Subclasses set :attr:`step_column` (the history's column of the training step) and call
    :meth:`_accumulator_for`, :meth:`_epoch_started`, :meth:`_wants_batch` / :meth:`_add_batch`
    and :meth:`_epoch_means` from their framework's events.
    """

    step_column = "step"

    def __init__(
        self,
        config: AnalysisConfig,
        *,
        num_batches: int | None,
        forward: Callable[[nn.Module, torch.Tensor], Any] | None,
        prefix: str,
        prefix_name: str,
    ):
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
            raise UsageError(f"num_batches must be a positive integer or None (all batches), got {num_batches!r}", argument="num_batches")
        if forward is not None and not callable(forward):
            raise UsageError(f"forward must be a callable or None, got {type(forward).__name__}", argument="forward")
        if not isinstance(prefix, str):
            raise UsageError(f"{prefix_name} must be a string, got {type(prefix).__name__}", argument=prefix_name)
        self.config = config
        self.num_batches = num_batches
        self.forward = forward
        self.prefix = prefix
        self.accumulator: SAAccumulator | None = None
        self._batches = 0
        self._rows: list[dict[str, Any]] = []

    @property
    def units(self) -> bool:
        return self.config.scoring.units

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch and layer: ``epoch``, the step, ``depth``, ``layer``, ``sa``,
        ``sa_pred``, ``images`` (and ``unit_sa``, ``unit_sa_pred`` with units)."""
        columns = ["epoch", self.step_column, "depth", "layer", "sa", "sa_pred", "images"]
        return pd.DataFrame(self._rows, columns=columns + (["unit_sa", "unit_sa_pred"] if self.units else []))

    def _accumulator_for(self, model: nn.Module) -> SAAccumulator:
        if self.accumulator is None or self.accumulator.model is not model:
            self.accumulator = SAAccumulator.from_config(model, self.config)
        return self.accumulator

    def _epoch_started(self) -> None:
        self._batches = 0
        if self.accumulator is not None:
            self.accumulator.reset()

    def _wants_batch(self) -> bool:
        return self.accumulator is not None and (self.num_batches is None or self._batches < self.num_batches)

    def _add_batch(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        net = self.accumulator.model
        self.accumulator.update(images, labels, forward=None if self.forward is None else (lambda x: self.forward(net, x)))
        self._batches += 1

    def _epoch_means(self, reduce: Callable[[torch.Tensor], torch.Tensor], epoch: int, step: int) -> dict[str, float]:
        """Sum the state across processes with ``reduce`` (every process takes part, also one that
        saw no batch), keep the history rows and return the named means (none when no image was
        scored anywhere)."""
        acc = self.accumulator
        acc.load_state_tensor(reduce(acc.state_tensor().clone()))
        if acc.images == 0:
            return {}
        table = acc.table()
        self._rows.extend({"epoch": epoch, self.step_column: step, **row} for row in table.to_dict("records"))
        return named_means(table, self.prefix)


def named_means(table: pd.DataFrame, prefix: str = "sa/") -> dict[str, float]:
    """The means of :meth:`SAAccumulator.table` under the names the callbacks log.

    ``{prefix}{layer}`` (against the label, when there were labels), ``{prefix}pred/{layer}``,
    with units ``{prefix}unit/{layer}`` and ``{prefix}unit_pred/{layer}``, and the means over the
    layers (``input`` excluded) ``{prefix}mean`` and ``{prefix}pred/mean``.
    """
    labelled = bool(table["sa"].notna().any())
    units = "unit_sa" in table.columns
    out: dict[str, float] = {}
    for row in table.itertuples(index=False):
        if labelled:
            out[f"{prefix}{row.layer}"] = float(row.sa)
        out[f"{prefix}pred/{row.layer}"] = float(row.sa_pred)
        if units:
            if labelled:
                out[f"{prefix}unit/{row.layer}"] = float(row.unit_sa)
            out[f"{prefix}unit_pred/{row.layer}"] = float(row.unit_sa_pred)
    hidden = table[table["layer"] != INPUT]
    if labelled:
        out[f"{prefix}mean"] = float(hidden["sa"].mean())
    out[f"{prefix}pred/mean"] = float(hidden["sa_pred"].mean())
    return out
