"""SA-guided compression that shrinks the network: channels removed for real, then fine-tuned.

:mod:`segability.prune` zeroes units through hooks (the network keeps its size). Here the units
are removed with everything that depends on them, using the dependency graph of ``torch-pruning``
(the optional extra ``segability[compress]``):

- :func:`prunable_groups`: the channels that go together (a convolution's outputs, its norm and
  activation, the convolutions added to it in residual units, the readers of a skip
  concatenation); output convolutions are never touched.
- :func:`group_scores`: SA, L1, first-order Taylor or random scores for every unit;
  :func:`units_for_fraction` picks the lowest, per layer or globally.
- :func:`prune_units`: removes them; :func:`zeroing_plan` gives the hook-zeroing network that
  computes exactly the same (``segability.prune.mask_units(model, plan)``).
- :func:`compress_study`: every ranking x scope x fraction, fine-tuned with the same budget, with
  parameters, MACs, CPU latency and Dice before / after; :func:`plot_pareto`.
- :func:`save_pruned` / :func:`load_pruned`: a pruned model as a file plain PyTorch rebuilds.

Example:
    >>> import copy, torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 1, 1)).eval()
    >>> x = torch.rand(2, 1, 16, 16)
    >>> groups = prunable_groups(net, x)
    >>> chosen = units_for_fraction(group_scores(net, groups, "l1"), 0.5)
    >>> small = prune_units(copy.deepcopy(net), chosen, x)
    >>> small[0].out_channels, model_cost(small, x)[1] < model_cost(net, x)[1]
    (4, True)
"""

from __future__ import annotations

from segability.compress.artefact import FORMAT, load_pruned, save_pruned
from segability.compress.graph import (
    PruneGroup,
    cpu_latency,
    model_cost,
    prunable_groups,
    prune_units,
    zeroing_plan,
)
from segability.compress.rank import RANKINGS, group_scores, taylor_scores, units_for_fraction
from segability.compress.study import (
    COLUMNS,
    FinetuneConfig,
    StudyConfig,
    compress_study,
    finetune,
    plot_pareto,
)

__all__ = [
    "COLUMNS",
    "FORMAT",
    "RANKINGS",
    "FinetuneConfig",
    "PruneGroup",
    "StudyConfig",
    "compress_study",
    "cpu_latency",
    "finetune",
    "group_scores",
    "load_pruned",
    "model_cost",
    "plot_pareto",
    "prunable_groups",
    "prune_units",
    "save_pruned",
    "taylor_scores",
    "units_for_fraction",
    "zeroing_plan",
]
