"""Stream images through a model and reduce every captured layer to SA scores at once.

The package, by what its files hold:

- ``config``: the options as frozen dataclasses, validated once (:class:`AnalysisConfig`).
- ``inputs``: every accepted input form as batches, image ids.
- ``readout``: the network output read as the target's probability (the guide) and prediction.
- ``features``: layer outputs read as features, the default layer choice, the mask.
- ``engine``: the forward passes and the per-layer reduction (:class:`Engine`).
- ``windows``: the same for large volumes in sliding windows (:func:`analyze_windows`).
- ``results``: the result folder -- schema, maps archive, atomic writes, :class:`SAResult`.

:func:`analyze` is the one call a notebook user makes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn

from segability.analysis.config import (
    AnalysisConfig,
    Capture,
    EmptyRule,
    GuideKind,
    OutputKind,
    Readout,
    Scoring,
    Windows,
)
from segability.analysis.engine import Engine
from segability.analysis.features import layer_features, layer_names, tokens_to_grid
from segability.analysis.inputs import batches
from segability.analysis.readout import label_target, model_probabilities, output_tensor
from segability.analysis.results import INPUT, RESULT_FILES, SAResult, load_result
from segability.analysis.windows import analyze_windows
from segability.capture import LayerSpec
from segability.errors import UsageError

__all__ = [
    "analyze",
    "analyze_windows",
    "AnalysisConfig",
    "Readout",
    "Scoring",
    "Capture",
    "Windows",
    "Engine",
    "SAResult",
    "load_result",
    "INPUT",
    "RESULT_FILES",
    "output_tensor",
    "model_probabilities",
    "label_target",
    "layer_features",
    "layer_names",
    "tokens_to_grid",
    "OutputKind",
    "GuideKind",
    "EmptyRule",
]


def analyze(
    model: nn.Module,
    images: Any,
    labels: Any = None,
    *,
    layers: LayerSpec | str = "auto",
    units: bool = False,
    guide: GuideKind = "prediction",
    output: OutputKind = "auto",
    target: int | None = None,
    classes: Sequence[int] | str | None = None,
    class_names: dict[int, str] | None = None,
    mask: Any = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    keep_maps: int = 0,
    output_key: str | None = None,
    reshape: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ids: Sequence[str] | None = None,
    metadata: pd.DataFrame | None = None,
    empty: EmptyRule = "one",
    chunk_size: int | None = None,
    progress: Callable[[int], None] | None = None,
    data: str | None = None,
    model_name: str | None = None,
    low_memory: bool = False,
    memory_budget: int = 512 * 2**20,
) -> SAResult:
    """Segmentation ability of every chosen layer (and unit) of ``model`` on ``images``.

    For each image and layer: ``sa``, the Dice of the layer's feature segmentation map against the
    label (NaN without labels), and ``sa_pred``, against the network's binarised prediction. The
    prototypes come from the network's own probability map (``guide="prediction"``, needs no
    label) or from the label (``guide="label"``). The input image itself is analysed as the layer
    ``"input"``. ``status`` says why a score is undefined (``ok`` when it is not), ``reason`` the
    same in words.

    Layer outputs are read as features (B, C, *spatial). Transformer tokens (B, N, C) are put on
    the grid ``spatial // p`` when N fits it for some patch size p (one class token allowed), and
    channels-last outputs (B, *g, C), as Swin blocks return, are moved to channels-first when only
    that reading fits the input grid; a ``reshape`` callable overrides both rules. Outputs that fit
    none are skipped (status ``not_features``).

    Memory: the guide (the prediction) exists only at the end of the forward pass, so the chosen
    layers' outputs of one batch are kept (at their own, low resolution) until it exists, up to
    ``memory_budget`` bytes. Layers beyond the budget, and outputs the model changes in place after
    the layer, are scored in a second forward pass inside their hooks. ``low_memory=True`` keeps
    nothing: every batch runs twice. A batch that fails in either pass is recorded (status
    ``failed``) and the run goes on.

    Args:
        model: any ``nn.Module`` returning (B, K, *S) logits or probabilities (or a tuple/list whose
            first element is that, or a dict with ``output_key``).
        images: a tensor (N, C, *S); an iterable of single images (C, *S), ``(image, label)`` pairs
            or dicts with "image"/"label"/"id"; or a DataLoader of batches (tensors, pairs or dicts).
        labels: (N, *S), (N, 1, *S) label maps or one-hot (N, K, *S) labels for tensor images, or
            an iterable matching ``images``; None for label-free analysis.
        layers, reshape, batch_size, memory_budget, low_memory: see :class:`Capture`.
        units, guide, mask, empty, keep_maps, chunk_size: see :class:`Scoring`.
        output, target, classes, class_names, output_key: see :class:`Readout`. With
            ``classes`` every class listed (or "all") is scored in the one pass, one-vs-rest, and
            the tables get ``class`` and ``class_name`` columns (one row per image, class, layer).
        device: where to run; default the model's device.
        ids: image ids for tensor / iterable inputs (default: the index); must be unique.
        metadata: extra per-image columns (must have an ``image`` column) joined to ``images``.
        progress: called with the number of images after each batch (e.g. ``tqdm(...).update``).
        data: a description of the data, stored in the settings.
        model_name: a name for the model, stored in the settings (default its class name).

    Returns:
        :class:`SAResult`.

    Raises:
        UsageError: malformed arguments or inputs (a ``ValueError`` naming the argument).
        RuntimeError: when every batch failed in the model (the first error is chained).

    Example:
        >>> import torch
        >>> from monai.networks.nets import UNet
        >>> net = UNet(2, 1, 1, channels=(4, 8), strides=(2,))
        >>> res = analyze(net, torch.rand(2, 1, 32, 32))
        >>> list(res.layers.columns)
        ['image', 'layer', 'depth', 'channels', 'shape', 'sa', 'sa_pred', 'status', 'reason']
    """
    config = AnalysisConfig(
        readout=Readout(output=output, target=target, output_key=output_key,
                        classes=classes, class_names=class_names),
        scoring=Scoring(guide=guide, units=units, mask=mask, empty=empty, keep_maps=keep_maps, chunk_size=chunk_size),
        capture=Capture(layers=layers, reshape=reshape, batch_size=batch_size, memory_budget=memory_budget, low_memory=low_memory),
    )
    if guide == "label" and labels is None and isinstance(images, torch.Tensor):
        raise UsageError('guide="label" needs labels', argument="labels")
    if progress is not None and not callable(progress):
        raise UsageError(f"progress must be a callable taking a number of images, or None; got {progress!r}", argument="progress")
    engine = Engine(model, config, device=device)
    engine.run(batches(images, labels, ids, mask, batch_size), progress)
    return engine.result(
        metadata=metadata, settings={"model": model_name or type(model).__name__, "data": data}
    )
