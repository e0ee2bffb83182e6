"""Does unit-level SA add to the label-free quality estimate? (docs/results.md, section 2)

    python benchmarks/qc_unit_features.py

Analyses the demo's clean test set and shifted suite with `units=True`, summarises each image's
unit SA against the prediction (mean, max, 90th percentile, share of units above 0.5), and prints
(1) each score's Spearman correlation with true Dice over all images and (2) the held-out Spearman
of least-squares combinations fitted on half of the source slices (mean of 3 splits, the protocol
of `segability evaluate-qc`).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from scipy import stats

from segability import analyze
from segability.demo import DemoConfig, demo_data
from segability.models import load_reference_model


def main() -> None:
    warnings.simplefilter("ignore")
    model = load_reference_model()
    clean, suite = demo_data(DemoConfig(), None)
    (cx, cy), (sx, sy) = clean.as_tensors(), suite.as_tensors()
    x, y, ids = torch.cat([cx, sx]), torch.cat([cy, sy]), [*clean.ids, *suite.ids]
    result = analyze(model, x, y, ids=ids, units=True, batch_size=32)
    units = result.units[result.units["layer"] != "input"]
    summary = units.groupby("image")["sa_pred"].agg(
        unit_max="max", unit_mean="mean", unit_q90=lambda s: s.quantile(0.9), unit_share=lambda s: (s > 0.5).mean()
    )
    images = result.images.set_index("image").join(summary)
    images["source"] = [i.split("|")[0] for i in images.index]
    print("Spearman with true Dice, all images with a defined score:")
    for col in ["mean_sa_pred", "input_sa_pred", *summary.columns]:
        d = images.dropna(subset=[col])
        print(f"  {col:<14} {stats.spearmanr(d[col], d['dice']).statistic:+.3f}")
    sources = images["source"].unique()
    print("Held-out Spearman of least-squares combinations (mean of 3 splits by source):")
    for cols in (["mean_sa_pred", "input_sa_pred"], ["mean_sa_pred", "input_sa_pred", "unit_mean", "unit_share"],
                 ["mean_sa_pred", "input_sa_pred", *summary.columns]):
        rhos = []
        for seed in range(3):
            cal = set(np.random.default_rng(seed).choice(sources, len(sources) // 2, replace=False))
            d = images.dropna(subset=cols)
            is_cal = d["source"].isin(cal).to_numpy()
            design = np.column_stack([d[cols].to_numpy(), np.ones(len(d))])
            coef, *_ = np.linalg.lstsq(design[is_cal], d["dice"].to_numpy()[is_cal], rcond=None)
            rhos.append(stats.spearmanr((design @ coef)[~is_cal], d["dice"].to_numpy()[~is_cal]).statistic)
        print(f"  {' + '.join(cols):<80} {np.mean(rhos):.3f}")


if __name__ == "__main__":
    main()
