"""Label-free quality control of a model's outputs, and its evaluation against the baselines.

:func:`qc` runs the analysis on unlabelled images and applies a saved :class:`Calibration`;
:func:`evaluate_qc` measures every method (SA-based and baselines) on labelled images: calibrate on
one part of the images (split by source), evaluate on the rest, repeat over seeds. Both take
tensors; the command line runs the same steps on files (:func:`gate_result`, :func:`compare_qc`,
:func:`stream_baseline_scores` on a result folder of :func:`segability.batch.analyze_files`).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis import INPUT, SAResult, analyze, model_probabilities, output_tensor
from segability.capture import eval_mode
from segability.errors import UsageError
from segability.estimation.baselines import (
    boundary_confidence,
    mc_dropout_agreement,
    mean_entropy,
    mean_max_prob_foreground,
    tta_flip_agreement,
)
from segability.estimation.calibration import Calibration, fingerprint, state_dict_hash
from segability.estimation.estimator import QualityEstimator
from segability.estimation.evaluation import (
    MetricUndefinedWarning,
    aurc,
    eaurc,
    failure_auroc,
    pearson,
    spearman,
)
from segability.estimation.gate import GATE_COLUMNS, quality_gate
from segability.estimation.reverse import ReferenceCache
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


# ------------------------------------------------------------------- the SA-profile estimator
PROFILE_FORMAT = "segability-profile-calibration/1"
DEFAULT_SHIFTS: tuple[str, ...] = ("gaussian_noise", "blur", "bias_field", "contrast")
DEFAULT_SEVERITIES: tuple[float, ...] = (0.5, 1.0)
PROFILE_COLUMNS = [*QC_COLUMNS[:7], "out_of_range", "distance", "mean_sa_pred", "input_sa_pred"]
Item = tuple[str, torch.Tensor]


@dataclass
class ProfileCalibration:
    """A fitted SA-profile estimator with everything needed to apply it to new images.

    Attributes:
        estimator: the :class:`~segability.estimation.estimator.QualityEstimator` (features, ridge
            model, conformal radius, out-of-range statistics, model hash, package version).
        references: the reference cache of labelled images for reverse SA (None: no reverse columns).
        layers: the hidden layers of the profile (the analysis must produce them).
        body: whether the profile has the body-masked columns.
        shifts, severities: the synthetic shifts the calibration images were augmented with.
        readout: ``output`` and ``target`` of the analysis (how the output was read).
    """

    estimator: QualityEstimator
    references: ReferenceCache | None
    layers: list[str]
    body: bool = True
    shifts: list[str] = field(default_factory=list)
    severities: list[float] = field(default_factory=list)
    readout: dict[str, Any] = field(default_factory=dict)

    @property
    def model_hash(self) -> str:
        return self.estimator.model_hash

    def check_model(self, model: nn.Module) -> None:
        """Raise ``UsageError`` when ``model`` is not the one the estimator was fitted for."""
        self.estimator.check_model(state_dict_hash(model))

    def profile(self, model: nn.Module, items: Iterable[Item], result: SAResult, *,
                progress: Callable[[int], None] | None = None) -> pd.DataFrame:  # fmt: skip
        """The SA profile of each ``(image id, image (C, *S))`` of ``result``, one image at a time."""
        return stream_profiles(model, items, result, layers=self.layers, references=self.references, body=self.body,
                               output=self.readout.get("output") or "auto", target=self.readout.get("target"),
                               progress=progress)  # fmt: skip

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON and, beside it, the reference cache ``<stem>.references.npz`` (no pickle)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        refs = None
        if self.references is not None:
            refs_path = self.references.save(references_path(path))
            refs = {"file": refs_path.name, "sha256": _sha256(refs_path), "images": len(self.references),
                    "layers": list(self.references.layers)}  # fmt: skip
        data = {
            "format": PROFILE_FORMAT, "estimator": self.estimator.to_dict(), "references": refs,
            "layers": list(self.layers), "body": bool(self.body), "shifts": list(self.shifts),
            "severities": [float(s) for s in self.severities], "readout": dict(self.readout),
            "model_hash": self.model_hash, "version": self.estimator.version,
        }  # fmt: skip
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ProfileCalibration:
        """Read a file written by :meth:`save` (and its reference cache, checked by sha256).

        Raises:
            UsageError: not a profile calibration, a reference cache that is missing or changed.
        """
        path = Path(path)
        data = json.loads(path.read_text())
        if data.get("format") != PROFILE_FORMAT:
            raise UsageError(f"{path} is not a segability profile calibration ({PROFILE_FORMAT})", argument="path")
        estimator = QualityEstimator.from_dict(data["estimator"])
        if estimator.kind != "ridge":
            raise UsageError(f"{path}: only ridge estimators are stored in a calibration file, got {estimator.kind!r}", argument="path")
        refs = None
        if data.get("references"):
            refs_path = path.with_name(data["references"]["file"])
            if not refs_path.is_file():
                raise UsageError(f"{path}: its reference cache {refs_path.name} is missing beside it", argument="path")
            if _sha256(refs_path) != data["references"]["sha256"]:
                raise UsageError(f"{path}: its reference cache {refs_path.name} has changed (sha256)", argument="path")
            refs = ReferenceCache.load(refs_path)
        return cls(estimator=estimator, references=refs, layers=list(data["layers"]), body=bool(data["body"]),
                   shifts=list(data.get("shifts") or []), severities=list(data.get("severities") or []),
                   readout=dict(data.get("readout") or {}))  # fmt: skip


def references_path(calibration: str | os.PathLike[str]) -> Path:
    """Where a profile calibration keeps its reference cache: ``<stem>.references.npz`` beside it.

    Example:
        >>> references_path("cal/calibration.json").as_posix()
        'cal/calibration.references.npz'
    """
    path = Path(calibration)
    return path.with_name(f"{path.stem}.references.npz")


def load_calibration(path: str | os.PathLike[str]) -> Calibration | ProfileCalibration:
    """A calibration file of either kind: the mean-SA map (:class:`Calibration`) or the SA-profile
    estimator (:class:`ProfileCalibration`), told apart by the file's ``format``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a calibration file (not JSON: {exc})", argument="path") from exc
    if isinstance(data, dict) and data.get("format") == PROFILE_FORMAT:
        return ProfileCalibration.load(path)
    return Calibration.load(path)


