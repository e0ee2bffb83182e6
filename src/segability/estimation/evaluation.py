"""How well a label-free score estimates segmentation quality: correlation, AURC, AUROC.

Conventions (as in Zenk et al., MedIA 2025, and Jaeger et al., ICLR 2023):

- a *score* or *confidence* is higher for better expected quality; *risk* is ``1 - Dice``;
- images without a known Dice (NaN) are left out of every metric;
- an image without a score (NaN, e.g. an empty prediction with undefined SA) is left out of the
  correlations and the MAE, and ranked as the *least* confident image by AURC / e-AURC / AUROC, so
  that a method cannot look better by refusing to score the hard images;
- ties in confidence are resolved by expectation over their order (AURC) or count one half
  (AUROC), so results never depend on the input order.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from segability.estimation.calibration import _apply_map, _as_1d, _fit_map, choose_map

__all__ = [
    "MetricUndefinedWarning",
    "spearman",
    "pearson",
    "aurc",
    "eaurc",
    "failure_auroc",
    "compare_methods",
    "COMPARE_COLUMNS",
]

COMPARE_COLUMNS = ["method", "spearman", "pearson", "mae", "aurc", "eaurc", "auroc", "n", "calibrated", "note"]


class MetricUndefinedWarning(UserWarning):
    """A metric is undefined on the given data (e.g. AUROC with a single class); it returned NaN."""


def _pair(x: Any, y: Any, xname: str, yname: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_1d(x, xname), _as_1d(y, yname)
    if len(a) != len(b):
        raise ValueError(f"{xname} and {yname} must have the same length, got {len(a)} and {len(b)}")
    return a, b


def _corr(kind: str, x: np.ndarray, y: np.ndarray) -> tuple[float, str]:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        return math.nan, f"{kind}: fewer than 3 images with both values"
    if np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return math.nan, f"{kind}: constant values"
    fn = stats.spearmanr if kind == "spearman" else stats.pearsonr
    return float(fn(x[ok], y[ok])[0]), ""


def _warned(value_reason: tuple[float, str]) -> float:
    value, reason = value_reason
    if reason:
        warnings.warn(reason, MetricUndefinedWarning, stacklevel=3)
    return value


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation over the pairs where both are finite.

    Returns NaN (with a :class:`MetricUndefinedWarning`) for fewer than 3 pairs or constant input.

    Example:
        >>> round(spearman([1, 2, 3, 4], [10, 20, 30, 25]), 4)
        0.8
    """
    a, b = _pair(x, y, "x", "y")
    return _warned(_corr("spearman", a, b))


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation over the pairs where both are finite (NaN as :func:`spearman`).

    Example:
        >>> round(pearson([1, 2, 3], [2, 4, 7]), 4)
        0.9934
    """
    a, b = _pair(x, y, "x", "y")
    return _warned(_corr("pearson", a, b))


def _risk_confidence(risk: Any, confidence: Any) -> tuple[np.ndarray, np.ndarray]:
    r, c = _pair(risk, confidence, "risk", "confidence")
    known = np.isfinite(r)
    r, c = r[known], c[known]
    if len(r) == 0:
        raise ValueError("risk: no finite value")
    # Unscored images are the least confident.
    c = np.where(np.isnan(c), -np.inf, c)
    return r, c


def _aurc(r: np.ndarray, c: np.ndarray) -> float:
    n = len(r)
    order = np.argsort(-c, kind="stable")
    r_sorted, c_sorted = r[order], c[order]
    # Average the risks inside each group of tied confidences: the expected AURC over all orders
    # of the ties (the cumulative mean is linear in the risks).
    _, group, counts = np.unique(c_sorted, return_inverse=True, return_counts=True)
    group_mean = np.bincount(group, weights=r_sorted) / counts
    r_tied = group_mean[group]
    selective_risk = np.cumsum(r_tied) / np.arange(1, n + 1)
    return float(selective_risk.mean())


def aurc(risk: Any, confidence: Any) -> float:
    """Area under the risk-coverage curve.

    Images are accepted in order of decreasing ``confidence``; at coverage ``k / n`` the selective
    risk is the mean risk of the ``k`` accepted images; AURC is the mean of the selective risks
    over ``k = 1..n``. Lower is better.

    Args:
        risk: per image, e.g. ``1 - dice`` (NaN rows are left out).
        confidence: per image, higher = more trusted (NaN = least confident).

    Returns:
        AURC in the units of ``risk``.

    Example:
        >>> round(aurc([0.1, 0.5, 0.2], [0.9, 0.1, 0.5]), 4)  # (0.1 + 0.15 + 0.2667) / 3
        0.1722
    """
    return _aurc(*_risk_confidence(risk, confidence))


def eaurc(risk: Any, confidence: Any) -> float:
    """Excess AURC: :func:`aurc` minus the AURC of the best possible ranking of the same risks.

    0 for a perfect ranking (risks increasing as confidence decreases). Lower is better.

    Example:
        >>> round(eaurc([0.1, 0.5, 0.2], [0.1, 0.9, 0.5]), 4)  # the worst order: 0.3722 - 0.1722
        0.2
    """
    r, c = _risk_confidence(risk, confidence)
    return _aurc(r, c) - _aurc(r, -r)


def _failure_auroc(dice: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, str]:
    known = np.isfinite(dice)
    dice, score = dice[known], score[known]
    failure = dice < threshold
    n_fail = int(failure.sum())
    if n_fail == 0 or n_fail == len(dice):
        which = "no failure" if n_fail == 0 else "only failures"
        return math.nan, f"auroc: {which} (dice < {threshold:g}) among {len(dice)} images; AUROC undefined"
    # Failure detector: -score; unscored images are the most suspicious.
    suspicion = np.where(np.isnan(score), np.inf, -score)
    ranks = stats.rankdata(suspicion)  # average ranks for ties
    n_pos, n_neg = n_fail, len(dice) - n_fail
    u = ranks[failure].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg)), ""


def failure_auroc(dice: Any, score: Any, threshold: float = 0.75) -> float:
    """AUROC of ``-score`` for detecting failures (``dice < threshold``).

    The probability that a random failure scores lower than a random success (ties count 1/2),
    computed from ranks (Mann-Whitney U). NaN with a :class:`MetricUndefinedWarning` saying why when
    only one class is present.

    Args:
        dice: true Dice per image (NaN rows are left out).
        score: per image, higher = better expected quality (NaN = most suspicious).
        threshold: Dice below which an output is a failure.

    Example:
        >>> failure_auroc([0.9, 0.8, 0.3, 0.5], [0.7, 0.9, 0.2, 0.8])  # 3 of 4 pairs right
        0.75
    """
    d, s = _pair(dice, score, "dice", "score")
    return _warned(_failure_auroc(d, s, float(threshold)))


def _cross_fitted(
    x: np.ndarray, y: np.ndarray, method: str, folds: int, seed: int
) -> tuple[np.ndarray, str]:
    """Out-of-fold Dice estimates from a map fitted on the other folds (finite x only)."""
    n = len(x)
    n_folds = min(int(folds), n // 2)
    if n_folds < 2:
        return np.full(n, np.nan), f"mae: too few scored images ({n}) to cross-fit a calibration"
    fold_of = np.random.default_rng(seed).permutation(n) % n_folds
    out = np.empty(n)
    for f in range(n_folds):
        test = fold_of == f
        chosen, _, _ = choose_map(x[~test], y[~test], method, seed=seed)
        out[test] = _apply_map(chosen, _fit_map(x[~test], y[~test], chosen), x[test])
    return out, ""


def compare_methods(
    scores: pd.DataFrame,
    dice_col: str = "dice",
    methods: Sequence[str] | None = None,
    calibrate: Mapping[str, bool] | None = None,
    *,
    threshold: float = 0.75,
    calibration_method: str = "auto",
    folds: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Compare label-free quality scores against the true Dice, one row per method.

    Correlations, AURC / e-AURC (risk ``1 - dice``) and failure AUROC use the raw scores (a
    monotone calibration would not change the ranking, only add ties). The MAE needs the Dice
    scale:

    - ``calibrate[m] is True``: the score is mapped to the Dice scale by cross-fitting: a
      calibration map (``calibration_method``: isotonic / linear / auto, as in
      :class:`~segability.estimation.calibration.Calibration`) is fitted on ``folds - 1`` folds and
      applied to the held-out fold; the MAE is over these out-of-fold estimates;
    - ``calibrate[m] is False``: the score already is a Dice estimate (values in [0, 1]); MAE of the
      raw score;
    - ``m`` not in ``calibrate``: the score is not on the Dice scale (entropy, raw confidence, ...):
      MAE is NaN and ``note`` says so.

    ``calibrate=None`` cross-fits every method.

    Args:
        scores: one row per image with ``dice_col`` and one column per method.
        dice_col: the true Dice column.
        methods: the score columns to compare; default every numeric column except ``dice_col``.
        calibrate: per method, whether to cross-fit a calibration for the MAE (see above).
        threshold: Dice below which an output is a failure (AUROC).
        calibration_method: ``"auto"``, ``"isotonic"`` or ``"linear"``.
        folds: cross-fitting folds.
        seed: seed of the fold split.

    Returns:
        DataFrame with the columns ``method``, ``spearman``, ``pearson``, ``mae``, ``aurc``,
        ``eaurc``, ``auroc`` plus ``n`` (images with a known Dice), ``calibrated`` (whether the MAE
        used a cross-fitted map) and ``note`` (why a value is NaN, or how many images lacked a
        score).

    Raises:
        ValueError: missing columns, no image with a known Dice, or a method marked as already on
            the Dice scale whose values leave [0, 1].

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"dice": [0.9, 0.8, 0.3, 0.5], "sa": [0.85, 0.8, 0.4, 0.6]})
        >>> row = compare_methods(t, methods=["sa"], calibrate={"sa": False}).iloc[0]
        >>> float(row.spearman), round(float(row.mae), 4), float(row.eaurc), float(row.auroc)
        (1.0, 0.0625, 0.0, 1.0)
    """
    if not isinstance(scores, pd.DataFrame):
        raise ValueError(f"scores must be a pandas DataFrame, got {type(scores).__name__}")
    if dice_col not in scores.columns:
        raise ValueError(f"dice_col: no column {dice_col!r} in scores (columns {list(scores.columns)})")
    if methods is None:
        methods = [c for c in scores.columns if c != dice_col and pd.api.types.is_numeric_dtype(scores[c])]
    if isinstance(methods, str):
        raise ValueError(f"methods must be a list of column names, got the string {methods!r}")
    missing = [m for m in methods if m not in scores.columns]
    if missing:
        raise ValueError(f"methods: no column(s) {missing} in scores (columns {list(scores.columns)})")
    if not methods:
        raise ValueError("methods: nothing to compare")
    if calibration_method not in ("auto", "isotonic", "linear"):
        raise ValueError(f'calibration_method must be "auto", "isotonic" or "linear", got {calibration_method!r}')
    if calibrate is None:
        calibrate = {m: True for m in methods}
    unknown = [m for m in calibrate if m not in methods]
    if unknown:
        raise ValueError(f"calibrate: {unknown} are not among methods {list(methods)}")

    dice = pd.to_numeric(scores[dice_col], errors="coerce").to_numpy(float)
    known = np.isfinite(dice)
    if not known.any():
        raise ValueError(f"{dice_col}: no image with a known Dice")
    if ((dice[known] < 0) | (dice[known] > 1)).any():
        raise ValueError(f"{dice_col} values must lie in [0, 1]")
    dice = dice[known]
    risk = 1.0 - dice

    rows = []
    for m in methods:
        s = pd.to_numeric(scores[m], errors="coerce").to_numpy(float)[known]
        if np.isinf(s).any():
            raise ValueError(f"method {m!r} has infinite scores")
        notes = []
        scored = np.isfinite(s)
        if not scored.all():
            notes.append(f"{int((~scored).sum())} image(s) without a score: ranked least confident")
        rho, why = _corr("spearman", s, dice)
        notes += [why] if why else []
        r, why = _corr("pearson", s, dice)
        notes += [why] if why else []
        auroc, why = _failure_auroc(dice, s, float(threshold))
        notes += [why] if why else []
        conf = np.where(np.isnan(s), -np.inf, s)
        area = _aurc(risk, conf)

        cal = calibrate.get(m)
        if cal is None:
            mae = math.nan
            notes.append(f"mae: not on the Dice scale (pass calibrate={{{m!r}: True}})")
        elif cal:
            est, why = _cross_fitted(s[scored], dice[scored], calibration_method, folds, seed)
            mae = float(np.mean(np.abs(est - dice[scored]))) if not why else math.nan
            notes += [why] if why else []
        else:
            if ((s[scored] < 0) | (s[scored] > 1)).any():
                raise ValueError(
                    f"calibrate[{m!r}] is False (already a Dice estimate) but its scores leave [0, 1]"
                )
            mae = float(np.mean(np.abs(s[scored] - dice[scored]))) if scored.any() else math.nan

        rows.append(
            {
                "method": m,
                "spearman": rho,
                "pearson": r,
                "mae": mae,
                "aurc": area,
                "eaurc": area - _aurc(risk, -risk),
                "auroc": auroc,
                "n": int(len(dice)),
                "calibrated": bool(cal),
                "note": "; ".join(notes),
            }
        )
    return pd.DataFrame(rows, columns=COMPARE_COLUMNS)
