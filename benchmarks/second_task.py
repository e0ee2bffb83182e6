"""The second task of the label-free quality benchmark: CSF on MNI152 slices with a MONAI SegResNet.

A different target (:func:`segability.datasets.tissue.mni_csf`: ventricles and sulcal CSF, dark on
T1) and a different architecture (``SegResNet``, residual blocks, group norm, dropout) from the
demo's lesion UNet. Trained on CPU in a few minutes, seeded; the checkpoint is cached under the
project's cache folder (:func:`segability.datasets.cache.cache_root`, ``models/``), keyed by every
training setting, so a second call loads it. Nothing is downloaded.

    python benchmarks/second_task.py            # trains (or loads) and prints the test Dice
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from segability.datasets.cache import cache_key, cache_root
from segability.datasets.tissue import mni_csf
from segability.train import dice_of

__all__ = ["CSFConfig", "csf_model", "load_csf_model", "csf_members"]


@dataclass(frozen=True)
class CSFConfig:
    """Every setting of the CSF model (all of them key the cached checkpoint)."""

    size: int = 96
    n_train: int = 400
    n_val: int = 48
    steps: int = 600
    crop: int = 64
    batch_size: int = 16
    lr: float = 3e-3
    init_filters: int = 8
    dropout: float = 0.1
    seed: int = 0


def csf_model(cfg: CSFConfig = CSFConfig()) -> nn.Module:
    """A fresh 2D SegResNet for the CSF task."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        spatial_dims=2, init_filters=cfg.init_filters, in_channels=1, out_channels=1,
        blocks_down=(1, 2, 2), blocks_up=(1, 1), dropout_prob=cfg.dropout,
    )  # fmt: skip


def _checkpoint(cfg: CSFConfig, cache_dir: str | Path | None) -> Path:
    key = cache_key(function="csf_segresnet", **dataclasses.asdict(cfg))
    return cache_root(cache_dir) / "models" / f"csf_segresnet-{key}.pt"


def load_csf_model(cfg: CSFConfig = CSFConfig(), *, cache_dir: str | Path | None = None, verbose: bool = True) -> nn.Module:
    """The trained CSF SegResNet in eval mode: loaded from the cache, else trained (seeded) and cached."""
    path = _checkpoint(cfg, cache_dir)
    model = csf_model(cfg)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    from monai.losses import DiceCELoss

    train = mni_csf(cfg.n_train, "train", size=cfg.size, seed=cfg.seed, cache_dir=cache_dir)
    val = mni_csf(cfg.n_val, "val", size=cfg.size, seed=cfg.seed + 1, cache_dir=cache_dir)
    tx, ty = (torch.from_numpy(a).float() for a in (train.images, train.labels))
    vx, vy = (torch.from_numpy(a).float() for a in (val.images, val.labels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = csf_model(cfg)
        gen = torch.Generator().manual_seed(cfg.seed)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.15)
        loss_fn = DiceCELoss(sigmoid=True, batch=True)
        start = time.perf_counter()
        model.train()
        for step in range(cfg.steps):
            idx = torch.randint(len(tx), (cfg.batch_size,), generator=gen)
            # random crops make a step about twice cheaper; the network is fully convolutional
            top = torch.randint(cfg.size - cfg.crop + 1, (2,), generator=gen).tolist()
            window = (slice(None), slice(None), slice(top[0], top[0] + cfg.crop), slice(top[1], top[1] + cfg.crop))
            x, y = tx[idx][window], ty[idx][window]
            if float(torch.rand(1, generator=gen)) < 0.5:
                x, y = x.flip(-1), y.flip(-1)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            if verbose and (step + 1) % 100 == 0:
                print(f"step {step + 1}/{cfg.steps} loss {float(loss):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        model.eval()
    with torch.no_grad():
        dice = float(dice_of((torch.sigmoid(model(vx)) > 0.5).float(), vy).mean())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    card = {"config": dataclasses.asdict(cfg), "validation_dice": round(dice, 4), "seconds": round(time.perf_counter() - start, 1)}
    path.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    if verbose:
        print(f"validation Dice {dice:.3f}; checkpoint cached", flush=True)
    return model


def csf_members(n: int, cfg: CSFConfig = CSFConfig(), *, steps: int | None = None, cache_dir: str | Path | None = None,
                verbose: bool = True) -> list[nn.Module]:
    """A deep ensemble of ``n`` CSF SegResNets: member 0 is the deployed model (``cfg``), the others
    are trained with seeds ``cfg.seed + 1 ...`` (initialisation, crops and training slices), with
    ``steps`` training steps (default ``cfg.steps``: the same recipe); each is cached like the model.
    """
    others = [dataclasses.replace(cfg, seed=cfg.seed + i, steps=steps or cfg.steps) for i in range(1, n)]
    return [load_csf_model(c, cache_dir=cache_dir, verbose=verbose) for c in (cfg, *others)]


if __name__ == "__main__":
    torch.set_num_threads(1)
    cfg = CSFConfig()
    model = load_csf_model(cfg)
    test = mni_csf(48, "test", size=cfg.size, seed=7)
    with torch.no_grad():
        x, y = torch.from_numpy(test.images).float(), torch.from_numpy(test.labels).float()
        d = dice_of((torch.sigmoid(model(x)) > 0.5).float(), y)
    print(f"CSF SegResNet: test Dice {float(d.mean()):.3f} (min {float(d.min()):.3f}) on {len(d)} slices")