def shift_image(image: torch.Tensor, name: str, severity: float, seed: int = 0) -> torch.Tensor:
    """One of :data:`segability.datasets.SHIFTS` on an image of any intensity range.

    The shifts assume intensities of about [0, 1]; the image is mapped there by its 0.5th and 99.5th
    percentiles, shifted, and mapped back, so a severity means the same on CT numbers as on [0, 1].

    Example:
        >>> x = torch.rand(1, 16, 16) * 1000
        >>> tuple(shift_image(x, "blur", 1.0).shape)
        (1, 16, 16)
    """
    from segability.datasets.shifts import apply_shift

    x = image.detach().cpu().float().numpy()
    lo, hi = np.percentile(x, [0.5, 99.5])
    span = float(hi - lo) if hi > lo else 1.0
    shifted = apply_shift((x - lo) / span, name, severity, seed) * span + lo
    return torch.from_numpy(np.ascontiguousarray(shifted, dtype=np.float32))


def stream_profiles(
    model: nn.Module,
    items: Iterable[Item],
    result: SAResult,
    *,
    layers: Sequence[str],
    references: ReferenceCache | None,
    body: bool = True,
    output: str = "auto",
    target: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """:func:`~segability.estimation.profile.sa_profile` over ``(id, image (C, *S))`` pairs, one at a time.

    ``result`` holds the analysis of the images (``sa_pred`` per layer); unit summaries are left
    out (a run may or may not have analysed units: the estimator reads the same columns always).
    """
    from segability.estimation.profile import sa_profile

    tables_only = SAResult(layers=result.layers, images=result.images)
    rows = []
    for image_id, image in items:
        rows.append(sa_profile(model, image[None].float(), tables_only, references=references, mask="body" if body else None,
                               layers=[INPUT, *layers], ids=[str(image_id)], batch_size=1, output=output, target=target))  # fmt: skip
        if progress is not None:
            progress(1)
    if not rows:
        return pd.DataFrame({"image": pd.Series([], dtype=object)})
    return pd.concat(rows, ignore_index=True)


def fit_profile_calibration(
    model: nn.Module,
    items: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
    result: SAResult,
    *,
    shifts: Sequence[str] = DEFAULT_SHIFTS,
    severities: Sequence[float] = DEFAULT_SEVERITIES,
    n_references: int = 16,
    body: bool = True,
    reverse: bool = True,
    alpha: float = 0.1,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    **analyze_kwargs: Any,
) -> ProfileCalibration:
    """Fit the SA-profile estimator on labelled images plus synthetic shifts of those same images.

    For every labelled image: its profile from ``result`` (the analysis of the clean images), and
    each shift of ``shifts`` at each of ``severities`` (:func:`shift_image`), analysed here with
    the same options, with its true Dice. The reference cache holds the first ``n_references``
    images whose label is not empty. The estimator is ridge only (plain JSON, no pickle), chosen
    by grouped cross-validation with one shift family per fold (the clean images one more), so the
    choice rewards what carries over to an unseen kind of shift; without shifts, one source image
    per group.

    Args:
        model: the analysed network.
        items: ``(image id, image (C, *S), label (1, *S))`` of the images of ``result``.
        result: the labelled analysis of those images (:func:`segability.analyze` or a batch run).
        shifts, severities: the synthetic shifts (names of :data:`segability.datasets.SHIFTS`).
        n_references: labelled images in the reference cache (reverse SA); 0 or ``reverse=False``: none.
        body: include the body-masked columns.
        alpha: interval miscoverage.
        seed: seed of the shifts' random parts.
        progress: called with 1 after each image (clean or shifted).
        **analyze_kwargs: the analysis options of ``result`` (``output``, ``target``, ``mask``,
            ``guide``, ``empty``); ``layers`` is the calibration's.

    Raises:
        UsageError: too few labelled images, or an unknown shift.
    """
    from segability.analysis.readout import label_target
    from segability.estimation.profile import body_mask, profile_layers

    for name in shifts:
        if name not in _shift_names():
            raise UsageError(f"shifts: unknown shift {name!r}; choose from {', '.join(_shift_names())}", argument="shifts")
    layers = [n for n in profile_layers(result) if n != INPUT]
    if not layers:
        raise UsageError("result: no layer besides the input has a defined SA on these images", argument="result")
    output, target = analyze_kwargs.get("output", "auto"), analyze_kwargs.get("target")
    dice_of = result.images.assign(image=result.images["image"].astype(str)).set_index("image")["dice"]
    clean = [(str(i), x.float(), y) for i, x, y in items if str(i) in dice_of.index]
    if not clean:
        raise UsageError("items: none of the images is in the result", argument="items")
    refs = None
    if reverse and n_references > 0:
        shape = clean[0][1].shape
        picked = [(i, x, label_target(y[None], 2, target, target is not None)[0]) for i, x, y in clean if x.shape == shape]
        picked = [p for p in picked if float(p[2].sum()) > 0][:n_references]
        if picked:
            refs = ReferenceCache.build(model, torch.stack([p[1] for p in picked]), torch.stack([p[2] for p in picked]),
                                        [INPUT, *layers], body_mask=body_mask if body else None, ids=[p[0] for p in picked])  # fmt: skip
    def profile_of(pairs: Iterable[Item], analysis: SAResult) -> pd.DataFrame:
        return stream_profiles(model, pairs, analysis, layers=layers, references=refs, body=body, output=output,
                               target=target, progress=progress)  # fmt: skip

    profiles = [profile_of(((i, x) for i, x, _ in clean), result)]
    dice = [dice_of.reindex(profiles[0]["image"]).to_numpy(float)]
    groups, families = [i for i, _, _ in clean], ["clean"] * len(clean)
    kwargs = {k: v for k, v in analyze_kwargs.items() if k != "layers"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # undefined prototypes of strongly shifted images are expected
        for k, (image_id, x, y) in enumerate(clean):
            for name in shifts:
                shift_seed = int(np.random.SeedSequence([seed, k, _shift_names().index(name)]).generate_state(1)[0])
                for level in severities:
                    sid = f"{image_id}|{name}@{float(level):.2f}"
                    xs = shift_image(x, name, float(level), shift_seed)
                    res = analyze(model, xs[None], y[None], layers=layers, ids=[sid], batch_size=1, **kwargs)
                    profiles.append(profile_of([(sid, xs)], res))
                    dice.append(res.images["dice"].to_numpy(float))
                    groups.append(image_id)
                    families.append(name)
    profile = pd.concat(profiles, ignore_index=True)
    select = families if len(set(families)) >= 2 else None
    estimator = QualityEstimator.fit(profile, np.concatenate(dice), groups, model_hash=state_dict_hash(model),
                                     kinds=("ridge",), alpha=alpha, select_groups=select)  # fmt: skip
    return ProfileCalibration(estimator=estimator, references=refs, layers=layers, body=body, shifts=list(shifts),
                              severities=[float(s) for s in severities], readout={"output": output, "target": target})  # fmt: skip


def profile_gate(
    profile: pd.DataFrame,
    calibration: ProfileCalibration,
    *,
    result: SAResult | None = None,
    review_fraction: float | None = 0.2,
    threshold: float | None = None,
    failed: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The SA-profile gate: one :data:`PROFILE_COLUMNS` row per image (``qc.csv``).

    Flags the ``review_fraction`` least trusted images -- ``ceil(review_fraction * n)`` of the n
    gated images: out of range first, then the lowest lower bound -- and/or every image whose
    estimate is below ``threshold``. ``status`` is a
    :class:`~segability.estimation.estimator.FlagStatus` value (``ok``, ``image_quality``,
    ``model``, ``shift``) and ``reason`` its words; an out-of-range image (``shift``) has the
    interval [0, 1] and its estimate as computed, not clipped. Images without an analysis
    (``failed``) are added flagged, status ``failed``, and do not count towards the budget.

    Args:
        profile: :meth:`ProfileCalibration.profile` rows.
        calibration: the fitted calibration (its model is the caller's to check).
        result: the analysis, for the ``mean_sa_pred`` / ``input_sa_pred`` columns.
        review_fraction, threshold: as :meth:`QualityEstimator.gate`.
        failed: failed images by id, with the error.
    """
    from segability.estimation.gate import failed_rows

    if len(profile):
        table = calibration.estimator.gate(profile, review_fraction=review_fraction, threshold=threshold)
    else:
        table = pd.DataFrame({c: pd.Series([], dtype=object) for c in PROFILE_COLUMNS})
    if result is not None:
        scores = result.images.assign(image=result.images["image"].astype(str)).set_index("image")
        for col in ("mean_sa_pred", "input_sa_pred"):
            table[col] = scores[col].reindex(table["image"].astype(str)).to_numpy(float) if col in scores else math.nan
    else:
        table["mean_sa_pred"] = table["input_sa_pred"] = math.nan
    if failed:
        rows = failed_rows(list(failed), list(failed.values())).assign(out_of_range=False, distance=math.nan)
        table = pd.concat([table.astype({"flag": bool, "out_of_range": bool}), rows], ignore_index=True)
    return table[PROFILE_COLUMNS].astype({"flag": bool, "out_of_range": bool})


def _shift_names() -> tuple[str, ...]:
    from segability.datasets.shifts import SHIFTS

    return SHIFTS


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
