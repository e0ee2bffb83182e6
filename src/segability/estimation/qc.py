"""Label-free quality control of a model's outputs, and its evaluation against the baselines.

:func:`qc` runs the analysis on unlabelled images and applies a saved :class:`Calibration`;
:func:`evaluate_qc` measures every method (SA-based and baselines) on labelled images: calibrate on
one part of the images (split by source), evaluate on the rest, repeat over seeds. Both take
tensors; the command line runs the same steps on files (:func:`gate_result`, :func:`compare_qc`,
:func:`stream_baseline_scores` on a result folder of :func:`segability.batch.analyze_files`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis import INPUT, SAResult, analyze, model_probabilities, output_tensor
from segability.capture import eval_mode
from segability.estimation.baselines import (
    boundary_confidence,
    mc_dropout_agreement,
    mean_entropy,
    mean_max_prob_foreground,
    tta_flip_agreement,
)
from segability.estimation.calibration import Calibration, fingerprint, state_dict_hash
from segability.estimation.evaluation import (
    MetricUndefinedWarning,
    aurc,
    eaurc,
    failure_auroc,
    pearson,
    spearman,
)
from segability.estimation.gate import GATE_COLUMNS, quality_gate
from segability.estimation.selection import decoder_layers, defined_layers, layer_spearman, mean_sa

__all__ = [
    "QC_COLUMNS",
    "COMPARISON_COLUMNS",
    "QCEvaluation",
    "baseline_scores",
    "stream_baseline_scores",
    "windowed",
    "method_scores",
    "qc",
    "gate_result",
    "evaluate_qc",
    "compare_qc",
    "fit_calibration",
    "ProfileCalibration",
    "PROFILE_COLUMNS",
    "PROFILE_FORMAT",
    "DEFAULT_SHIFTS",
    "DEFAULT_SEVERITIES",
    "fit_profile_calibration",
    "profile_gate",
    "stream_profiles",
    "shift_image",
    "load_calibration",
    "references_path",
]

QC_COLUMNS = GATE_COLUMNS  # qc.csv: the QC schema's columns, then the scores the gate used
COMPARISON_COLUMNS = ["method", "spearman", "pearson", "mae", "aurc", "eaurc", "auroc"]
SINGLE_PASS = ("entropy", "max_prob_foreground", "boundary_confidence")


def _batches(images: torch.Tensor, batch_size: int):
    for s in range(0, images.shape[0], batch_size):
        yield s, images[s : s + batch_size]


def baseline_scores(
    model: nn.Module,
    images: torch.Tensor,
    *,
    ids: Sequence[str] | None = None,
    output: str = "auto",
    target: int | None = None,
    output_key: str | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    tta: bool = True,
    mc_dropout: bool | None = None,
    n_mc: int = 8,
    seed: int = 0,
) -> pd.DataFrame:
    """The baselines of Zenk et al. (MedIA 2025) per image; higher = better expected quality.

    Columns: ``image``, ``entropy`` (negated mean entropy), ``max_prob_foreground``,
    ``boundary_confidence`` (one forward pass each, shared), ``tta_flip`` (pairwise Dice over flips)
    and ``mc_dropout`` (pairwise Dice over ``n_mc`` dropout passes; only when the model has
    dropout and ``mc_dropout`` is not False).
    """
    params = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (params.device if params is not None else torch.device("cpu"))
    has_dropout = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules())
    use_mc = has_dropout if mc_dropout is None else (mc_dropout and has_dropout)
    tgt = 1 if target is None else target

    def predict(x: torch.Tensor) -> torch.Tensor:
        return model_probabilities(model(x), output, tgt, output_key)[0]

    cols: dict[str, list[float]] = {k: [] for k in (*SINGLE_PASS, "tta_flip", "mc_dropout")}
    with eval_mode(model), torch.no_grad():
        for _, x in _batches(images, batch_size):
            x = x.to(dev).float()
            prob = predict(x)
            cols["entropy"] += mean_entropy(prob).cpu().tolist()
            cols["max_prob_foreground"] += mean_max_prob_foreground(prob).cpu().tolist()
            cols["boundary_confidence"] += boundary_confidence(prob).cpu().tolist()
            cols["tta_flip"] += tta_flip_agreement(predict, x).cpu().tolist() if tta else [math.nan] * len(x)
            if use_mc:
                cols["mc_dropout"] += mc_dropout_agreement(model, x, predict, n=n_mc, seed=seed).cpu().tolist()
    table = pd.DataFrame({"image": [str(i) for i in (ids if ids is not None else range(len(images)))]})
    for k, v in cols.items():
        if v:
            table[k] = v
    return table


def stream_baseline_scores(
    model: nn.Module,
    items: Iterable[tuple[str, torch.Tensor]],
    *,
    progress: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`baseline_scores` over ``(image id, image (C, *S))`` pairs, one image at a time.

    Images of any size, read lazily (a generator over files keeps one image in memory).

    Args:
        model: the network.
        items: ``(id, image)`` pairs.
        progress: called with 1 after each image.
        **kwargs: passed to :func:`baseline_scores` (``output``, ``target``, ``tta``, ...).

    Example:
        >>> net = nn.Conv2d(1, 1, 1)
        >>> t = stream_baseline_scores(net, [("a", torch.rand(1, 8, 8)), ("b", torch.rand(1, 8, 8))], tta=False)
        >>> t["image"].tolist()
        ['a', 'b']
    """
    tables = []
    for image_id, image in items:
        tables.append(baseline_scores(model, image[None], ids=[str(image_id)], batch_size=1, **kwargs))
        if progress is not None:
            progress(1)
    if not tables:
        return pd.DataFrame({"image": pd.Series([], dtype=object)})
    return pd.concat(tables, ignore_index=True)


