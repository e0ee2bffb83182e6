"""The data loop, measured: do segability's picks of images to label help more than random or entropy?

One cycle per seed, on the embedded data (nothing downloaded):

1. the shipped reference UNet (``segability.models.load_reference_model``, trained on clean MNI152
   lesion slices);
2. an unlabelled pool of training-split slices, each under a random shift (``segability.datasets``
   ``apply_shift``: noise, blur, bias field, ghosting, ... at severity 0.25-1);
3. ``budget`` images chosen to be labelled by three rules: **segability** (``segability select``:
   ``segability.analyze`` of the pool, then the distrust-weighted k-centre over SA profiles of
   :func:`segability.review.select_for_labelling`; no ``qc.csv`` here, so distrust is
   ``1 - mean_sa_pred``), **random**, and **entropy** (the most uncertain outputs by
   ``segability.estimation.baselines.mean_entropy``);
4. the model fine-tuned on each choice with its labels, the same recipe and steps for all three
   (mixed half and half with clean training slices, so that no rule is punished for forgetting);
5. Dice on a held-out shifted test set (test-split slices, other shifts drawn the same way).

Two budgets and three seeds; ``--quick`` for a run of a few minutes on two CPU cores.

    python benchmarks/data_loop.py --quick
    python benchmarks/data_loop.py              # larger pool and test set, more steps
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import segability
from segability.datasets import SHIFTS, apply_shift, mni_lesions
from segability.estimation.baselines import mean_entropy
from segability.models import load_reference_model
from segability.review import select_for_labelling
from segability.train import dice_of

RULES = ("segability", "random", "entropy")
CROP = 64  # fine-tuning patch side


def shifted(n: int, split: str, seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """``n`` slices of ``split``, each under one random shift at severity 0.25-1."""
    data = mni_lesions(n, split=split, size=size, seed=seed)
    rng = np.random.default_rng(seed)
    images = np.stack([
        apply_shift(img, str(rng.choice(SHIFTS)), float(rng.uniform(0.25, 1.0)), seed=seed * 10_000 + i)
        for i, img in enumerate(data.images)
    ])  # fmt: skip
    return torch.from_numpy(images).float(), torch.from_numpy(data.labels).float(), list(data.ids)


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.sigmoid(model(x[s : s + batch])) for s in range(0, len(x), batch)])


def test_dice(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(dice_of((predict(model, x) > 0.5).float(), y).mean())


def fine_tune(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, clean_x: torch.Tensor, clean_y: torch.Tensor,
              steps: int, seed: int) -> torch.nn.Module:  # fmt: skip
    """A copy of ``model`` trained ``steps`` Adam steps on batches of 4 chosen + 4 clean slices,
    each a random 64x64 crop (the trainer's patch size: four times cheaper than whole slices)."""
    tuned = copy.deepcopy(model)
    tuned.train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(tuned.parameters(), lr=3e-4)
    for _ in range(steps):
        i = torch.randint(len(x), (4,), generator=gen)
        j = torch.randint(len(clean_x), (4,), generator=gen)
        xb, yb = torch.cat([x[i], clean_x[j]]), torch.cat([y[i], clean_y[j]])
        top, left = (int(torch.randint(xb.shape[-1] - CROP + 1, (1,), generator=gen)) for _ in range(2))
        xb, yb = xb[..., top : top + CROP, left : left + CROP], yb[..., top : top + CROP, left : left + CROP]
        logits = tuned(xb)
        p = torch.sigmoid(logits)
        soft_dice = 1 - (2 * (p * yb).sum() + 1) / (p.sum() + yb.sum() + 1)
        loss = F.binary_cross_entropy_with_logits(logits, yb) + soft_dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()
    return tuned


def choose(rule: str, model, pool_x, ids, budget: int, seed: int, run_dir) -> list[int]:
    if rule == "random":
        return np.random.default_rng(seed).choice(len(pool_x), budget, replace=False).tolist()
    if rule == "entropy":  # mean_entropy is minus the entropy: most uncertain = lowest
        score = mean_entropy(predict(model, pool_x)).numpy()
        return np.argsort(score, kind="stable")[:budget].tolist()
    chosen = select_for_labelling(run_dir, budget)["image"].tolist()
    where = {image: k for k, image in enumerate(ids)}
    return [where[i] for i in chosen]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small pool and test set, few steps (minutes)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_pool, n_test, steps, budgets = (96, 64, 30, (8, 24)) if args.quick else (300, 160, 120, (16, 48))
    size = 128
    base = load_reference_model()
    clean = mni_lesions(64, split="train", size=size, seed=7)
    clean_x, clean_y = torch.from_numpy(clean.images).float(), torch.from_numpy(clean.labels).float()
    rows = []
    started = time.perf_counter()
    for seed in range(args.seeds):
        pool_x, pool_y, ids = shifted(n_pool, "train", 1000 + seed, size)
        test_x, test_y, _ = shifted(n_test, "test", 2000 + seed, size)
        before = test_dice(base, test_x, test_y)
        with tempfile.TemporaryDirectory() as tmp:
            result = segability.analyze(base, pool_x, ids=ids, batch_size=16)  # label-free: no labels
            result.save(tmp)
            for budget in budgets:
                for rule in RULES:
                    picked = choose(rule, base, pool_x, ids, budget, seed, tmp)
                    tuned = fine_tune(base, pool_x[picked], pool_y[picked], clean_x, clean_y, steps, seed)
                    dice = test_dice(tuned, test_x, test_y)
                    lesion = float((pool_y[picked].flatten(1).sum(1) > 0).float().mean())
                    rows.append({"seed": seed, "budget": budget, "rule": rule, "test_dice": dice,
                                 "before": before, "lesion_fraction": lesion})  # fmt: skip
                    print(f"seed {seed} budget {budget:3d} {rule:10s} Dice {before:.3f} -> {dice:.3f} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip
    table = pd.DataFrame(rows)
    summary = table.groupby(["budget", "rule"], sort=False).agg(
        test_dice=("test_dice", "mean"), sd=("test_dice", "std"), before=("before", "mean"),
        lesion_fraction=("lesion_fraction", "mean"))  # fmt: skip
    paired = table.pivot_table(index=["seed", "budget"], columns="rule", values="test_dice")
    gain = pd.DataFrame({
        "segability - random": (paired["segability"] - paired["random"]).groupby("budget").mean(),
        "segability - entropy": (paired["segability"] - paired["entropy"]).groupby("budget").mean(),
        "wins vs random": (paired["segability"] > paired["random"]).groupby("budget").sum(),
        "wins vs entropy": (paired["segability"] > paired["entropy"]).groupby("budget").sum(),
    })  # fmt: skip
    print()
    print(summary.round(3).to_string())
    print()
    print(gain.round(3).to_string())
    print(f"\n{args.seeds} seeds, pool {n_pool}, test {n_test}, {steps} steps, {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
