"""Rank the units of every group: by SA, by filter L1 norm, by first-order Taylor importance, at random.

A group's unit is one output channel of several coupled convolutions (see
:class:`segability.compress.PruneGroup`); its score is the mean, over the group's convolutions, of
that convolution's score for the channel (NaN scores left out; NaN when all are NaN, and pruned
first). Higher means keep.

- ``"sa"``: the unit's SA against the label on the ranking set
  (:func:`segability.prune.unit_scores`, which runs the analysis engine).
- ``"l1"``: the L1 norm of the unit's filter (:func:`segability.prune.filter_l1`).
- ``"taylor"``: ``|sum over the filter of w * dL/dw + b * dL/db|``, the first-order change of the
  training loss ``L`` on the ranking set when the filter is zeroed (Molchanov et al., "Importance
  estimation for neural network pruning", CVPR 2019; torch-pruning's ``TaylorImportance``).
- ``"random"``: uniform scores from a seed.

For a global ranking (one threshold for the whole network), :func:`units_for_fraction`
divides each group's scores by their L2 norm first (Molchanov et al., ICLR 2017), for SA as for the
others, so a layer's scale does not decide how much of it goes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from segability.analysis.inputs import batches
from segability.capture import CONV_TYPES, eval_mode
from segability.compress.graph import PruneGroup
from segability.prune import filter_l1, unit_scores, units_to_prune

__all__ = ["RANKINGS", "group_scores", "taylor_scores", "units_for_fraction"]

Ranking = Literal["sa", "l1", "taylor", "random"]
RANKINGS: tuple[str, ...] = ("sa", "l1", "taylor", "random")


def _loss_for(model_output: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reference model's training loss: Dice + cross-entropy (sigmoid for one channel)."""
    from monai.losses import DiceCELoss

    if model_output.shape[1] == 1:
        return DiceCELoss(sigmoid=True, batch=True)
    return DiceCELoss(softmax=True, to_onehot_y=True, batch=True)


