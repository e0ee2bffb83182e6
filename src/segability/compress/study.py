"""Prune for real, fine-tune every ranking with the same budget, and measure what a deployer reads:
parameters, MACs, CPU latency and Dice before and after fine-tuning on each evaluation set."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from segability.compress.artefact import save_pruned
from segability.compress.graph import (
    PruneGroup,
    cpu_latency,
    model_cost,
    prunable_groups,
    prune_units,
)
from segability.compress.rank import RANKINGS, group_scores, units_for_fraction
from segability.prune import output_dice

__all__ = ["FinetuneConfig", "StudyConfig", "finetune", "compress_study", "plot_pareto", "COLUMNS"]

SCOPES: tuple[str, ...] = ("layer", "global")
COLUMNS = ["ranking", "scope", "fraction", "seed", "pruned_units", "params", "macs", "macs_kept", "latency_ms"]
COLORS = {"sa": "#1b9e77", "l1": "#d95f02", "taylor": "#e7298a", "random": "#7570b3", "none": "#000000"}
LABELS = {"sa": "SA (unit vs label)", "l1": "L1 norm of filter", "taylor": "Taylor |w dL/dw|", "random": "random"}


@dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning budget, the same for every ranking (the reference model's recipe, shorter).

    Each step draws ``batch_size`` random ``crop``-sized patches (a ``positive_fraction`` of them
    centred on a lesion), augments them and takes an AdamW step on Dice + cross-entropy, with a
    one-cycle learning rate peaking at ``lr``, as :func:`segability.train.train_reference` does.
    """

    epochs: int = 2
    steps_per_epoch: int = 25
    batch_size: int = 16
    crop: int = 64
    positive_fraction: float = 0.6
    lr: float = 1e-3

    def __post_init__(self) -> None:
        for name in ("epochs", "steps_per_epoch", "batch_size", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "epochs" else 1):
                raise ValueError(f"{name} must be a {'non-negative' if name == 'epochs' else 'positive'} integer, got {value!r}")
        if not 0 <= self.positive_fraction <= 1:
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass(frozen=True)
class StudyConfig:
    """What :func:`compress_study` compares: every ranking x scope x fraction, fine-tuned per seed.

    The random ranking uses seed ``s`` both to rank and to fine-tune; the other rankings are
    computed once and fine-tuned once per seed. ``fractions`` are fractions of the units of the
    prunable groups (per group for ``scope="layer"``, of all of them for ``"global"``).
    """

    fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    rankings: tuple[str, ...] = RANKINGS
    scopes: tuple[str, ...] = SCOPES
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    latency_repeats: int = 20
    batch_size: int = 8

    def __post_init__(self) -> None:
        for name in ("fractions", "rankings", "scopes", "seeds"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"{name} must be a non-empty list, got {value!r}")
        if any(not 0 < float(f) < 1 for f in self.fractions):
            raise ValueError(f"fractions must be in (0, 1), got {list(self.fractions)}")
        unknown = [r for r in self.rankings if r not in RANKINGS]
        if unknown:
            raise ValueError(f"rankings must be among {', '.join(RANKINGS)}, got {unknown}")
        if any(s not in SCOPES for s in self.scopes):
            raise ValueError(f"scopes must be among {', '.join(SCOPES)}, got {list(self.scopes)}")
        if self.latency_repeats < 1 or self.batch_size < 1:
            raise ValueError("latency_repeats and batch_size must be positive")