class _Windowed(nn.Module):
    """The model run in sliding windows over a whole volume (MONAI ``sliding_window_inference``)."""

    def __init__(self, model: nn.Module, roi_size: Sequence[int], overlap: float, sw_batch_size: int, output_key: str | None):
        super().__init__()
        self.model = model
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = float(overlap)
        self.sw_batch_size = int(sw_batch_size)
        self.output_key = output_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        spatial = x.shape[2:]
        if len(self.roi_size) != len(spatial):
            raise ValueError(f"roi_size must give one window size per spatial dim ({len(spatial)}), got {self.roi_size}")
        roi = tuple(s if r <= 0 or r > s else r for r, s in zip(self.roi_size, spatial, strict=True))
        return sliding_window_inference(
            x, roi, self.sw_batch_size, lambda w: output_tensor(self.model(w), self.output_key),
            overlap=self.overlap, mode="constant",
        )


def windowed(model: nn.Module, roi_size: Sequence[int], *, overlap: float = 0.25, sw_batch_size: int = 1,
             output_key: str | None = None) -> nn.Module:
    """``model`` as a module that runs it in sliding windows (the baselines on large volumes).

    The windows and their constant blending are those of the analysis
    (:func:`segability.analysis.analyze_windows`); a size <= 0 takes the whole axis. The returned
    module gives the output tensor (``output_key`` already applied); its dropout layers are the model's.

    Example:
        >>> net = windowed(nn.Conv3d(1, 1, 1), (8, 8, 8))
        >>> tuple(net(torch.rand(1, 1, 12, 12, 12)).shape)
        (1, 1, 12, 12, 12)
    """
    return _Windowed(model, roi_size, overlap, sw_batch_size, output_key)


def method_scores(
    result: SAResult,
    *,
    layer_sets: dict[str, Sequence[str]] | None = None,
) -> pd.DataFrame:
    """SA-based scores per image from an analysis: ``sa_all`` (mean ``sa_pred`` over every layer,
    the paper's), ``sa_decoder``, ``sa_input`` (``input_sa_pred``) and one column per extra layer set."""
    layers = result.layers
    hidden = [n for n in layers["layer"].unique() if n != INPUT]
    out = pd.DataFrame({"image": result.images["image"].astype(str)})
    out["sa_all"] = out["image"].map(mean_sa(layers, hidden))
    dec = decoder_layers(layers[layers["layer"] != INPUT])
    if dec:
        out["sa_decoder"] = out["image"].map(mean_sa(layers, dec))
    out["sa_input"] = result.images["input_sa_pred"].to_numpy()
    for name, chosen in (layer_sets or {}).items():
        out[name] = out["image"].map(mean_sa(layers, list(chosen)))
    return out


