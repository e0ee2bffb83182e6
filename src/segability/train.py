"""``segability train --task mni-lesions``: trains the reference model and records SA per epoch.

The run is seeded; the same command gives a model of the same quality (CPU training with the
same thread count is bitwise repeatable here, but that is not promised across machines). After each
epoch the validation Dice and the SA of every layer (the paper's training figure) are measured with
:func:`segability.analyze` on a fixed validation subset.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis import analyze
from segability.core.functional import dice_from_counts
from segability.models import REFERENCE_ARCH, file_sha256, reference_unet

__all__ = ["TrainConfig", "TrainResult", "train_reference", "dice_of", "sample_crops", "augment"]


@dataclass
class TrainConfig:
    """Settings of a reference-model training run (all recorded in the card)."""

    epochs: int = 30
    steps_per_epoch: int = 200
    n_train: int = 600
    n_val: int = 64
    size: int = 128
    crop: int = 64
    positive_fraction: float = 0.6
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    sa_images: int = 16
    threads: int | None = None


@dataclass
class TrainResult:
    """The trained model, its card and the per-epoch history (epoch, layer, sa, sa_pred, dice)."""

    model: nn.Module
    card: dict[str, Any]
    history: pd.DataFrame = field(default_factory=pd.DataFrame)


def dice_of(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per-image Dice of binary maps (both empty: 1)."""
    p, t = pred.flatten(1).double(), label.flatten(1).double()
    return dice_from_counts((p * t).sum(1), p.sum(1), t.sum(1), "one")


def sample_crops(
    x: torch.Tensor, y: torch.Tensor, n: int, crop: int, positive_fraction: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random ``crop``-sized patches; a ``positive_fraction`` of them centred on a lesion pixel.

    Patches make a step four times cheaper than whole 128^2 slices, and centring on lesions
    balances the rare target class; the network is fully convolutional, so it runs on whole
    slices afterwards.
    """
    size = x.shape[-2:]
    xs, ys = [], []
    for _ in range(n):
        i = int(torch.randint(len(x), (1,), generator=gen))
        fg = torch.nonzero(y[i, 0])
        if len(fg) and float(torch.rand(1, generator=gen)) < positive_fraction:
            centre = fg[int(torch.randint(len(fg), (1,), generator=gen))]
        else:
            centre = torch.stack([torch.randint(s, (1,), generator=gen)[0] for s in size])
        top = [int(min(max(int(c) - crop // 2, 0), s - crop)) for c, s in zip(centre, size, strict=True)]
        window = (slice(top[0], top[0] + crop), slice(top[1], top[1] + crop))
        xs.append(x[i, :, window[0], window[1]])
        ys.append(y[i, :, window[0], window[1]])
    return torch.stack(xs), torch.stack(ys)


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips of image and label, and a mild gain and noise on the image, drawn from ``gen``.

    Flips and mild intensity changes only: the shifted test suite must stay out of distribution.
    """
    if torch.rand(1, generator=gen) < 0.5:
        x, y = x.flip(-1), y.flip(-1)
    if torch.rand(1, generator=gen) < 0.3:
        x, y = x.flip(-2), y.flip(-2)
    gain = 1.0 + 0.1 * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) - 0.5)
    # faint noise on half the batches, so a not-exactly-zero background is not all "lesion"
    sigma = 0.03 * torch.rand(x.shape[0], 1, 1, 1, generator=gen) * (torch.rand(x.shape[0], 1, 1, 1, generator=gen) < 0.5)
    return x * gain + sigma * torch.randn(x.shape, generator=gen), y


def _validate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    dices = []
    with torch.no_grad():
        for s in range(0, len(x), batch):
            pred = (torch.sigmoid(model(x[s : s + batch])) > 0.5).float()
            dices.append(dice_of(pred, y[s : s + batch]))
    model.train()
    return float(torch.cat(dices).mean())