def finetune(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: FinetuneConfig, *, seed: int = 0) -> list[float]:
    """Fine-tune ``model`` in place on random crops of ``images``; returns the loss of every step.

    Reuses the reference trainer's patch sampler and augmentation (:mod:`segability.train`);
    the global random state is left as it was. The model ends in eval mode.

    Args:
        model: the network (one output channel, read with a sigmoid, or several with a softmax).
        images: (N, C, *S) training images, all of one size.
        labels: (N, 1, *S) labels.
        config: the budget.
        seed: seeds the crops, the augmentation and dropout.
    """
    from segability.compress.rank import _loss_for
    from segability.train import augment, sample_crops

    if not isinstance(images, torch.Tensor) or images.ndim != 4 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"images must be a (N, C, H, W) tensor with labels (N, 1, H, W), got {tuple(getattr(images, 'shape', ()))}")
    steps = config.epochs * config.steps_per_epoch
    if steps == 0:
        return []
    crop = min(config.crop, *images.shape[-2:])
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps, pct_start=0.15)
    loss_fn = None
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model.train()
        try:
            for _ in range(steps):
                x, y = sample_crops(images, labels, config.batch_size, crop, config.positive_fraction, gen)
                x, y = augment(x.float(), y.float(), gen)
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                out = model(x)
                loss_fn = loss_fn or _loss_for(out)
                loss = loss_fn(out, y)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
        finally:
            model.eval()
    return losses


def _dice(model: nn.Module, data: tuple[Any, Any], batch_size: int) -> float:
    return float(output_dice(model, data[0], data[1], batch_size=batch_size).mean())