def fit_calibration(
    model: nn.Module,
    result: SAResult,
    *,
    layers: Sequence[str] | None = None,
    score: str = "mean_sa+input",
    method: str = "auto",
    alpha: float = 0.1,
    seed: int = 0,
) -> Calibration:
    """Fit a :class:`Calibration` from label-free SA scores to true Dice on a labelled analysis.

    Args:
        model: the analysed network (its weights enter the fingerprint).
        result: a labelled analysis of ``model``.
        layers: layers whose mean ``sa_pred`` is the score (default every analysed layer with a
            defined ``sa_pred`` on some image: a head the model never calls in eval mode is left out).
        score: ``"mean_sa"`` (the paper's mean SA alone) or ``"mean_sa+input"`` (default: a least
            squares combination of mean SA and the input image's SA, fitted here; measured to rank
            outputs better on the demo's shifted suite, see ``docs/results.md``).
        method: map to Dice, ``"auto"``, ``"isotonic"`` or ``"linear"``.
        alpha: miscoverage of the conformal interval.
        seed: seed of the calibration's random split.
    """
    used = list(layers) if layers is not None else defined_layers(result.layers)
    if not used:
        raise ValueError("layers: no layer besides the input has a defined SA on these images")
    if result.images["dice"].isna().all():
        raise ValueError("calibration needs labelled images: every dice is NaN (give --labels)")
    if score not in ("mean_sa", "mean_sa+input"):
        raise ValueError(f'score must be "mean_sa" or "mean_sa+input", got {score!r}')
    mean = result.images["image"].astype(str).map(mean_sa(result.layers, used)).to_numpy(float)
    dice = result.images["dice"].to_numpy(float)
    inputs = result.images["input_sa_pred"].to_numpy(float)
    combination: dict[str, float] = {}
    values = mean
    if score == "mean_sa+input":
        ok = np.isfinite(mean) & np.isfinite(inputs) & np.isfinite(dice)
        if ok.sum() < 4:
            raise ValueError(f"need at least 4 labelled images with a defined SA, got {int(ok.sum())}")
        design = np.column_stack([mean, inputs, np.ones(len(mean))])
        coef, *_ = np.linalg.lstsq(design[ok], dice[ok], rcond=None)
        combination = {"mean_sa_pred": float(coef[0]), "input_sa_pred": float(coef[1])}
        values = coef[0] * mean + coef[1] * inputs
    cal = Calibration.fit(
        values, dice, method=method, alpha=alpha,
        fingerprint=fingerprint(state_dict_hash(model), used), layers=used,
        input_sa=inputs, seed=seed,
    )
    cal.combination = combination
    return cal