def train_reference(
    config: TrainConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train the reference UNet on ``mni_lesions`` and return it with its card and history.

    Args:
        config: training settings (defaults reproduce the shipped model).
        out_dir: when given, writes ``reference_unet.pt``, ``reference_unet.json`` (the card) and
            ``history.csv`` there.
        cache_dir: data cache folder (see :mod:`segability.datasets`).
        on_epoch: called after every epoch with the epoch number and its metrics (progress).
        command: the command line recorded in the card.
    """
    cfg = config or TrainConfig()
    with _scoped_torch(cfg.threads, cfg.seed):
        return _train(cfg, out_dir=out_dir, cache_dir=cache_dir, on_epoch=on_epoch, command=command)


@contextmanager
def _scoped_torch(threads: int | None, seed: int):
    """Set torch's thread count and global seed for a training run, and restore both after it.

    The caller's random stream continues where it was (``fork_rng``), and its thread count is
    given back, also when training raises.
    """
    before = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        try:
            if threads:
                torch.set_num_threads(threads)
            torch.manual_seed(seed)
            yield
        finally:
            torch.set_num_threads(before)


def _train(cfg: TrainConfig, *, out_dir, cache_dir, on_epoch, command) -> TrainResult:
    from monai.losses import DiceCELoss

    from segability import __version__
    from segability.datasets import mni_lesions

    gen = torch.Generator().manual_seed(cfg.seed)
    train = mni_lesions(cfg.n_train, "train", size=cfg.size, seed=cfg.seed, cache_dir=cache_dir)
    val = mni_lesions(cfg.n_val, "val", size=cfg.size, seed=cfg.seed + 1, cache_dir=cache_dir)
    tx, ty = train.as_tensors()
    vx, vy = val.as_tensors()

    model = reference_unet()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    steps = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.15)
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    history: list[pd.DataFrame] = []
    start = time.perf_counter()
    model.train()
    for epoch in range(1, cfg.epochs + 1):
        losses = []
        for _ in range(cfg.steps_per_epoch):
            x, y = sample_crops(tx, ty, cfg.batch_size, cfg.crop, cfg.positive_fraction, gen)
            x, y = augment(x, y, gen)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        val_dice = _validate(model, vx, vy)
        res = analyze(model, vx[: cfg.sa_images], vy[: cfg.sa_images], batch_size=cfg.sa_images)
        summary = res.layers.groupby(["depth", "layer"], sort=True)[["sa", "sa_pred"]].mean().reset_index()
        history.append(summary.assign(epoch=epoch, val_dice=val_dice, loss=float(np.mean(losses))))
        model.train()
        if on_epoch is not None:
            on_epoch(epoch, {"loss": float(np.mean(losses)), "val_dice": val_dice, "seconds": time.perf_counter() - start})
    seconds = time.perf_counter() - start
    model.eval()
    hist = pd.concat(history, ignore_index=True)[["epoch", "depth", "layer", "sa", "sa_pred", "val_dice", "loss"]]
    card: dict[str, Any] = {
        "model": "monai.networks.nets.UNet",
        "architecture": {k: list(v) if isinstance(v, tuple) else v for k, v in REFERENCE_ARCH.items()},
        "task": "mni-lesions",
        "command": command or " ".join(shlex.quote(a) for a in ["segability", *sys.argv[1:]]),
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "seed": cfg.seed,
        "epochs": cfg.epochs,
        "validation_dice": round(float(hist["val_dice"].iloc[-1]), 4),
        "training_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "segability": __version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        weights = out / "reference_unet.pt"
        torch.save(model.state_dict(), weights)
        card["sha256"] = file_sha256(weights)
        card["size_bytes"] = weights.stat().st_size
        (out / "reference_unet.json").write_text(json.dumps(card, indent=2) + "\n")
        hist.to_csv(out / "history.csv", index=False)
    return TrainResult(model=model, card=card, history=hist)