def taylor_scores(
    model: nn.Module,
    layers: Sequence[str],
    images: Any,
    labels: Any,
    *,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """First-order Taylor importance of every output channel of ``layers``.

    ``|sum_filter w * g + b * g_b|`` with ``g`` the gradient of the loss summed over the batches
    of the ranking set, computed in eval mode (running norm statistics, no dropout). The model's
    parameters and their ``.grad`` are left as they were.

    Args:
        model: the network.
        layers: names of convolutions (transposed ones too).
        images: a tensor (N, C, *S) or a sequence of images, the ranking set.
        labels: matching labels.
        loss: ``loss(output, label) -> scalar``; default the training loss of the reference model.
        batch_size: images per forward pass.

    Returns:
        ``{layer: (out_channels,) float64}`` on the CPU.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Conv2d(1, 2, 1, bias=False)
        >>> _ = net.weight.data.copy_(torch.tensor([1.0, -2.0]).view(2, 1, 1, 1))
        >>> mse = lambda out, y: ((out.sum(1, keepdim=True) - y) ** 2).sum()
        >>> s = taylor_scores(net, [""], torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), loss=mse)
        >>> s[""].tolist()  # L = (w0 + w1)^2: dL/dw = 2 (w0 + w1) = -2; |w g| = 2, 4
        [2.0, 4.0]
    """
    modules = dict(model.named_modules())
    convs = []
    for name in layers:
        if not isinstance(modules.get(name), CONV_TYPES):
            raise ValueError(f"the Taylor ranking needs convolution layers, got {name!r}")
        convs.append(modules[name])
    params = [p for m in convs for p in (m.weight, m.bias) if p is not None]
    totals = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    device = params[0].device if params else torch.device("cpu")
    with eval_mode(model), torch.enable_grad():
        for batch in batches(images, labels, None, None, batch_size):
            x, y = batch.images.to(device).float(), batch.labels
            if y is None:
                raise ValueError("the Taylor ranking needs labels (the training loss is measured against them)")
            y = (y.unsqueeze(1) if y.ndim == x.ndim - 1 else y).to(device).float()
            out = model(x)
            fn = loss if loss is not None else _loss_for(out)
            grads = torch.autograd.grad(fn(out, y), params, allow_unused=True)
            for t, g in zip(totals, grads, strict=True):
                if g is not None:
                    t += g.double()
    found = dict(zip((id(p) for p in params), totals, strict=True))
    scores = {}
    for name, m in zip(layers, convs, strict=True):
        transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
        wg = m.weight.detach().double() * found[id(m.weight)]
        if transposed:  # weight (in, out / groups, *k)
            g = m.groups
            per = wg.reshape(g, wg.shape[0] // g, wg.shape[1], -1).sum(dim=(1, 3)).reshape(-1)
        else:
            per = wg.flatten(1).sum(1)
        if m.bias is not None:
            per = per + m.bias.detach().double() * found[id(m.bias)]
        scores[name] = per.abs().cpu()
    return scores


def group_scores(
    model: nn.Module,
    groups: Sequence[PruneGroup],
    ranking: Ranking,
    images: Any = None,
    labels: Any = None,
    *,
    seed: int = 0,
    batch_size: int = 8,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Scores of every group's units (higher: keep), keyed by group root.

    Args:
        model: the network.
        groups: from :func:`segability.compress.prunable_groups`.
        ranking: "sa", "l1", "taylor" or "random".
        images: the ranking set (needed by "sa" and "taylor").
        labels: its labels.
        seed: seed of the random ranking.
        batch_size: images per forward pass.
        loss: the Taylor ranking's loss (default: the reference model's training loss).

    Returns:
        ``{group root: (channels,) float64}``.

    Raises:
        ValueError: an unknown ranking, or a ranking set missing where it is needed.
    """
    if ranking not in RANKINGS:
        raise ValueError(f"ranking must be one of {', '.join(RANKINGS)}, got {ranking!r}")
    if not groups:
        raise ValueError("groups is empty: nothing to rank")
    if ranking == "random":
        gen = torch.Generator().manual_seed(int(seed))
        return {g.name: torch.rand(g.channels, generator=gen, dtype=torch.float64) for g in groups}
    layers = [layer for g in groups for layer in g.layers]
    if ranking == "l1":
        modules = dict(model.named_modules())
        per_layer = {n: filter_l1(modules[n]) for n in layers}
    else:
        if images is None or labels is None:
            raise ValueError(f"ranking={ranking!r} needs images and labels (the ranking set)")
        if ranking == "sa":
            per_layer = unit_scores(model, images, labels, layers=layers, ranking="sa", batch_size=batch_size)
        else:
            per_layer = taylor_scores(model, layers, images, labels, loss=loss, batch_size=batch_size)
    out = {}
    for g in groups:
        stacked = torch.stack([per_layer[n].double() for n in g.layers])
        counted = (~stacked.isnan()).sum(0)
        mean = stacked.nan_to_num(0.0).sum(0) / counted.clamp(min=1)
        out[g.name] = torch.where(counted > 0, mean, torch.full_like(mean, math.nan))
    return out


def units_for_fraction(
    scores: Mapping[str, torch.Tensor],
    fraction: float,
    scope: Literal["layer", "global"] = "layer",
    *,
    normalize: bool = True,
) -> dict[str, list[int]]:
    """The lowest-scored ``fraction`` of the units, per group or over the whole network.

    Built on :func:`segability.prune.units_to_prune` (floor of the count, ties by position, NaN
    first); with ``scope="global"`` and ``normalize`` each group's scores are divided by their
    L2 norm. Every group keeps at least one unit: when a global threshold would take all of a
    group, its highest-scored unit stays.

    Example:
        >>> import torch
        >>> units_for_fraction({"a": torch.tensor([3.0, 1.0, 2.0, 0.5])}, 0.5)
        {'a': [1, 3]}
        >>> units_for_fraction({"a": torch.tensor([0.1, 0.2]), "b": torch.tensor([5.0, 6.0])}, 0.5, "global", normalize=False)
        {'a': [0], 'b': []}
    """
    chosen = units_to_prune(scores, fraction, scope, normalize=normalize and scope == "global")
    for name, idx in chosen.items():
        s = torch.as_tensor(scores[name], dtype=torch.float64).reshape(-1).nan_to_num(-math.inf)
        if idx and len(idx) >= s.numel():
            keep = int(torch.argmax(s))
            chosen[name] = [i for i in idx if i != keep]
    return chosen
