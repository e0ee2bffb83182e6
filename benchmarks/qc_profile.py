"""Issue 14: the SA-profile estimator against mean SA and the baselines, on two tasks, honestly split.

Tasks: the demo (shipped lesion UNet, ``segability.demo.demo_data``: 48 clean test slices + 24 of
them under 8 shift families at 4 severities) and the second task (CSF SegResNet,
``benchmarks/second_task.py``: the same design on ``mni_csf`` slices). Per task, once: the analysis
(``segability.analyze``), the SA profile with the reference cache (16 labelled *validation* images,
never evaluated), and the baselines (``segability.estimation.qc.baseline_scores``).

Protocol, per seed (3): the clean source images are split in half; every version of a source image
stays on its side. Calibration = the calibration half's clean images + their shifted versions;
evaluation = the other half. **Leave one shift family out**: the shifted evaluation images of family
f are estimated by an estimator whose calibration never saw family f; the clean evaluation images
by one fitted on every family. Every method (the profile estimator and each baseline, calibrated
linearly to Dice on the same rows) goes through the same folds. ``seen families`` repeats the
profile estimator with every family in calibration (an upper reference, not the honest figure).

**Deep ensemble** (Zenk et al. 2025): per task, ``--members`` networks of the same architecture
trained with different seeds (member 0 = the deployed model, the others by the same training code;
``--quick`` trains them shorter); ``ensemble pairwise Dice`` (mean Dice over the members' binarised
predictions) and the entropy of the ensemble's mean probability rank the *deployed model's* outputs,
as in Zenk et al.; they go through the same calibration folds as the other baselines, and ``(raw)``
reads the pairwise Dice itself as the Dice estimate (its MAE without any calibration).

Metrics on the evaluation half, mean over seeds: Spearman, Pearson, MAE (clean images / all),
AURC, e-AURC, AUROC of failure (Dice < 0.75), the share of failures caught at a 10/20/30% review
budget and that share for a perfect ranking, interval coverage, and the cost per image as a
multiple of one forward pass.

    python benchmarks/qc_profile.py --out runs/qc-profile          # ~25 min on 2 CPU cores (+ 4 members per task, trained once)
    python benchmarks/qc_profile.py --quick --out runs/qc-profile-quick   # a few minutes (+ 2 short members per task, once)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from segability import analyze  # noqa: E402
from segability.datasets import SHIFTS, shifted_suite  # noqa: E402
from segability.estimation.baselines import ensemble_scores, forward_passes  # noqa: E402
from segability.estimation.calibration import state_dict_hash  # noqa: E402
from segability.estimation.estimator import QualityEstimator  # noqa: E402
from segability.estimation.evaluation import aurc, eaurc, failure_auroc, pearson, spearman  # noqa: E402
from segability.estimation.profile import add_summaries, body_mask, profile_layers, sa_profile  # noqa: E402
from segability.estimation.qc import baseline_scores  # noqa: E402
from segability.estimation.reverse import ReferenceCache  # noqa: E402

THRESHOLD = 0.75
BUDGETS = (0.1, 0.2, 0.3)
QUICK_SHIFTS = ("gaussian_noise", "blur", "bias_field", "contrast")
QUICK_SEVERITIES = (0.5, 1.0)
QUICK_MEMBER_TRAINING = {"demo": 6, "csf": 150}  # --quick: epochs (demo) / steps (CSF) of members 1 ...
BASELINES = {  # method -> (score columns, passes per image by design; None: the analysis, "ensemble": one per member)
    "mean SA (sa_all)": (["mean_sa_pred"], None),
    "sa_all+input": (["mean_sa_pred", "input_sa_pred"], None),
    "entropy": (["entropy"], forward_passes("entropy")),
    "boundary confidence": (["boundary_confidence"], forward_passes("boundary_confidence")),
    "max prob foreground": (["max_prob_foreground"], forward_passes("max_prob_foreground")),
    "TTA flip agreement": (["tta_flip"], forward_passes("tta_flip", spatial_dims=2)),
    "MC dropout agreement": (["mc_dropout"], forward_passes("mc_dropout", n_mc=8)),
    "ensemble pairwise Dice": (["ensemble_dice"], "ensemble"),
    "ensemble entropy": (["ensemble_entropy"], "ensemble"),
}
VARIANTS = {  # --variant: options of the profile estimator tried for issue 14 (item 3)
    "shipped": {},
    "isotonic": {"post_calibration": "isotonic"},
    "narrow": {"extra_sets": {"sa_mean+input": ["mean:sa_pred", "input_sa_pred"],
                              "sa_mean+input+body": ["mean:sa_pred", "input_sa_pred", "mean:sa_pred_body",
                                                     "input_sa_pred_body", "pred_fraction"]}},
}
VARIANTS["isotonic+narrow"] = {**VARIANTS["isotonic"], **VARIANTS["narrow"]}
RAW = {"ensemble pairwise Dice (raw)": "ensemble_dice"}  # the score read as a Dice estimate, uncalibrated


# ------------------------------------------------------------------------------------ tasks
def demo_task(quick: bool, n_members: int, short_members: bool):
    from segability.datasets import mni_lesions
    from segability.demo import DemoConfig, demo_data

    cfg = DemoConfig(n_test=16, n_shift=8, severities=QUICK_SEVERITIES, shifts=QUICK_SHIFTS) if quick else DemoConfig()
    clean, suite = demo_data(cfg, None)
    refs = mni_lesions(32, "val", size=cfg.size, seed=3)
    members = demo_members(n_members, epochs=QUICK_MEMBER_TRAINING["demo"] if short_members else None)
    return "demo (lesion UNet)", members, clean, suite, refs


def demo_members(n: int, *, epochs: int | None = None, cache_dir: str | Path | None = None) -> list[torch.nn.Module]:
    """A deep ensemble of ``n`` lesion UNets: member 0 is the shipped model, the others are trained
    by its recipe (``segability train``'s :func:`~segability.train.train_reference`, the card's
    settings) with seeds 1 ... n - 1 and ``epochs`` epochs (default the recipe's), cached under the
    data cache's ``models/`` keyed by every setting.
    """
    import dataclasses
    import json

    from segability.datasets.cache import cache_key, cache_root
    from segability.models import load_reference_model, reference_card, reference_unet
    from segability.train import TrainConfig, train_reference

    recipe = TrainConfig(**reference_card()["config"])
    members = [load_reference_model()]
    for i in range(1, n):
        cfg = dataclasses.replace(recipe, seed=recipe.seed + i, epochs=epochs or recipe.epochs)
        path = cache_root(cache_dir) / "models" / f"lesion_unet-{cache_key(function='lesion_unet', **dataclasses.asdict(cfg))}.pt"
        if not path.is_file():
            print(f"training ensemble member {i} (seed {cfg.seed}, {cfg.epochs} epochs)", flush=True)
            trained = train_reference(cfg, command=f"benchmarks/qc_profile.py member seed {cfg.seed}")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(trained.model.state_dict(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)
            path.with_suffix(".json").write_text(json.dumps(trained.card, indent=2) + "\n")
        net = reference_unet()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        members.append(net.eval())
    return members


def csf_task(quick: bool, n_members: int, short_members: bool):
    from second_task import CSFConfig, csf_members

    from segability.datasets.tissue import mni_csf

    cfg = CSFConfig()
    n_test, n_shift = (16, 8) if quick else (48, 24)
    severities = QUICK_SEVERITIES if quick else (0.25, 0.5, 0.75, 1.0)
    shifts = QUICK_SHIFTS if quick else SHIFTS
    clean = mni_csf(n_test, "test", size=cfg.size, seed=7)
    suite = shifted_suite(clean.subset(list(range(n_shift))), shifts=shifts, severities=severities, seed=7)
    refs = mni_csf(32, "val", size=cfg.size, seed=3)
    members = csf_members(n_members, cfg, steps=QUICK_MEMBER_TRAINING["csf"] if short_members else None)
    return "CSF (SegResNet)", members, clean, suite, refs


def measure(name, members, clean, suite, refs, n_refs: int = 16) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, float]]:
    """Profile, baselines (the ensemble's too), Dice and metadata per image (clean + suite), and the costs.

    ``members[0]`` is the deployed model: every Dice and score is about its outputs."""
    model = members[0]
    x = torch.from_numpy(np.concatenate([clean.images, suite.images])).float()
    y = torch.from_numpy(np.concatenate([clean.labels, suite.labels])).float()
    ids = list(clean.ids) + list(suite.ids)
    meta = pd.DataFrame({
        "image": ids,
        "source": list(clean.ids) + suite.meta["source_id"].astype(str).tolist(),
        "family": ["clean"] * len(clean) + suite.meta["shift"].astype(str).tolist(),
        "severity": [0.0] * len(clean) + suite.meta["severity"].astype(float).tolist(),
    })  # fmt: skip
    cost: dict[str, float] = {}
    t = time.perf_counter()
    with torch.no_grad():
        for s in range(0, len(x), 32):
            model(x[s : s + 32])
    cost["forward_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = analyze(model, x, y, ids=ids, batch_size=32)
    cost["analyze_s"] = time.perf_counter() - t
    layers = profile_layers(result)
    has = np.asarray([int(v.sum()) > 0 for v in refs.labels])
    pick = np.flatnonzero(has)[:n_refs]
    rx, ry = (torch.from_numpy(a[pick]).float() for a in (refs.images, refs.labels))
    t = time.perf_counter()
    cache = ReferenceCache.build(model, rx, ry, layers, body_mask=body_mask, ids=[refs.ids[i] for i in pick])
    cost["reference_cache_s"] = time.perf_counter() - t
    t = time.perf_counter()
    profile = sa_profile(model, x, result, references=cache, ids=ids, batch_size=32)
    cost["profile_s"] = time.perf_counter() - t
    n_time = min(len(x), 64)
    t = time.perf_counter()
    sa_profile(model, x[:n_time], result, references=None, ids=ids[:n_time], batch_size=32)
    without = time.perf_counter() - t
    t = time.perf_counter()
    sa_profile(model, x[:n_time], result, references=cache, ids=ids[:n_time], batch_size=32)
    cost["reverse_share"] = (time.perf_counter() - t - without) / max(time.perf_counter() - t, 1e-9)
    cost["reverse_s"] = cost["profile_s"] * max(cost["reverse_share"], 0.0)
    t = time.perf_counter()
    base = baseline_scores(model, x, ids=ids, batch_size=32)
    cost["baselines_s"] = time.perf_counter() - t
    predicts = [lambda v, m=m: torch.sigmoid(m(v)) for m in members]
    t = time.perf_counter()
    with torch.no_grad():
        ens = [ensemble_scores(predicts, x[s : s + 32]) for s in range(0, len(x), 32)]
    cost["ensemble_s"] = time.perf_counter() - t
    cost["members"] = len(members)
    for key in ("ensemble_dice", "ensemble_entropy"):
        base[key] = torch.cat([e[key] for e in ens]).numpy()
    images = result.images[["image", "dice", "mean_sa_pred", "input_sa_pred"]].astype({"image": str})
    table = meta.merge(images, on="image").merge(base, on="image")
    print(f"[{name}] {len(x)} images, {len(layers) - 1} layers; Dice mean {table['dice'].mean():.3f}; "
          f"forward {cost['forward_s']:.1f} s, analyze {cost['analyze_s']:.1f} s, profile {cost['profile_s']:.1f} s", flush=True)
    return table, profile, cost


# ------------------------------------------------------------------------------- protocol
def linear_fit(x: np.ndarray, y: np.ndarray, x_new: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x).all(1) & np.isfinite(y)
    design = np.column_stack([x[ok], np.ones(ok.sum())])
    coef, *_ = np.linalg.lstsq(design, y[ok], rcond=None)
    out = np.column_stack([x_new, np.ones(len(x_new))]) @ coef
    return np.where(np.isfinite(out), np.clip(out, 0, 1), math.nan)


def evaluate(table: pd.DataFrame, profile: pd.DataFrame, model_hash: str, seeds: int, quick: bool,
             variant: str = "shipped") -> pd.DataFrame:
    families = sorted(set(table["family"]) - {"clean"})
    sources = np.array(sorted(table.loc[table["family"] == "clean", "source"].unique()))
    dice = table["dice"].to_numpy(float)
    kinds = ("ridge",) if quick else ("ridge", "trees")
    rows = []
    for seed in range(seeds):
        perm = np.random.default_rng(seed).permutation(sources)
        cal_src = set(perm[: len(perm) // 2])
        is_cal = table["source"].isin(cal_src).to_numpy()
        is_eval = ~is_cal
        estimates: dict[str, np.ndarray] = {}
        confidence: dict[str, np.ndarray] = {}
        lower = np.full(len(table), math.nan)
        upper = np.full(len(table), math.nan)
        seen = None
        for held in [None, *families]:
            cal = is_cal & (table["family"] != held).to_numpy()
            target = is_eval & ((table["family"] == held).to_numpy() if held else (table["family"] == "clean").to_numpy())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # the model is chosen (and the conformal residuals taken) leaving one calibration family
                # out at a time: the choice rewards what carries over to a shift not seen
                est = QualityEstimator.fit(profile[cal], dice[cal], table.loc[cal, "source"], model_hash=model_hash,
                                           kinds=kinds, seed=seed, select_groups=table.loc[cal, "family"],
                                           **VARIANTS[variant])  # fmt: skip
            if held is None:
                seen = est.predict(profile[is_eval])
            pred = est.predict(profile[target])
            for key in ("profile estimator",):
                estimates.setdefault(key, np.full(len(table), math.nan))[target] = pred["estimated_dice"].to_numpy()
                trust = np.where(pred["out_of_range"], -1.0, pred["lower"].to_numpy())
                confidence.setdefault(key, np.full(len(table), math.nan))[target] = trust
            lower[target], upper[target] = pred["lower"].to_numpy(), pred["upper"].to_numpy()
            if "ensemble_dice" in table:  # does the SA profile add anything to the ensemble's agreement?
                both = profile.assign(ensemble_dice=table["ensemble_dice"].to_numpy(float))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    est = QualityEstimator.fit(both[cal], dice[cal], table.loc[cal, "source"], model_hash=model_hash,
                                               kinds=kinds, seed=seed, select_groups=table.loc[cal, "family"],
                                               **VARIANTS[variant])  # fmt: skip
                pred = est.predict(both[target])
                key = "profile + ensemble Dice"
                estimates.setdefault(key, np.full(len(table), math.nan))[target] = pred["estimated_dice"].to_numpy()
                trust = np.where(pred["out_of_range"], -1.0, pred["lower"].to_numpy())
                confidence.setdefault(key, np.full(len(table), math.nan))[target] = trust
            for method, (cols, _) in BASELINES.items():
                if not all(c in table for c in cols) or table[cols].isna().all().any():
                    continue
                e = linear_fit(table.loc[cal, cols].to_numpy(float), dice[cal], table.loc[target, cols].to_numpy(float))
                estimates.setdefault(method, np.full(len(table), math.nan))[target] = e
                confidence.setdefault(method, np.full(len(table), math.nan))[target] = e
            for method, col in RAW.items():
                if col in table:
                    raw = table.loc[target, col].to_numpy(float)
                    estimates.setdefault(method, np.full(len(table), math.nan))[target] = raw
                    confidence.setdefault(method, np.full(len(table), math.nan))[target] = raw
        estimates["profile (seen families)"] = np.full(len(table), math.nan)
        estimates["profile (seen families)"][is_eval] = seen["estimated_dice"].to_numpy()
        confidence["profile (seen families)"] = np.full(len(table), math.nan)
        confidence["profile (seen families)"][is_eval] = np.where(seen["out_of_range"], -1.0, seen["lower"].to_numpy())
        labelled = table["label_pixels"].to_numpy() > 0
        for method, est in estimates.items():
            # point metrics read the estimate within Dice's range [0, 1]; an out-of-range image's
            # estimate is reported unclipped by the estimator, but its interval is [0, 1] anyway
            point = np.clip(est, 0.0, 1.0)
            clean = (table["family"] == "clean").to_numpy()
            rows.append({"seed": seed, "method": method, **metrics(dice[is_eval], point[is_eval], confidence[method][is_eval], clean[is_eval])})
            sub = is_eval & labelled
            rows[-1]["spearman_labelled"] = spearman(point[sub], dice[sub])
            rows[-1]["mae_labelled"] = float(np.nanmean(np.abs(point - dice)[sub]))
            if method == "profile estimator":
                inside = (dice[is_eval] >= lower[is_eval]) & (dice[is_eval] <= upper[is_eval])
                rows[-1]["coverage"] = float(inside.mean())
                rows[-1]["out_of_range"] = float(np.mean(confidence[method][is_eval] == -1.0))
    return pd.DataFrame(rows)


def metrics(dice: np.ndarray, est: np.ndarray, conf: np.ndarray, clean: np.ndarray) -> dict[str, float]:
    ok = np.isfinite(est) & np.isfinite(dice)
    out = {
        "spearman": spearman(est[ok], dice[ok]),
        "pearson": pearson(est[ok], dice[ok]),
        "mae_clean": float(np.mean(np.abs(est - dice)[ok & clean])),
        "mae": float(np.mean(np.abs(est - dice)[ok])),
        "aurc": aurc(1 - dice, conf),
        "eaurc": eaurc(1 - dice, conf),
        "auroc": failure_auroc(dice, conf, THRESHOLD),
    }
    fail = dice < THRESHOLD
    suspicion = np.where(np.isfinite(conf), -conf, np.inf)
    order = np.argsort(-suspicion, kind="stable")
    for b in BUDGETS:
        k = int(math.ceil(b * len(dice)))
        caught = fail[order[:k]].sum() / max(fail.sum(), 1)
        perfect = min(k, fail.sum()) / max(fail.sum(), 1)
        out[f"caught@{int(b * 100)}"] = float(caught)
        out[f"perfect@{int(b * 100)}"] = float(perfect)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/qc-profile"))
    parser.add_argument("--quick", action="store_true", help="reduced data, one seed, ridge only (< 3 min)")
    parser.add_argument("--tasks", default="demo,csf")
    parser.add_argument("--reuse", action="store_true", help="reuse the measured tables in --out")
    parser.add_argument("--members", type=int, default=None, help="deep-ensemble size, the deployed model included "
                        "(default 3 with --quick, else 5)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="shipped",
                        help="an option of the profile estimator (issue 14, item 3); its files end in _<variant>")
    parser.add_argument("--short-members", action="store_true", help="train members 1 ... as --quick does (shorter "
                        "than the deployed model's recipe) also without --quick")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = 1 if args.quick else 3
    summaries = []
    for task in args.tasks.split(","):
        make = {"demo": demo_task, "csf": csf_task}[task]
        n_members = args.members or (3 if args.quick else 5)
        name, members, clean, suite, refs = make(args.quick, n_members, args.quick or args.short_members)
        model = members[0]
        files = [args.out / f"{task}_{k}.parquet" for k in ("scores", "profile", "cost")]
        if args.reuse and all(f.exists() for f in files):
            table, profile = pd.read_parquet(files[0]), pd.read_parquet(files[1])
            cost = pd.read_parquet(files[2]).iloc[0].to_dict()
        else:
            table, profile, cost = measure(name, members, clean, suite, refs)
            table.to_parquet(files[0])
            profile.to_parquet(files[1])
            pd.DataFrame([cost]).to_parquet(files[2])
        labels = np.concatenate([clean.labels, suite.labels])
        table["label_pixels"] = labels.reshape(len(labels), -1).sum(1)
        profile = add_summaries(profile)
        per_seed = evaluate(table, profile, state_dict_hash(model), seeds, args.quick, args.variant)
        suffix = "" if args.variant == "shipped" else f"_{args.variant}"
        per_seed.to_csv(args.out / f"{task}_per_seed{suffix}.csv", index=False)
        agg = per_seed.groupby("method", sort=False).mean(numeric_only=True).drop(columns="seed")
        sd = per_seed.groupby("method", sort=False).std(ddof=0, numeric_only=True)
        agg["spearman_sd"] = sd["spearman"]
        fwd = cost["forward_s"]
        passes = {m: p for m, (_, p) in BASELINES.items()}
        passes.update({m: "ensemble" for m in RAW})
        sa_cost = cost["analyze_s"] / fwd
        agg["cost_x_forward"] = [
            (cost["analyze_s"] + cost["profile_s"]) / fwd + (cost["members"] - 1) * (m == "profile + ensemble Dice")
            if m.startswith("profile")
            else sa_cost if passes.get(m) is None else float(cost["members"]) if passes[m] == "ensemble" else float(passes[m])
            for m in agg.index
        ]  # fmt: skip
        agg.insert(0, "task", name)
        agg = agg.sort_values("spearman", ascending=False)
        summaries.append(agg.reset_index())
        failures = float((table["dice"] < THRESHOLD).mean())
        print(f"\n== {name}: {len(table)} images, Dice mean {table['dice'].mean():.3f}, failures (Dice < {THRESHOLD}) "
              f"{failures:.0%}; reverse SA {cost['reverse_s'] / fwd:.2f}x forward, profile {cost['profile_s'] / fwd:.2f}x, "
              f"analysis {sa_cost:.2f}x; ensemble of {int(cost['members'])} (measured) {cost['ensemble_s'] / fwd:.2f}x")  # fmt: skip
        show = ["spearman", "spearman_labelled", "pearson", "mae_clean", "mae", "mae_labelled", "aurc", "eaurc", "auroc", "caught@10", "caught@20",
                "caught@30", "perfect@30", "coverage", "cost_x_forward"]  # fmt: skip
        with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
            print(agg[[c for c in show if c in agg]])
    out = pd.concat(summaries, ignore_index=True)
    name = "qc_profile.csv" if args.variant == "shipped" else f"qc_profile_{args.variant}.csv"
    out.to_csv(args.out / name, index=False)
    print(f"\nwritten: {args.out / name}")


if __name__ == "__main__":
    main()
