"""Analysis of an nnU-Net v2 results folder per case, as a multiple of nnU-Net's own inference.

    python benchmarks/bench_nnunet.py [--cache DIR]

The results folder is the test fixture's (``tests/nnunet_fixture.py``: a genuine nnU-Net v2
folder built with nnU-Net's own planner, preprocessor and trainer on MNI152 crops; built once into
``--cache``, default ``.pytest_cache/d/nnunet``, the tests' cache). On one test case (two tiles),
for fold 0 with and without mirroring and for the ensemble of folds 0 and 1, best of 3:

- ``inference``: ``NnUNetModel.predict_logits`` (nnU-Net's Gaussian sliding window, mirroring,
  fold ensemble) on the preprocessed case.
- ``analyze_case``: segability's whole per-case analysis (nnU-Net's preprocessing, the same
  inference, SA of every encoder and decoder stage for both classes over nnU-Net's tiles).

Needs nnunetv2 (``make install`` installs it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import nnunet_fixture as fx  # noqa: E402
from segability.integrations import nnunet as nn_  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Path(".pytest_cache/d/nnunet"))
    args = parser.parse_args()
    root = fx.cached(args.cache)
    res, raw = fx.results_folder(root), fx.raw_folder(root)
    for folds, mirroring in (([0], True), ([0], False), ([0, 1], True)):
        model = nn_.load_nnunet(res, folds, mirroring=mirroring)
        case = nn_.find_cases(raw / "imagesTs", raw / "labelsTs", model.channels, model.file_ending)[0]
        pre = model.preprocess(case)
        t_pred, t_all = [], []
        for _ in range(3):
            t = time.perf_counter()
            model.predict_logits(pre.data)
            t_pred.append(time.perf_counter() - t)
            t = time.perf_counter()
            nn_.analyze_case(model, case)
            t_all.append(time.perf_counter() - t)
        p, a = min(t_pred), min(t_all)
        tiles = len(model.tiles(tuple(pre.data.shape[1:])))
        layers = len(nn_.default_layers(model.network))
        print(f"folds={folds} mirroring={mirroring} tiles={tiles}: inference {p:.2f} s, analyze_case "
              f"({layers} layers x 2 classes) {a:.2f} s, {a / p:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
