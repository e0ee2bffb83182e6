"""SA of every layer in MONAI / ignite engines, as a handler that attaches like MONAI's own.

:class:`SAHandler` accumulates the segmentation ability of the chosen layers over the iterations
of an engine (``monai.engines.SupervisedEvaluator`` or any ignite ``Engine``) and writes the means
into ``engine.state.metrics`` when the epoch completes. Needs ``pytorch-ignite``
(``pip install 'segability[ignite]'``).

How the features are captured: on ``ITERATION_COMPLETED`` the handler takes the images (and labels)
of the iteration from ``engine.state.output`` (where ``SupervisedEvaluator`` keeps them, already
on the device) and runs the network once more on them, without gradients and in eval mode, with
hooks registered for that forward pass only (removed in ``finally``). That output is the guide.
The engine's own inferer and post-processing are untouched: a sliding-window inferer or
thresholded predictions do not change what is scored, which is always the network's output on
the whole image. The cost is one extra forward pass per scored iteration (``num_batches`` limits
them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from segability.analysis import GuideKind, OutputKind
from segability.capture import LayerSpec
from segability.integrations import SAAccumulator

try:
    from ignite.engine import Engine, Events
except ImportError as exc:  # pragma: no cover - depends on the installed package
    raise ImportError(
        "segability.integrations.monai needs pytorch-ignite: pip install 'segability[ignite]'"
    ) from exc

__all__ = ["SAHandler", "image_and_label"]

HISTORY_COLUMNS = ["epoch", "iteration", "depth", "layer", "sa", "sa_pred", "images"]


def _stack(items: Any, name: str) -> torch.Tensor | None:
    if items is None or isinstance(items, torch.Tensor):
        return items
    if isinstance(items, Sequence) and not isinstance(items, str):
        if any(i is None for i in items):
            return None
        if all(isinstance(i, torch.Tensor) for i in items) and items:
            return torch.stack(list(items))
    raise ValueError(f"{name} must be a tensor or a list of per-image tensors, got {type(items).__name__}")


def image_and_label(output: Any) -> tuple[Any, Any]:
    """Images and labels of an engine output: a dict, or a decollated list of dicts.

    ``SupervisedEvaluator`` stores the device-placed inputs and labels under "image" and "label"
    (``monai.utils.CommonKeys``); after decollation (the default) the output is a list of
    per-image dicts. A missing label gives None (``sa`` is then not written).

    Raises:
        ValueError: when the output has no "image".

    Example:
        >>> import torch
        >>> out = [{"image": torch.zeros(1, 4, 4), "label": torch.ones(1, 4, 4)}] * 2
        >>> x, y = image_and_label(out)
        >>> len(x), float(y[1].sum())
        (2, 16.0)
    """
    if isinstance(output, dict):
        if "image" not in output:
            raise ValueError(f"the engine output has no 'image' (keys {sorted(map(str, output))}); give output_transform=")
        return output["image"], output.get("label")
    if isinstance(output, (list, tuple)) and output and all(isinstance(o, dict) for o in output):
        if any("image" not in o for o in output):
            raise ValueError("the decollated engine output has no 'image'; give output_transform=")
        labels = [o.get("label") for o in output]
        return [o["image"] for o in output], (None if any(lab is None for lab in labels) else labels)
    raise ValueError(
        f"cannot find images in an engine output of type {type(output).__name__}; give output_transform="
    )


class SAHandler:
    """Accumulate layer SA over an engine's iterations and write it into ``engine.state.metrics``.

    Attach it like MONAI's handlers (``handler.attach(evaluator)``). At ``EPOCH_COMPLETED`` the
    sums are added across processes (``ignite.distributed.all_reduce``) and written as:

    - ``{metric_prefix}{layer}``: mean SA against the label (when the iterations had labels),
    - ``{metric_prefix}pred/{layer}``: mean SA against the network's binarised prediction,
    - ``{metric_prefix}mean`` / ``{metric_prefix}pred/mean``: means over the layers (``input``
      excluded),
    - with ``units=True``: ``{metric_prefix}unit/{layer}`` and ``{metric_prefix}unit_pred/{layer}``.

    The values equal :func:`segability.analyze` on the same images with the same weights.

    Args:
        layers: "auto" (every convolution) or a selection (see
            :func:`segability.capture.resolve_layers`).
        num_batches: iterations scored per epoch (None: all).
        output_transform: callable ``engine.state.output`` -> ``(images, labels or None)``, each a
            batch tensor or a list of per-image tensors; default :func:`image_and_label`.
        units: also score every unit and report each layer's mean unit SA.
        guide: prototypes from the network's probability map ("prediction") or the label ("label").
        output: how to read the network output: "auto", "sigmoid", "softmax" or "probabilities".
        target: the target class (K-channel outputs or multi-class labels); default 1.
        metric_prefix: prefix of the names written into ``engine.state.metrics``.
        network: the network to score (default ``engine.network``).
        batch_transform: when given, callable ``engine.state.batch`` -> ``(images, labels)`` used
            instead of ``output_transform``.
        forward: callable (network, images) -> output for the handler's forward pass (default
            ``network(images)``).
        output_key: key of a dict output.
        mask: pixels that shape the prototypes: None, "nonzero" or a callable images -> (B, 1, *S).
        empty: Dice convention for two empty maps ("one" or "nan").

    Attributes:
        history: one row per epoch and layer: ``epoch``, ``iteration``, ``depth``, ``layer``,
            ``sa``, ``sa_pred``, ``images`` (and ``unit_sa``, ``unit_sa_pred`` with units).

    Example:
        >>> from monai.engines import SupervisedEvaluator
        >>> evaluator = SupervisedEvaluator(device, val_loader, net)  # doctest: +SKIP
        >>> SAHandler(num_batches=4).attach(evaluator)  # doctest: +SKIP
        >>> evaluator.run()  # doctest: +SKIP
        >>> evaluator.state.metrics["sa/pred/mean"]  # doctest: +SKIP
    """

    def __init__(
        self,
        layers: LayerSpec | Literal["auto"] = "auto",
        num_batches: int | None = None,
        output_transform: Callable[[Any], tuple[Any, Any]] = image_and_label,
        units: bool = False,
        guide: GuideKind = "prediction",
        output: OutputKind = "auto",
        target: int | None = None,
        metric_prefix: str = "sa/",
        *,
        network: nn.Module | None = None,
        batch_transform: Callable[[Any], tuple[Any, Any]] | None = None,
        forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
        output_key: str | None = None,
        mask: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
        empty: Literal["one", "nan"] = "one",
    ):
        if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches must be a positive integer or None (all iterations), got {num_batches!r}")
        for name, fn in (("output_transform", output_transform), ("batch_transform", batch_transform), ("forward", forward)):
            if fn is not None and not callable(fn):
                raise ValueError(f"{name} must be a callable, got {type(fn).__name__}")
        if output_transform is None:
            raise ValueError("output_transform must be a callable, got None")
        if guide not in ("prediction", "label"):
            raise ValueError(f'guide must be "prediction" or "label", got {guide!r}')
        if network is not None and not isinstance(network, nn.Module):
            raise ValueError(f"network must be a torch.nn.Module or None, got {type(network).__name__}")
        self.layers = layers
        self.num_batches = num_batches
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self.units = units
        self.guide = guide
        self.output = output
        self.target = target
        self.metric_prefix = metric_prefix
        self.network = network
        self.forward = forward
        self.output_key = output_key
        self.mask = mask
        self.empty = empty
        self.accumulator: SAAccumulator | None = None
        self._batches = 0
        self._rows: list[dict[str, Any]] = []

    @property
    def history(self) -> pd.DataFrame:
        """One row per epoch and layer (see the class docstring)."""
        columns = HISTORY_COLUMNS + (["unit_sa", "unit_sa_pred"] if self.units else [])
        return pd.DataFrame(self._rows, columns=columns)

    def attach(self, engine: Engine) -> None:
        """Register the handler's event handlers on ``engine``.

        Raises:
            ValueError: when no network is given and the engine has none (``engine.network``).
        """
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if not isinstance(network, nn.Module):
            raise ValueError("the engine has no `network` attribute: give SAHandler(network=...)")
        self.accumulator = SAAccumulator(
            network,
            self.layers,
            units=self.units,
            guide=self.guide,
            output=self.output,
            target=self.target,
            output_key=self.output_key,
            mask=self.mask,
            empty=self.empty,
        )
        for event, fn in (
            (Events.EPOCH_STARTED, self.epoch_started),
            (Events.ITERATION_COMPLETED, self.iteration_completed),
            (Events.EPOCH_COMPLETED, self.epoch_completed),
        ):
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)

    def epoch_started(self, engine: Engine) -> None:
        self._batches = 0
        if self.accumulator is not None:
            self.accumulator.reset()

    def iteration_completed(self, engine: Engine) -> None:
        if self.accumulator is None or (self.num_batches is not None and self._batches >= self.num_batches):
            return
        if self.batch_transform is not None:
            images, labels = self.batch_transform(engine.state.batch)
        else:
            images, labels = self.output_transform(engine.state.output)
        images, labels = _stack(images, "images"), _stack(labels, "labels")
        if images is None:
            raise ValueError("output_transform returned no images")
        net = self.accumulator.model
        forward = None if self.forward is None else (lambda x: self.forward(net, x))
        self.accumulator.update(images, labels, forward=forward)
        self._batches += 1

    def epoch_completed(self, engine: Engine) -> None:
        if self.accumulator is None:
            return
        import ignite.distributed as idist

        acc = self.accumulator
        state = acc.state_tensor()
        if idist.get_world_size() > 1:
            state = idist.all_reduce(state.clone(), op="SUM")
        acc.load_state_tensor(state)
        table = acc.table()
        if int(table["images"].iloc[0]) == 0:
            return
        labelled = bool(table["sa"].notna().any())
        hidden = table[table["layer"] != "input"]
        p, metrics = self.metric_prefix, engine.state.metrics
        for row in table.itertuples(index=False):
            if labelled:
                metrics[f"{p}{row.layer}"] = float(row.sa)
            metrics[f"{p}pred/{row.layer}"] = float(row.sa_pred)
            if self.units:
                if labelled:
                    metrics[f"{p}unit/{row.layer}"] = float(row.unit_sa)
                metrics[f"{p}unit_pred/{row.layer}"] = float(row.unit_sa_pred)
        if labelled:
            metrics[f"{p}mean"] = float(hidden["sa"].mean())
        metrics[f"{p}pred/mean"] = float(hidden["sa_pred"].mean())
        for row in table.to_dict("records"):
            self._rows.append({"epoch": engine.state.epoch, "iteration": engine.state.iteration, **row})
