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

import pandas as pd
import torch

from segability.analysis import GuideKind, OutputKind
from segability.capture import LayerSpec
from segability.integrations import SAAccumulator, split_batch

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

HISTORY_COLUMNS = ["epoch", "step", "depth", "layer", "sa", "sa_pred", "images"]


class SACallback(Callback):
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

    The values equal :func:`segability.analyze` on the same batches with the same weights. The
    image itself is scored as the layer ``"input"``.

    Args:
        layers: "auto" (every convolution) or a selection (see
            :func:`segability.capture.resolve_layers`).
        num_batches: validation batches scored per epoch (None: all).
        units: also score every unit and log each layer's mean unit SA.
        guide: prototypes from the network's probability map ("prediction") or the label ("label").
        output: how to read the output: "auto", "sigmoid", "softmax" or "probabilities".
        target: the target class (K-channel outputs or multi-class labels); default 1.
        log_prefix: prefix of the logged names.
        batch_to_xy: callable batch -> (images, labels or None); default reads an ``(x, y)``
            pair, a dict with "image"/"label" or a tensor (see
            :func:`segability.integrations.split_batch`).
        forward: callable (module, images) -> output used for the callback's forward pass
            (default ``module(images)``), e.g. ``lambda m, x: m.net(x)``.
        output_key: key of a dict output.
        mask: pixels that shape the prototypes: None, "nonzero" or a callable images -> (B, 1, *S).
        empty: Dice convention for two empty maps ("one" or "nan").
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
        empty: Literal["one", "nan"] = "one",
        dataloader_idx: int = 0,
    ):
        super().__init__()
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches must be a positive integer or None (all batches), got {num_batches!r}")
        if guide not in ("prediction", "label"):
            raise ValueError(f'guide must be "prediction" or "label", got {guide!r}')
        if output not in ("auto", "sigmoid", "softmax", "probabilities"):
            raise ValueError(f'output must be "auto", "sigmoid", "softmax" or "probabilities", got {output!r}')
        if not isinstance(log_prefix, str):
            raise ValueError(f"log_prefix must be a string, got {type(log_prefix).__name__}")
        for name, fn in (("batch_to_xy", batch_to_xy), ("forward", forward)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a callable or None, got {type(fn).__name__}")
        self.layers = layers
        self.num_batches = num_batches
        self.units = units
        self.guide = guide
        self.output = output
        self.target = target
        self.log_prefix = log_prefix
        self.batch_to_xy = batch_to_xy or split_batch
        self.forward = forward
        self.output_key = output_key
        self.mask = mask
        self.empty = empty
        self.dataloader_idx = dataloader_idx
        self.accumulator: SAAccumulator | None = None
        self._batches = 0
        self._rows: list[dict[str, Any]] = []

    @property
    def history(self) -> pd.DataFrame:
        """One row per validation run and layer (see the class docstring)."""
        columns = HISTORY_COLUMNS + (["unit_sa", "unit_sa_pred"] if self.units else [])
        return pd.DataFrame(self._rows, columns=columns)

    # ---------------------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.accumulator is None or self.accumulator.model is not pl_module:
            self.accumulator = SAAccumulator(
                pl_module,
                self.layers,
                units=self.units,
                guide=self.guide,
                output=self.output,
                target=self.target,
                output_key=self.output_key,
                mask=self.mask,
                empty=self.empty,
            )
        self.accumulator.open()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.accumulator is not None:
            self.accumulator.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Lightning does not call callbacks' teardown when fit raises.
        if self.accumulator is not None:
            self.accumulator.close()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._batches = 0
        if self.accumulator is not None:
            self.accumulator.reset()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != self.dataloader_idx or self.accumulator is None:
            return
        if self.num_batches is not None and self._batches >= self.num_batches:
            return
        images, labels = self.batch_to_xy(batch)
        forward = None if self.forward is None else (lambda x: self.forward(pl_module, x))
        precision = getattr(trainer, "precision_plugin", None)
        context = precision.forward_context() if hasattr(precision, "forward_context") else contextlib.nullcontext()
        with context:
            self.accumulator.update(images, labels, forward=forward)
        self._batches += 1

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.accumulator is None:
            return
        acc = self.accumulator
        # Every process takes part in the sum, also one that saw no batch (a zero state).
        state = trainer.strategy.reduce(acc.state_tensor(pl_module.device).clone(), reduce_op="sum")
        acc.load_state_tensor(state)
        table = acc.table()
        if int(table["images"].iloc[0]) == 0:
            return
        labelled = bool(table["sa"].notna().any())
        hidden = table[table["layer"] != "input"]
        p = self.log_prefix
        for row in table.itertuples(index=False):
            if labelled:
                pl_module.log(f"{p}{row.layer}", float(row.sa), sync_dist=True)
            pl_module.log(f"{p}pred/{row.layer}", float(row.sa_pred), sync_dist=True)
            if self.units:
                if labelled:
                    pl_module.log(f"{p}unit/{row.layer}", float(row.unit_sa), sync_dist=True)
                pl_module.log(f"{p}unit_pred/{row.layer}", float(row.unit_sa_pred), sync_dist=True)
        if labelled:
            pl_module.log(f"{p}mean", float(hidden["sa"].mean()), sync_dist=True)
        pl_module.log(f"{p}pred/mean", float(hidden["sa_pred"].mean()), sync_dist=True)
        for row in table.to_dict("records"):
            self._rows.append({"epoch": trainer.current_epoch, "step": trainer.global_step, **row})

    # ---------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self._rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rows = list(state_dict.get("history", []))