def gate_result(
    result: SAResult,
    calibration: Calibration,
    *,
    threshold: float = 0.75,
    use_lower: bool = False,
    failed: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The label-free quality gate on an analysis: one :data:`QC_COLUMNS` row per image.

    The score is the mean ``sa_pred`` over the calibration's layers; the reason compares the
    label-free ``input_sa_pred`` (what the calibration's input-SA threshold was taken from).

    Args:
        result: an analysis of the calibration's model (e.g. ``load_result(run_dir)``).
        calibration: the :class:`Calibration` (its fingerprint is the caller's to check).
        threshold: flag below this estimated Dice.
        use_lower: compare the interval's lower end instead of the estimate.
        failed: images that have no analysis, by id, with the error: added as rows of status
            ``failed`` (a batch run lists them in ``errors.csv``).

    Raises:
        ValueError: the analysis lacks a layer of the calibration.
    """
    missing = set(calibration.layers) - set(result.layers["layer"].astype(str))
    if missing:
        raise ValueError(f"the calibration uses layers the analysis did not produce: {sorted(missing)[:5]}")
    gate = quality_gate(
        result.images, calibration, threshold=threshold, use_lower=use_lower, layers=result.layers,
        input_column="input_sa_pred",
    )
    if failed:
        from segability.estimation.gate import failed_rows

        gate = pd.concat([gate, failed_rows(list(failed), list(failed.values()))], ignore_index=True)
    return gate[QC_COLUMNS]


def qc(
    model: nn.Module,
    images: Any,
    *,
    calibration: Calibration,
    threshold: float = 0.75,
    use_lower: bool = False,
    **analyze_kwargs: Any,
) -> tuple[pd.DataFrame, SAResult]:
    """Label-free quality gate: analyse ``images`` and flag outputs whose estimated Dice is low.

    Args:
        model: the network (the one the calibration was made for: checked by fingerprint).
        images: as for :func:`segability.analyze` (no labels needed).
        calibration: a :class:`Calibration` (e.g. ``Calibration.load("calibration.json")``).
        threshold: flag below this estimated Dice.
        use_lower: compare the interval's lower end instead of the estimate.
        **analyze_kwargs: passed to :func:`segability.analyze` (``batch_size``, ``device``, ...);
            ``layers`` defaults to the calibration's layers.

    Returns:
        ``(qc table with QC_COLUMNS, the analysis result)``; write the table with
        ``segability.analysis.results.write_table(table, path, QC)``.

    Raises:
        ValueError: the calibration was made for another model or layer set.
    """
    calibration.check_fingerprint(fingerprint(state_dict_hash(model), calibration.layers))
    analyze_kwargs.setdefault("layers", list(calibration.layers))
    result = analyze(model, images, **analyze_kwargs)
    return gate_result(result, calibration, threshold=threshold, use_lower=use_lower), result


@dataclass
class QCEvaluation:
    """Output of :func:`evaluate_qc`: the comparison (mean over seeds, with ``*_std``), per-seed rows,
    and per-image scores (``image``, ``dice``, one column per method)."""

    comparison: pd.DataFrame
    per_seed: pd.DataFrame
    scores: pd.DataFrame


def _metrics(dice: np.ndarray, score: np.ndarray, estimate: np.ndarray, threshold: float) -> dict[str, float]:
    ok = np.isfinite(dice)
    d, s, e = dice[ok], score[ok], estimate[ok]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricUndefinedWarning)
        return {
            "spearman": spearman(s, d),
            "pearson": pearson(s, d),
            "mae": float(np.nanmean(np.abs(e - d))) if np.isfinite(e).any() else math.nan,
            "aurc": aurc(1 - d, s),
            "eaurc": eaurc(1 - d, s),
            "auroc": failure_auroc(d, s, threshold),
        }


def evaluate_qc(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    ids: Sequence[str] | None = None,
    sources: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    calibration_fraction: float = 0.5,
    threshold: float = 0.75,
    tta: bool = True,
    mc_dropout: bool | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    result: SAResult | None = None,
    progress: Callable[[int], None] | None = None,
    **analyze_kwargs: Any,
) -> QCEvaluation:
    """Measure the SA-based quality estimators and the baselines side by side on labelled images.

    For each seed, the images are split by ``sources`` (images made from the same source image
    stay on one side) into a calibration part and an evaluation part. On the calibration part:
    the "calibrated" layer set (layers whose ``sa_pred`` best follows Dice), every method's map to
    Dice (isotonic or linear, :class:`Calibration`), ``sa_all+input`` (a linear model of mean SA
    and input SA: what :func:`fit_calibration` gives the gate by default) and ``sa_combined`` (the
    same plus the best single-pass baseline). On the
    evaluation part: Spearman and Pearson with Dice, MAE of the calibrated estimate, AURC and
    e-AURC (risk = 1 - Dice), failure AUROC at Dice < ``threshold``.

    Args:
        model: the network.
        images: (N, C, *S) images.
        labels: (N, 1, *S) labels.
        ids: image ids (default the index).
        sources: the source of each image (default: the image itself).
        seeds: one calibration/evaluation split per seed.
        calibration_fraction: share of sources used for calibration.
        threshold: failure threshold on Dice.
        tta: include the flip test-time augmentation baseline.
        mc_dropout: include MC dropout (default: when the model has dropout).
        batch_size: images per forward pass.
        device: where to run.
        result: an existing labelled analysis of the same images (skips the analysis).
        progress: called with the number of images analysed after each batch.
        **analyze_kwargs: passed to :func:`segability.analyze`.

    Returns:
        :class:`QCEvaluation`.

    Raises:
        ValueError: when labels are missing or do not match the images.
    """
    if labels is None:
        raise ValueError("evaluate_qc needs labels: give --labels (a folder of label maps paired with --images)")
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    ids = [str(i) for i in (ids if ids is not None else range(len(images)))]
    if result is None:
        result = analyze(model, images, labels, ids=ids, batch_size=batch_size, device=device, progress=progress, **analyze_kwargs)
    if result.images["dice"].isna().all():
        raise ValueError("evaluate_qc needs labelled images: every Dice is NaN")
    readout = {k: analyze_kwargs[k] for k in ("output", "target", "output_key") if k in analyze_kwargs}
    base = baseline_scores(model, images, ids=ids, tta=tta, mc_dropout=mc_dropout, batch_size=batch_size, device=device, **readout)
    return compare_qc(
        result, base, sources=None if sources is None else dict(zip(ids, map(str, sources), strict=True)),
        seeds=seeds, calibration_fraction=calibration_fraction, threshold=threshold,
    )


def compare_qc(
    result: SAResult,
    baselines: pd.DataFrame,
    *,
    sources: dict[str, str] | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    calibration_fraction: float = 0.5,
    threshold: float = 0.75,
) -> QCEvaluation:
    """The comparison of :func:`evaluate_qc` on tables: a labelled analysis and the baselines' scores.

    Args:
        result: a labelled analysis (``load_result(run_dir)`` or :func:`segability.analyze`).
        baselines: :func:`baseline_scores` / :func:`stream_baseline_scores` of the same images.
        sources: the source of each image id (default: the image itself); images of one source
            stay on one side of every split.
        seeds, calibration_fraction, threshold: as in :func:`evaluate_qc`.

    Returns:
        :class:`QCEvaluation`.

    Raises:
        ValueError: no labelled image, or a bad ``calibration_fraction``.
    """
    if not 0 < calibration_fraction < 1:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction}")
    if result.images["dice"].isna().all():
        raise ValueError("evaluate_qc needs labelled images: every Dice is NaN")
    ids = result.images["image"].astype(str).tolist()
    sa = method_scores(result)
    base = baselines.assign(image=baselines["image"].astype(str))
    scores = result.images[["image", "dice"]].astype({"image": str}).merge(sa, on="image").merge(base, on="image")
    src = pd.Series([(sources or {}).get(i, i) for i in ids], index=ids)
    layers = result.layers[result.layers["layer"] != INPUT]
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        uniq = src.unique()
        cal_src = set(rng.choice(uniq, size=max(2, int(round(len(uniq) * calibration_fraction))), replace=False))
        is_cal = scores["image"].map(src).isin(cal_src).to_numpy()
        cal_ids = set(scores.loc[is_cal, "image"])
        cal_dice = scores.loc[is_cal].set_index("image")["dice"]
        rho = layer_spearman(layers[layers["image"].isin(cal_ids)], cal_dice).dropna()
        k = max(1, len(rho) // 4)
        chosen = list(rho.sort_values(ascending=False).index[:k])
        seed_scores = scores.copy()
        seed_scores["sa_calibrated"] = seed_scores["image"].map(mean_sa(layers, chosen))
        methods = [c for c in seed_scores.columns if c not in ("image", "dice")]
        best_single = max(
            (m for m in SINGLE_PASS if m in seed_scores),
            key=lambda m: abs(spearman(seed_scores.loc[is_cal, m], seed_scores.loc[is_cal, "dice"])),
        )
        # what the gate calibrates by default (label-free, one forward pass)
        seed_scores["sa_all+input"] = _linear_combination(seed_scores, ["sa_all", "sa_input"], is_cal)
        seed_scores["sa_combined"] = _linear_combination(
            seed_scores, ["sa_all", "sa_input", best_single], is_cal
        )
        methods += ["sa_all+input", "sa_combined"]
        dice = seed_scores["dice"].to_numpy(float)
        for m in methods:
            s = seed_scores[m].to_numpy(float)
            est = _calibrated(s, dice, is_cal, seed)
            row = _metrics(dice[~is_cal], s[~is_cal], est[~is_cal], threshold)
            rows.append({"seed": seed, "method": m, **row, "n_calibration": int(is_cal.sum()), "n_evaluation": int((~is_cal).sum())})
    per_seed = pd.DataFrame(rows)
    metric_cols = COMPARISON_COLUMNS[1:]
    agg = per_seed.groupby("method", sort=False)[metric_cols]
    comparison = agg.mean().join(agg.std(ddof=0).add_suffix("_std")).reset_index()
    comparison = comparison.sort_values("spearman", ascending=False, key=lambda s: s.fillna(-2)).reset_index(drop=True)
    return QCEvaluation(comparison=comparison, per_seed=per_seed, scores=scores)


def _calibrated(score: np.ndarray, dice: np.ndarray, is_cal: np.ndarray, seed: int) -> np.ndarray:
    ok = is_cal & np.isfinite(score) & np.isfinite(dice)
    if ok.sum() < 8:
        return np.full_like(score, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = Calibration.fit(score[ok], dice[ok], method="auto", fingerprint=fingerprint("-", ["-"]), layers=["-"], seed=seed)
    est = np.full_like(score, math.nan)
    finite = np.isfinite(score)
    est[finite] = cal.predict(score[finite])["estimated_dice"].to_numpy()
    return est


def _linear_combination(scores: pd.DataFrame, columns: list[str], is_cal: np.ndarray) -> np.ndarray:
    """Least-squares fit of Dice on ``columns`` over the calibration part; applied to all images."""
    x = scores[columns].to_numpy(float)
    y = scores["dice"].to_numpy(float)
    ok = is_cal & np.isfinite(x).all(1) & np.isfinite(y)
    design = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(design[ok], y[ok], rcond=None)
    out = design @ coef
    out[~np.isfinite(x).all(1)] = math.nan
    return out


# The SA-profile gate lives in its own module; its names stay importable from here.
from segability.estimation.profile_gate import (  # noqa: E402
    DEFAULT_SEVERITIES,
    DEFAULT_SHIFTS,
    PROFILE_COLUMNS,
    PROFILE_FORMAT,
    ProfileCalibration,
    fit_profile_calibration,
    load_calibration,
    profile_gate,
    references_path,
    shift_image,
    stream_profiles,
)
