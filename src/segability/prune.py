"""SA as a tool: rank the units of a network by their segmentation ability and prune the weakest.

A unit (an output channel of a convolution) whose feature map cannot segment the target on its
own is a candidate for removal. :func:`unit_scores` ranks the units of every convolution by their
SA against the label (``"sa"``), by the L1 norm of their filter (``"l1"``, Li et al., "Pruning
filters for efficient ConvNets", ICLR 2017) or at random; :func:`mask_units` zeroes chosen units
through forward hooks (nothing in the model is changed, the hooks are removed afterwards); and
:func:`prune_curve` measures the output Dice as more and more of the lowest-ranked units are
zeroed, for each ranking.

The network's output convolutions are never pruned: the trailing convolutions, in forward order,
whose outputs have as many channels as the model output (the head: a 1x1 classifier, or MONAI
UNet's last up-convolution and its residual unit). Zeroing their units zeroes output classes, which
says nothing about the ranking.

Zeroing a unit zeroes the convolution's output channel, bias included; a following normalisation
layer with an affine shift (e.g. BatchNorm) can still turn that channel into a constant.

The prototypes of the SA ranking come from the label by default (``guide="label"``), where the
analysis, the quality estimates and the training integrations default to the network's
prediction. The difference is deliberate: pruning ranks units by what they can segment of the
target on a labelled ranking set (the method), not by how well they agree with the network's own
output; ``guide="prediction"`` gives the label-free ranking.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis import (
    INPUT,
    AnalysisConfig,
    Capture,
    Engine,
    GuideKind,
    OutputKind,
    Readout,
    Scoring,
    label_target,
    layer_names,
    model_probabilities,
    output_tensor,
)
from segability.analysis.features import model_device
from segability.analysis.inputs import Batch, batches
from segability.capture import (
    CONV_TYPES,
    FeatureRecorder,
    LayerSpec,
    conv_layers,
    eval_mode,
    resolve_layers,
)
from segability.core.functional import dice_from_counts
from segability.errors import UsageError
from segability.progress import progress_bar

__all__ = [
    "RANKINGS",
    "prunable_layers",
    "filter_l1",
    "unit_scores",
    "units_to_prune",
    "mask_units",
    "output_dice",
    "prune_curve",
    "plot_prune_curve",
]

Ranking = Literal["sa", "l1", "random"]
Scope = Literal["layer", "global"]
RANKINGS: tuple[str, ...] = ("sa", "l1", "random")
COLORS = {"sa": "#1b9e77", "l1": "#d95f02", "random": "#7570b3"}
# Floating-point slack when turning a fraction into a unit count (0.3 * 10 -> 3, not 2).
_EPS = 1e-9


# ------------------------------------------------------------------------------------ inputs
def _config(
    guide: GuideKind, output: OutputKind, target: int | None, output_key: str | None, batch_size: int
) -> AnalysisConfig:
    """The options of a ranking or a curve, validated once (the analysis's own objects)."""
    return AnalysisConfig(
        readout=Readout(output=output, target=target, output_key=output_key),
        scoring=Scoring(guide=guide, units=True),
        capture=Capture(batch_size=batch_size),
    )


def _batches(images: Any, labels: Any, batch_size: int, *, need_labels: bool = True) -> list[Batch]:
    """Batches of same-shaped images, read as :func:`segability.analyze` reads its inputs: a
    tensor (N, C, *S) with labels (N, 1, *S) / (N, *S), or sequences of single images (C, *S) and
    labels (1, *S) / (*S), of any sizes."""
    if labels is None and need_labels:
        raise UsageError("labels are needed: the Dice of the output and the SA ranking are measured against them", argument="labels")
    out = list(batches(images, labels, None, None, batch_size))
    if not out:
        raise UsageError("images is empty", argument="images")
    return out


# ------------------------------------------------------------------------------------ layers
def prunable_layers(
    model: nn.Module,
    example: torch.Tensor,
    layers: LayerSpec | Literal["auto"] = "auto",
    *,
    output_key: str | None = None,
) -> dict[str, int]:
    """The layers whose units are ranked, with their unit (output channel) counts.

    With ``layers="auto"``: every convolution the forward pass calls, in forward order, except the
    output convolutions (the trailing convolutions whose outputs have as many channels as the
    model output). An explicit selection is taken as given (output convolutions included).

    Args:
        model: the network.
        example: an input batch (B, C, *S) for one forward pass (the first image is enough).
        layers: "auto" or a selection (see :func:`segability.capture.resolve_layers`).
        output_key: key of a dict output.

    Returns:
        ``{layer: channels}`` in forward order.

    Raises:
        ValueError: when nothing is left to prune, or a selected layer is not called.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> prunable_layers(net, torch.zeros(1, 1, 8, 8))
        {'0': 4}
    """
    # Units are output channels of convolutions: the analysis default (stages, blocks) does not apply.
    candidates = conv_layers(model) if isinstance(layers, str) and layers == "auto" else layer_names(model, layers)
    if not isinstance(example, torch.Tensor):
        raise UsageError(f"example must be a tensor (B, C, *spatial), got {type(example).__name__}", argument="example")
    device, dtype = model_device(model)
    x = example[:1].as_subclass(torch.Tensor).to(device=device, dtype=dtype)
    with FeatureRecorder(model, candidates) as rec, eval_mode(model), torch.no_grad():
        out = output_tensor(model(x), output_key)
    if out.ndim < 3:
        raise UsageError(f"the model output must be a (B, K, *spatial) tensor, got {tuple(out.shape)}")
    channels = {n: int(rec.outputs[n][-1].shape[1]) for n in rec.order if rec.outputs[n][-1].ndim >= 2}
    missing = [n for n in candidates if n not in channels]
    if layers != "auto" and missing:
        raise ValueError(f"layers {missing} are not called in the forward pass (or give no (B, C, ...) output)")
    order = [n for n in rec.order if n in channels]
    if layers == "auto":
        k = int(out.shape[1])
        while order and channels[order[-1]] == k:  # the head: output convolutions
            order.pop()
        if not order:
            raise ValueError("every convolution of the model is an output convolution: nothing to prune")
    return {n: channels[n] for n in order}


def filter_l1(module: nn.Module) -> torch.Tensor:
    """L1 norm of each output filter's weights (bias excluded), one value per output channel.

    Works for ``Conv1d/2d/3d`` (weight ``(out, in/groups, *k)``) and their transposed versions
    (weight ``(in, out/groups, *k)``), with any number of groups.

    Raises:
        ValueError: for a module that is not a convolution.

    Example:
        >>> from torch import nn
        >>> conv = nn.Conv2d(1, 2, 1, bias=False)
        >>> _ = conv.weight.data.copy_(torch.tensor([1.0, -3.0]).view(2, 1, 1, 1))
        >>> filter_l1(conv).tolist()
        [1.0, 3.0]
    """
    if not isinstance(module, CONV_TYPES):
        raise ValueError(f"the L1 ranking needs convolution layers, got {type(module).__name__}")
    w = module.weight.detach().abs().double()
    transposed = isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
    if not transposed:
        return w.flatten(1).sum(1).cpu()
    g = module.groups
    w = w.reshape(g, w.shape[0] // g, w.shape[1], -1)  # (groups, in/g, out/g, k)
    return w.sum(dim=(1, 3)).reshape(-1).cpu()


# ------------------------------------------------------------------------------------ ranking
def unit_scores(
    model: nn.Module,
    images: Any,
    labels: Any = None,
    layers: LayerSpec | Literal["auto"] = "auto",
    ranking: Ranking = "sa",
    seed: int = 0,
    *,
    guide: GuideKind = "label",
    batch_size: int = 8,
    output: OutputKind = "auto",
    target: int | None = None,
    output_key: str | None = None,
) -> dict[str, torch.Tensor]:
    """Importance of every unit of the prunable layers: higher means keep.

    - ``"sa"``: the unit's SA against the label, the mean over ``images`` of the per-image unit
      scores of the analysis engine (those of :func:`segability.analyze` with ``units=True``);
      images where a unit's SA is undefined are left out of its mean.
    - ``"l1"``: the L1 norm of the unit's filter weights (:func:`filter_l1`); ``images`` only
      find the layers.
    - ``"random"``: uniform random scores from ``seed``.

    Args:
        model: the network.
        images: a tensor (N, C, *S) or a sequence of images (C, *S), the ranking set.
        labels: matching label maps (needed for ``"sa"``).
        layers: "auto" (every convolution but the output convolutions) or a selection.
        ranking: "sa", "l1" or "random".
        seed: seed of the random ranking.
        guide: where the prototypes of the SA ranking come from. ``"label"`` by default, unlike
            :func:`segability.analyze` (``"prediction"``): ranking units by what they segment of
            the labelled target is the method; ``"prediction"`` gives a label-free ranking.
        batch_size: images per forward pass.
        output, target, output_key: how to read the model output (see
            :class:`segability.analysis.Readout`).

    Returns:
        ``{layer: (channels,) float64 scores}`` in forward order, on the CPU. Units whose SA is
        undefined on every image score NaN and are pruned first.

    Raises:
        UsageError: an unknown ranking or option, ``"sa"`` without labels, malformed inputs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> s = unit_scores(net, torch.rand(2, 1, 8, 8), ranking="random", seed=0)
        >>> list(s), tuple(s["0"].shape)
        (['0'], (4,))
    """
    if ranking not in RANKINGS:
        raise UsageError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}", argument="ranking")
    config = _config(guide, output, target, output_key, batch_size)
    data = _batches(images, labels, batch_size, need_labels=ranking == "sa")
    channels = prunable_layers(model, data[0].images, layers, output_key=output_key)
    return _scores(model, channels, data, ranking, seed, config)


def _scores(
    model: nn.Module, channels: dict[str, int], data: list[Batch], ranking: str, seed: int, config: AnalysisConfig
) -> dict[str, torch.Tensor]:
    if ranking == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return {n: torch.rand(c, generator=gen, dtype=torch.float64) for n, c in channels.items()}
    if ranking == "l1":
        modules = dict(model.named_modules())
        return {n: filter_l1(modules[n]) for n in channels}
    if any(b.labels is None for b in data):
        raise UsageError('ranking="sa" needs labels', argument="labels")
    engine = Engine(model, dataclasses.replace(config, capture=dataclasses.replace(config.capture, layers=list(channels))))
    engine.run(data)
    units = engine.result().units
    means = units[units["layer"] != INPUT].groupby(["layer", "unit"], sort=True)["sa"].mean()
    out = {}
    for name, c in channels.items():
        values = torch.full((c,), math.nan, dtype=torch.float64)
        if name in means.index.get_level_values(0):
            part = means.loc[name]
            values[torch.tensor(part.index.to_numpy(), dtype=torch.long)] = torch.tensor(part.to_numpy(), dtype=torch.float64)
        out[name] = values
    return out


def units_to_prune(
    scores: Mapping[str, torch.Tensor],
    fraction: float,
    scope: Scope = "layer",
    *,
    normalize: bool = False,
) -> dict[str, list[int]]:
    """The lowest-scored units: ``fraction`` of each layer's units, or of all units at once.

    Counts are rounded down (``floor(fraction * units)``). Ties are broken by position (layer
    order, then unit index); NaN scores count as the lowest.

    Args:
        scores: ``{layer: (channels,) scores}``, higher means keep (see :func:`unit_scores`).
        fraction: in [0, 1].
        scope: "layer" (the lowest ``fraction`` of every layer) or "global" (the lowest
            ``fraction`` of all units of the network together).
        normalize: divide each layer's scores by their L2 norm before a global ranking
            (Molchanov et al., ICLR 2017), for scores whose scale differs between layers (L1).

    Returns:
        ``{layer: sorted unit indices}`` with an entry for every layer (possibly empty).

    Example:
        >>> import torch
        >>> s = {"a": torch.tensor([3.0, 1.0, 2.0]), "b": torch.tensor([0.5, 9.0])}
        >>> units_to_prune(s, 0.5)
        {'a': [1], 'b': [0]}
        >>> units_to_prune(s, 0.4, "global")
        {'a': [1], 'b': [0]}
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be a number in [0, 1], got {fraction!r}")
    if scope not in ("layer", "global"):
        raise ValueError(f'scope must be "layer" or "global", got {scope!r}')
    if not scores:
        raise ValueError("scores is empty: no layer to prune")
    clean = {}
    for name, s in scores.items():
        s = torch.as_tensor(s, dtype=torch.float64).reshape(-1).cpu()
        clean[name] = torch.nan_to_num(s, nan=-math.inf)
    if scope == "layer":
        out = {}
        for name, s in clean.items():
            k = math.floor(fraction * s.numel() + _EPS)
            order = torch.sort(s, stable=True).indices[:k]
            out[name] = sorted(int(i) for i in order)
        return out
    parts = []
    for s in clean.values():
        if normalize:
            finite = s[torch.isfinite(s)]
            norm = float(finite.norm()) if finite.numel() else 0.0
            s = s / norm if norm > 0 else s
        parts.append(s)
    flat = torch.cat(parts)
    k = math.floor(fraction * flat.numel() + _EPS)
    chosen = torch.sort(flat, stable=True).indices[:k].tolist()
    offsets = np.cumsum([0] + [s.numel() for s in clean.values()])
    out = {name: [] for name in clean}
    names = list(clean)
    for i in sorted(chosen):
        layer = int(np.searchsorted(offsets, i, side="right")) - 1
        out[names[layer]].append(int(i - offsets[layer]))
    return out


# ------------------------------------------------------------------------------------ masking
@contextmanager
def mask_units(model: nn.Module, units: Mapping[str, Sequence[int]]) -> Iterator[nn.Module]:
    """Zero chosen output channels of chosen layers while the context is open.

    Each listed layer gets a forward hook that returns its output with those channels set to
    zero (a new tensor: the model's parameters are untouched, gradients still flow through the
    other channels). The hooks are removed on exit, also when the body raises.

    Args:
        model: the network.
        units: ``{layer name: unit indices}``; layers with no index are left alone.

    Raises:
        ValueError: an unknown layer (with close matches), or a unit index outside the layer's
            channels (checked at once for convolutions, at the forward pass otherwise).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 3, 1))
        >>> with mask_units(net, {"0": [1]}):
        ...     out = net(torch.ones(1, 1, 2, 2))
        >>> float(out[0, 1].detach().abs().sum())
        0.0
    """
    if not isinstance(units, Mapping):
        raise ValueError(f"units must be a mapping {{layer: [unit indices]}}, got {type(units).__name__}")
    modules = dict(model.named_modules())
    plan = []
    for name, indices in units.items():
        if not isinstance(name, str) or name not in modules or name == "":
            resolve_layers(model, name)  # raises with close matches
            raise ValueError(f"units keys must be layer names, got {name!r}")
        idx = sorted({int(i) for i in indices})
        if not idx:
            continue
        module = modules[name]
        channels = getattr(module, "out_channels", None)
        if idx[0] < 0 or (isinstance(channels, int) and idx[-1] >= channels):
            raise ValueError(f"unit indices of {name!r} must be in [0, {channels}), got {idx}")
        plan.append((name, module, torch.tensor(idx, dtype=torch.long)))
    handles = []
    try:
        for name, module, idx in plan:
            handles.append(module.register_forward_hook(_zero_channels(name, idx)))
        yield model
    finally:
        for h in handles:
            h.remove()


def _zero_channels(name: str, idx: torch.Tensor):
    def hook(module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor) or output.ndim < 2:
            raise ValueError(f"cannot mask units of {name!r}: its output is not a (B, C, ...) tensor")
        if int(idx[-1]) >= output.shape[1]:
            raise ValueError(f"unit {int(idx[-1])} of {name!r} is outside its {output.shape[1]} channels")
        return output.index_fill(1, idx.to(output.device), 0)

    return hook


# ------------------------------------------------------------------------------------ curve
@torch.no_grad()
def output_dice(
    model: nn.Module,
    images: Any,
    labels: Any,
    *,
    batch_size: int = 8,
    output: OutputKind = "auto",
    target: int | None = None,
    output_key: str | None = None,
) -> torch.Tensor:
    """Dice of the model's binarised output against the label, one value per image.

    The output and the label are read as in :func:`segability.analyze` (sigmoid > 0.5 for one
    channel, argmax == target otherwise); two empty maps give 1.

    Returns:
        (N,) float64 Dice on the CPU.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Conv2d(1, 1, 1)
        >>> _ = net.weight.data.fill_(1.0); _ = net.bias.data.fill_(-0.5)
        >>> x = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
        >>> output_dice(net, x, torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])).tolist()
        [0.8]
    """
    config = _config("label", output, target, output_key, batch_size)
    return _dice(model, _batches(images, labels, batch_size), config.readout)


def _dice(model: nn.Module, data: list[Batch], readout: Readout) -> torch.Tensor:
    device, dtype = model_device(model)
    values = []
    with eval_mode(model), torch.no_grad():
        for batch in data:
            x = batch.images.to(device=device, dtype=dtype)
            _, pred, k = model_probabilities(model(x), readout.output, readout.target_index, readout.output_key)
            lab = batch.labels.to(device=device, dtype=torch.float32)
            lab = lab.unsqueeze(1) if lab.ndim == x.ndim - 1 else lab
            lab = label_target(lab, k, readout.target_index, readout.target is not None)
            if lab.shape != pred.shape:
                raise UsageError(f"labels {tuple(batch.labels.shape)} do not match the model output {tuple(pred.shape)}", argument="labels")
            p, t = pred.flatten(1).double(), lab.flatten(1).double()
            values.append(dice_from_counts((p * t).sum(1), p.sum(1), t.sum(1), "one").cpu())
    return torch.cat(values)


def prune_curve(
    model: nn.Module,
    images: Any,
    labels: Any,
    fractions: Sequence[float] = (0, 0.1, 0.2, 0.3, 0.5),
    rankings: Sequence[Ranking] = ("sa", "l1", "random"),
    seeds: Sequence[int] = (0, 1, 2),
    scope: Scope = "layer",
    *,
    layers: LayerSpec | Literal["auto"] = "auto",
    rank_images: Any = None,
    rank_labels: Any = None,
    guide: GuideKind = "label",
    batch_size: int = 8,
    output: OutputKind = "auto",
    target: int | None = None,
    output_key: str | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """Output Dice as the lowest-ranked units are zeroed, for each ranking.

    For every ranking and fraction, the units chosen by :func:`units_to_prune` (per layer, or
    over the whole network for ``scope="global"``, where L1 scores are L2-normalised per layer)
    are zeroed with :func:`mask_units` and the mean Dice of the output against the label is
    measured on ``images``. The random ranking is repeated for every seed; SA and L1 are
    deterministic and measured once. The output convolutions are never pruned (see
    :func:`prunable_layers`).

    Args:
        model: the network.
        images: evaluation images, a tensor (N, C, *S) or a sequence of images (C, *S).
        labels: matching labels.
        fractions: fractions of units to zero, each in [0, 1].
        rankings: any of "sa", "l1", "random".
        seeds: seeds of the random ranking.
        scope: "layer" or "global".
        layers: "auto" or a selection of the layers whose units may be zeroed.
        rank_images: the images the SA ranking is measured on (default ``images``; ranking and
            evaluating on the same labelled images favours SA, give a separate set to avoid it).
        rank_labels: their labels.
        guide: prototypes of the SA ranking from the label (default, deliberately unlike
            :func:`segability.analyze`; see :func:`unit_scores`) or the prediction.
        batch_size: images per forward pass.
        output, target, output_key: how to read the model output (see
            :class:`segability.analysis.Readout`).
        progress: show a progress bar.

    Returns:
        DataFrame with columns ``ranking``, ``fraction``, ``seed`` (nullable integer: the seed of a
        random ranking, missing for SA and L1), ``dice`` (mean over images) and
        ``pruned_units`` (how many units were zeroed).

    Raises:
        ValueError: malformed arguments or inputs.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> x, y = torch.rand(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
        >>> df = prune_curve(net, x, y, fractions=(0, 0.5), rankings=("l1",))
        >>> df[["ranking", "fraction", "pruned_units"]].values.tolist()
        [['l1', 0.0, 0], ['l1', 0.5, 2]]
    """
    fractions = [float(f) for f in _sequence(fractions, "fractions")]
    for f in fractions:
        if not 0 <= f <= 1:
            raise ValueError(f"fractions must be in [0, 1], got {f}")
    rankings = list(_sequence(rankings, "rankings"))
    unknown = [r for r in rankings if r not in RANKINGS]
    if unknown:
        raise ValueError(f"rankings must be among {', '.join(RANKINGS)}, got {unknown}")
    seeds = [int(s) for s in _sequence(seeds, "seeds")] if "random" in rankings else []
    if scope not in ("layer", "global"):
        raise ValueError(f'scope must be "layer" or "global", got {scope!r}')
    config = _config(guide, output, target, output_key, batch_size)
    evaluation = _batches(images, labels, batch_size)
    if (rank_images is None) != (rank_labels is None) and "sa" in rankings:
        raise ValueError("give rank_images and rank_labels together")
    ranking_set = evaluation if rank_images is None else _batches(rank_images, rank_labels, batch_size)
    channels = prunable_layers(model, evaluation[0].images, layers, output_key=output_key)

    runs = [(r, s) for r in rankings for s in (seeds if r == "random" else [None])]
    total = len(runs) * len(fractions)
    rows = []
    baseline: float | None = None
    with progress_bar(progress, total, "pruning") as advance:
        for ranking, seed in runs:
            scores = _scores(model, channels, ranking_set, ranking, 0 if seed is None else seed, config)
            for f in fractions:
                chosen = units_to_prune(scores, f, scope, normalize=ranking == "l1")
                pruned = sum(len(v) for v in chosen.values())
                if pruned == 0 and baseline is not None:
                    dice = baseline
                else:
                    with mask_units(model, chosen):
                        dice = float(_dice(model, evaluation, config.readout).mean())
                    if pruned == 0:
                        baseline = dice
                rows.append({"ranking": ranking, "fraction": f, "seed": seed, "dice": dice, "pruned_units": pruned})
                advance(1)
    table = pd.DataFrame(rows, columns=["ranking", "fraction", "seed", "dice", "pruned_units"])
    return table.astype({"ranking": str, "fraction": float, "seed": "Int64", "dice": float, "pruned_units": int})


def _sequence(values: Any, name: str) -> Sequence[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list, got {values!r}")
    return values




# ------------------------------------------------------------------------------------ figure
def plot_prune_curve(table: pd.DataFrame, path: str | Path | None = None, *, title: str | None = None):
    """Dice against the fraction of units zeroed, one line per ranking.

    Rankings measured with several seeds (random) are drawn as their mean with a min-max band.
    Uses the Agg canvas (no display needed).

    Args:
        table: the output of :func:`prune_curve` (columns ranking, fraction, seed, dice).
        path: where to save the figure (PNG), or None.
        title: the figure title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: when columns are missing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    missing = {"ranking", "fraction", "dice"} - set(table.columns)
    if missing:
        raise ValueError(f"table needs the columns ranking, fraction, dice; missing {sorted(missing)}")
    fig = Figure(figsize=(5.5, 4.0), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    order = [r for r in RANKINGS if r in set(table["ranking"])] + sorted(set(table["ranking"]) - set(RANKINGS))
    for ranking in order:
        part = table[table["ranking"] == ranking]
        stats = part.groupby("fraction", sort=True)["dice"].agg(["mean", "min", "max", "count"])
        color = COLORS.get(ranking)
        label = {"sa": "SA (unit vs label)", "l1": "L1 norm of filter", "random": "random"}.get(ranking, ranking)
        if int(stats["count"].max()) > 1:
            n = int(stats["count"].max())
            ax.fill_between(stats.index, stats["min"], stats["max"], color=color, alpha=0.2, linewidth=0)
            label = f"{label} (mean, min-max of {n} seeds)"
        ax.plot(stats.index, stats["mean"], marker="o", color=color, label=label)
    ax.set_xlabel("fraction of units zeroed")
    ax.set_ylabel("output Dice (mean over images)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title(title or "Pruning the lowest-ranked units")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