def compress_study(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    evaluate: Mapping[str, tuple[Any, Any]],
    config: StudyConfig | None = None,
    *,
    rank: tuple[Any, Any] | None = None,
    example: torch.Tensor | None = None,
    groups: Sequence[PruneGroup] | None = None,
    out_dir: str | Path | None = None,
    factory: str | None = None,
    factory_args: Mapping[str, Any] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> pd.DataFrame:
    """Prune ``model`` by every ranking, fine-tune each pruned copy, and tabulate the costs and Dice.

    The first rows (``ranking="none"``, fraction 0) are the unpruned model fine-tuned with the
    same budget, one per seed. ``model`` itself is never changed.

    Args:
        model: the trained network.
        train: ``(images, labels)`` tensors to fine-tune on.
        evaluate: ``{name: (images, labels)}``, e.g. ``{"val": ..., "shift": ...}``; each gives
            columns ``dice_<name>_before`` and ``dice_<name>_after``.
        config: rankings, scopes, fractions, seeds and the fine-tuning budget.
        rank: ``(images, labels)`` the SA and Taylor rankings are measured on (default ``train``).
        example: the input the costs and latency are measured on (default the first evaluation
            image).
        groups: the prunable groups (default :func:`prunable_groups`).
        out_dir: when given, every fine-tuned model is saved there with :func:`save_pruned`
            (needs ``factory``); the ``model`` column names its file.
        factory: ``"package.module:function"`` building the unpruned network.
        factory_args: its keyword arguments.
        on_row: called with every finished row (progress).

    Returns:
        One row per (ranking, scope, fraction, seed): the columns of :data:`COLUMNS`, the Dice
        columns, and ``model``.

    Raises:
        ValueError: malformed arguments.
    """
    cfg = config or StudyConfig()
    if not evaluate:
        raise ValueError("evaluate is empty: give at least one (images, labels) set")
    if out_dir is not None and factory is None:
        raise ValueError("saving the pruned models needs factory: the spec that builds the unpruned network")
    first = next(iter(evaluate.values()))[0]
    example = (first[:1] if isinstance(first, torch.Tensor) else first[0][None]) if example is None else example
    groups = list(groups) if groups is not None else prunable_groups(model, example)
    rank = train if rank is None else rank
    base_params, base_macs = model_cost(model, example)
    total_units = sum(g.channels for g in groups)
    rows: list[dict[str, Any]] = []
    before_cache: dict[str, float] = {}

    def run(net: nn.Module, key: dict[str, Any], before: dict[str, float]) -> None:
        params, macs = model_cost(net, example)
        row = {**key, "params": params, "macs": macs, "macs_kept": macs / base_macs}
        row["latency_ms"] = 1e3 * cpu_latency(net, example, repeats=cfg.latency_repeats)
        tuned = copy.deepcopy(net)
        finetune(tuned, *train, cfg.finetune, seed=key["seed"])
        for name, data in evaluate.items():
            row[f"dice_{name}_before"] = before[name]
            row[f"dice_{name}_after"] = _dice(tuned, data, cfg.batch_size)
        row["model"] = ""
        if out_dir is not None:
            file = f"{key['ranking']}-{key['scope']}-{key['fraction']:.2f}-seed{key['seed']}.pt"
            meta = {k: v for k, v in row.items() if isinstance(v, (int, float, str))}
            save_pruned(tuned, Path(out_dir) / file, factory=factory, factory_args=factory_args, meta=meta)
            row["model"] = file
        rows.append(row)
        if on_row is not None:
            on_row(row)

    unpruned = {name: _dice(model, data, cfg.batch_size) for name, data in evaluate.items()}
    for seed in cfg.seeds:
        run(copy.deepcopy(model), {"ranking": "none", "scope": "none", "fraction": 0.0, "seed": int(seed), "pruned_units": 0}, unpruned)
    for ranking in cfg.rankings:
        rank_seeds = list(cfg.seeds) if ranking == "random" else [None]
        for rank_seed in rank_seeds:
            scores = group_scores(model, groups, ranking, *rank, seed=0 if rank_seed is None else rank_seed, batch_size=cfg.batch_size)
            for scope in cfg.scopes:
                for fraction in cfg.fractions:
                    chosen = units_for_fraction(scores, float(fraction), scope, normalize=ranking != "random")
                    pruned = prune_units(copy.deepcopy(model), chosen, example)
                    tag = f"{ranking}/{rank_seed}/{scope}/{fraction}"
                    if tag not in before_cache:
                        before_cache[tag] = {name: _dice(pruned, data, cfg.batch_size) for name, data in evaluate.items()}
                    count = sum(len(v) for v in chosen.values())
                    for seed in cfg.seeds if rank_seed is None else [rank_seed]:
                        key = {"ranking": ranking, "scope": scope, "fraction": float(fraction), "seed": int(seed), "pruned_units": count}
                        run(pruned, key, before_cache[tag])
    table = pd.DataFrame(rows)
    table.attrs["units"] = total_units
    table.attrs["config"] = asdict(cfg)
    return table


def plot_pareto(table: pd.DataFrame, path: str | Path | None = None, *, dice: str = "dice_val_after", title: str | None = None):
    """Dice against MACs: one colour per ranking, a circle per-layer and a square global scope,
    the mean over seeds with a min-max bar; the unpruned model as a star and the Pareto front (the
    best mean Dice at or below each cost) dashed.

    Args:
        table: the output of :func:`compress_study`.
        path: where to save the PNG, or None.
        dice: the Dice column to plot.
        title: the figure title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ValueError: when columns are missing.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    missing = {"ranking", "scope", "fraction", "macs", dice} - set(table.columns)
    if missing:
        raise ValueError(f"table needs the columns ranking, scope, fraction, macs, {dice}; missing {sorted(missing)}")
    stats = table.groupby(["ranking", "scope", "fraction"], sort=True).agg(
        macs=("macs", "mean"), mean=(dice, "mean"), low=(dice, "min"), high=(dice, "max")
    ).reset_index()
    fig = Figure(figsize=(6.0, 4.2), dpi=150)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for (ranking, scope), part in stats.groupby(["ranking", "scope"], sort=False):
        x = part["macs"] / 1e6
        err = [part["mean"] - part["low"], part["high"] - part["mean"]]
        if ranking == "none":
            ax.errorbar(x, part["mean"], yerr=err, marker="*", markersize=12, color="black", linestyle="none", label="unpruned, fine-tuned")
            continue
        marker, style = ("o", "-") if scope == "layer" else ("s", ":")
        ax.errorbar(x, part["mean"], yerr=err, marker=marker, linestyle=style, color=COLORS.get(ranking), capsize=2,
                    label=f"{LABELS.get(ranking, ranking)}, {scope}")
    front = stats.sort_values("macs")
    best, xs, ys = -math.inf, [], []
    for m, d in zip(front["macs"], front["mean"], strict=True):
        if d > best:
            best = d
            xs.append(m / 1e6)
            ys.append(d)
    ax.step(xs, ys, where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel(dice.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=6, ncol=2)
    ax.set_title(title or "Structural pruning: Dice against cost", fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
