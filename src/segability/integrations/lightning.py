"""SA of every layer after each validation epoch, as a Lightning callback.

:class:`SACallback` measures the segmentation ability of the chosen layers on the first
``num_batches`` validation batches of every validation epoch, logs it through the module's logger
and keeps the history. Needs ``lightning`` (``pip install 'segability[lightning]'``); the older
``pytorch_lightning`` package works too.

How the features are captured: the hooks are registered in ``setup`` and removed in ``teardown``
(and on an exception), but they record only during the callback's own forward pass. In
``on_validation_batch_end`` the callback reads the (already device-placed) batch and runs the
module once more on it, without gradients and in eval mode, with the hooks on; that output is the
guide. The module's ``validation_step`` is left untouched, whatever it does (loss, sliding
windows, test-time augmentation), at the cost of one extra forward pass on ``num_batches`` batches
per epoch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch

from segability.analysis import EmptyRule, GuideKind, OutputKind
from segability.capture import LayerSpec
from segability.errors import UsageError
from segability.integrations import _Monitor, accumulator_config, split_batch

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError:  # pragma: no cover - depends on the installed package
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
    except ImportError as exc:
        raise ImportError(
            "segability.integrations.lightning needs Lightning: pip install 'segability[lightning]'"
        ) from exc

__all__ = ["SACallback"]


class SACallback(Callback, _Monitor):
    """Log the SA of every chosen layer after each validation epoch.

    On each validation epoch (never during the sanity check) the callback scores the first
    ``num_batches`` batches of the first validation dataloader, sums the per-image scores across
    processes (``trainer.strategy.reduce(..., reduce_op="sum")``, so the means are those of all
    the images every process saw) and logs, through ``pl_module.log(..., sync_dist=True)``:

    - ``{log_prefix}{layer}``: mean SA against the label (when the batches have labels),
    - ``{log_prefix}pred/{layer}``: mean SA against the network's own binarised prediction,
    - ``{log_prefix}mean`` and ``{log_prefix}pred/mean``: their means over the layers (``input``
      excluded), the paper's label-free quality estimate,
    - with ``units=True``: ``{log_prefix}unit/{layer}`` and ``{log_prefix}unit_pred/{layer}``,
      the mean unit SA of each layer.

    The values equal :func:`segability.analyze` on the same batches with the same weights (the
    callback runs the analysis engine through :class:`segability.integrations.SAAccumulator`). The
    image itself is scored as the layer ``"input"``.

    Args:
        layers: "auto" (each stage of the network: :func:`segability.capture.default_layers`; every convolution of a plain conv net) or a selection (see
            :func:`segability.capture.resolve_layers`).
        num_batches: validation batches scored per epoch (None: all).
        units: also score every unit and log each layer's mean unit SA.
        guide, output, target, output_key, mask, empty: see
            :func:`segability.integrations.accumulator_config`.
        log_prefix: prefix of the logged names.
        batch_to_xy: callable batch -> (images, labels or None); default reads an ``(x, y)``
            pair, a dict with "image"/"label" or a tensor (see
            :func:`segability.integrations.split_batch`).
        forward: callable (module, images) -> output used for the callback's forward pass
            (default ``module(images)``), e.g. ``lambda m, x: m.net(x)``.
        dataloader_idx: the validation dataloader that is scored.

    Attributes:
        history: DataFrame with one row per validation run and layer: ``epoch``, ``step``,
            ``depth``, ``layer``, ``sa``, ``sa_pred``, ``images`` (and ``unit_sa``,
            ``unit_sa_pred`` with units).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> sa = SACallback(num_batches=2)
        >>> trainer = Trainer(max_epochs=10, callbacks=[sa])  # doctest: +SKIP
        >>> trainer.fit(module, train_loader, val_loader)  # doctest: +SKIP
        >>> sa.history.pivot(index="epoch", columns="layer", values="sa")  # doctest: +SKIP
    """

    step_column = "step"

    def __init__(
        self,
        layers: LayerSpec | Literal["auto"] = "auto",
        num_batches: int | None = 2,
        units: bool = False,
        guide: GuideKind = "prediction",
        output: OutputKind = "auto",
        target: int | None = None,
        log_prefix: str = "sa/",
        *,
        batch_to_xy: Callable[[Any], tuple[torch.Tensor, torch.Tensor | None]] | None = None,
        forward: Callable[[LightningModule, torch.Tensor], Any] | None = None,
        output_key: str | None = None,
        mask: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
        empty: EmptyRule = "one",
        dataloader_idx: int = 0,
    ):
        Callback.__init__(self)
        config = accumulator_config(
            layers, units=units, guide=guide, output=output, target=target, output_key=output_key, mask=mask, empty=empty
        )
        _Monitor.__init__(self, config, num_batches=num_batches, forward=forward, prefix=log_prefix, prefix_name="log_prefix")
        if batch_to_xy is not None and not callable(batch_to_xy):
            raise UsageError(f"batch_to_xy must be a callable or None, got {type(batch_to_xy).__name__}", argument="batch_to_xy")
        self.batch_to_xy = batch_to_xy or split_batch
        self.dataloader_idx = dataloader_idx

    @property
    def log_prefix(self) -> str:
        return self.prefix

    # ---------------------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._accumulator_for(pl_module).open()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.accumulator is not None:
            self.accumulator.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning does not call callbacks' teardown when fit raises.
        if self.accumulator is not None:
            self.accumulator.close()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_started()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != self.dataloader_idx or not self._wants_batch():
            return
        images, labels = self.batch_to_xy(batch)
        precision = getattr(trainer, "precision_plugin", None)
        context = precision.forward_context() if hasattr(precision, "forward_context") else contextlib.nullcontext()
        with context:
            self._add_batch(images, labels)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.accumulator is None:
            return
        means = self._epoch_means(
            lambda state: trainer.strategy.reduce(state, reduce_op="sum"), trainer.current_epoch, trainer.global_step
        )
        for name, value in means.items():
            pl_module.log(name, value, sync_dist=True)

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows = list(state_dict.get("history", []))
