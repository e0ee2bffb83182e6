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

import torch
from torch import nn

from segability.analysis import EmptyRule, GuideKind, OutputKind
from segability.capture import LayerSpec
from segability.errors import UsageError
from segability.integrations import _Monitor, accumulator_config

try:
    from ignite.engine import Engine, Events
except ImportError as exc:  # pragma: no cover - depends on the installed package
    raise ImportError(
        "segability.integrations.monai needs pytorch-ignite: pip install 'segability[ignite]'"
    ) from exc

__all__ = ["SAHandler", "image_and_label"]

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


class SAHandler(_Monitor):
    """Accumulate layer SA over an engine's iterations and write it into ``engine.state.metrics``.

    Attach it like MONAI's handlers (``handler.attach(evaluator)``). At ``EPOCH_COMPLETED`` the
    sums are added across processes (``ignite.distributed.all_reduce``) and written as:

    - ``{metric_prefix}{layer}``: mean SA against the label (when the iterations had labels),
    - ``{metric_prefix}pred/{layer}``: mean SA against the network's binarised prediction,
    - ``{metric_prefix}mean`` / ``{metric_prefix}pred/mean``: means over the layers (``input``
      excluded),
    - with ``units=True``: ``{metric_prefix}unit/{layer}`` and ``{metric_prefix}unit_pred/{layer}``.

    The values equal :func:`segability.analyze` on the same images with the same weights (the
    handler runs the analysis engine through :class:`segability.integrations.SAAccumulator`).

    Args:
        layers: "auto" (each stage of the network: :func:`segability.capture.default_layers`; every convolution of a plain conv net) or a selection (see
            :func:`segability.capture.resolve_layers`).
        num_batches: iterations scored per epoch (None: all).
        output_transform: callable ``engine.state.output`` -> ``(images, labels or None)``, each a
            batch tensor or a list of per-image tensors; default :func:`image_and_label`.
        units: also score every unit and report each layer's mean unit SA.
        guide, output, target, output_key, mask, empty: see
            :func:`segability.integrations.accumulator_config`.
        metric_prefix: prefix of the names written into ``engine.state.metrics``.
        network: the network to score (default ``engine.network``).
        batch_transform: when given, callable ``engine.state.batch`` -> ``(images, labels)`` used
            instead of ``output_transform``.
        forward: callable (network, images) -> output for the handler's forward pass (default
            ``network(images)``).

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

    step_column = "iteration"

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
        empty: EmptyRule = "one",
    ):
        config = accumulator_config(
            layers, units=units, guide=guide, output=output, target=target, output_key=output_key, mask=mask, empty=empty
        )
        super().__init__(config, num_batches=num_batches, forward=forward, prefix=metric_prefix, prefix_name="metric_prefix")
        if not callable(output_transform):
            raise UsageError(f"output_transform must be a callable, got {type(output_transform).__name__}", argument="output_transform")
        if batch_transform is not None and not callable(batch_transform):
            raise UsageError(f"batch_transform must be a callable or None, got {type(batch_transform).__name__}", argument="batch_transform")
        if network is not None and not isinstance(network, nn.Module):
            raise UsageError(f"network must be a torch.nn.Module or None, got {type(network).__name__}", argument="network")
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self.network = network

    @property
    def metric_prefix(self) -> str:
        return self.prefix

    def attach(self, engine: Engine) -> None:
        """Register the handler's event handlers on ``engine``.

        Raises:
            UsageError: when no network is given and the engine has none (``engine.network``).
        """
        network = self.network if self.network is not None else getattr(engine, "network", None)
        if not isinstance(network, nn.Module):
            raise UsageError("the engine has no `network` attribute: give SAHandler(network=...)", argument="network")
        self._accumulator_for(network)
        for event, fn in (
            (Events.EPOCH_STARTED, self.epoch_started),
            (Events.ITERATION_COMPLETED, self.iteration_completed),
            (Events.EPOCH_COMPLETED, self.epoch_completed),
        ):
            if not engine.has_event_handler(fn, event):
                engine.add_event_handler(event, fn)

    def epoch_started(self, engine: Engine) -> None:
        self._epoch_started()

    def iteration_completed(self, engine: Engine) -> None:
        if not self._wants_batch():
            return
        if self.batch_transform is not None:
            images, labels = self.batch_transform(engine.state.batch)
        else:
            images, labels = self.output_transform(engine.state.output)
        images, labels = _stack(images, "images"), _stack(labels, "labels")
        if images is None:
            raise UsageError("output_transform returned no images", argument="output_transform")
        self._add_batch(images, labels)

    def epoch_completed(self, engine: Engine) -> None:
        if self.accumulator is None:
            return
        import ignite.distributed as idist

        def all_reduce(state: torch.Tensor) -> torch.Tensor:
            return idist.all_reduce(state, op="SUM") if idist.get_world_size() > 1 else state

        engine.state.metrics.update(self._epoch_means(all_reduce, engine.state.epoch, engine.state.iteration))
