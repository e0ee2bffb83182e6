"""The quality gate: flag images whose estimated output quality is low, and say why.

Each image gets an estimated Dice (from its mean ``sa_pred`` through a :class:`Calibration`) and a
conformal interval. An image is flagged when the estimate (or the interval's lower end, with
``use_lower``) is below ``threshold``. The reason separates two causes using the SA of the raw
image (the ``"input"`` layer):

- low input SA: the target is hardly separable by intensity in the raw image itself, so the image
  is of poor quality or a genuinely hard case;
- normal input SA with low feature SA: the image looks ordinary, yet the network's features do not
  separate its prediction, so the model fails on it.

An image whose prediction is empty has an undefined SA (NaN); it is flagged, never scored.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd

from segability.estimation.calibration import Calibration
from segability.estimation.selection import _require_columns, mean_sa

__all__ = [
    "quality_gate",
    "REASON_EMPTY",
    "REASON_LOW_INPUT_SA",
    "REASON_MODEL_FAILS",
    "REASON_NO_INPUT_SA",
    "GATE_COLUMNS",
]

REASON_EMPTY = "empty prediction: SA undefined"
REASON_LOW_INPUT_SA = "low input SA: target hardly separable in the raw image (image quality or a hard case)"
REASON_MODEL_FAILS = "low feature SA with normal input SA: the model fails on this image"
REASON_NO_INPUT_SA = "low feature SA; input SA undefined, cause unknown"

GATE_COLUMNS = [
    "image",
    "mean_sa_pred",
    "input_sa",
    "input_sa_source",
    "estimated_dice",
    "lower",
    "upper",
    "flag",
    "reason",
]

InputColumn = Literal["auto", "input_sa", "input_sa_pred"]


def quality_gate(
    images: pd.DataFrame,
    calibration: Calibration,
    *,
    threshold: float = 0.75,
    use_lower: bool = False,
    input_sa_threshold: float | None = None,
    layers: pd.DataFrame | None = None,
    input_column: InputColumn = "auto",
) -> pd.DataFrame:
    """Estimated Dice, interval, flag and reason for every image.

    Args:
        images: the ``images`` table of an analysis run (``image``, ``mean_sa_pred``,
            ``input_sa_pred``, and ``input_sa`` / ``reason`` when present).
        calibration: a fitted :class:`Calibration` (check its fingerprint against the model first).
        threshold: flag images whose estimated Dice is below this, in [0, 1].
        use_lower: compare the interval's lower end instead of the estimate (a stricter gate:
            flags every image that could be below ``threshold`` at level ``1 - alpha``).
        input_sa_threshold: input SA below this means "hardly separable in the raw image";
            defaults to the calibration's stored quantile of its input SA.
        layers: the ``layers`` table of the same run. When given, the score is recomputed as the
            mean ``sa_pred`` over ``calibration.layers``; otherwise ``images["mean_sa_pred"]`` is
            used, which is right only when the calibration used every analysed layer.
        input_column: ``"auto"`` takes ``input_sa`` (against the label) where it is known and the
            label-free ``input_sa_pred`` elsewhere; or force one of the two columns.

    Returns:
        DataFrame with the columns ``image``, ``mean_sa_pred``, ``input_sa``, ``input_sa_source``
        (``"label"``, ``"prediction"`` or ``""``), ``estimated_dice``, ``lower``, ``upper``,
        ``flag`` (bool) and ``reason`` (empty when not flagged), one row per image, in table order.

    Raises:
        ValueError: missing columns, a threshold outside [0, 1], no input-SA threshold at all, or
            (with ``layers``) a calibration layer the run did not analyse.

    Example:
        >>> import pandas as pd
        >>> cal = Calibration("linear", {"slope": 1.0, "intercept": 0.0}, 0.05, 0.1, ["l"],
        ...                   {"model": "h", "layers": ["l"]}, 100, input_sa_threshold=0.5)
        >>> images = pd.DataFrame({"image": ["a", "b", "c"], "mean_sa_pred": [0.9, 0.4, 0.4],
        ...                        "input_sa_pred": [0.8, 0.2, 0.8]})
        >>> gate = quality_gate(images, cal)
        >>> gate.flag.tolist()
        [False, True, True]
        >>> gate.reason[1].startswith("low input SA"), gate.reason[2].startswith("low feature SA")
        (True, True)
    """
    if not isinstance(calibration, Calibration):
        raise ValueError(f"calibration must be a Calibration, got {type(calibration).__name__}")
    _require_columns(images, ["image"], "images")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1], got {threshold!r}")
    if input_column not in ("auto", "input_sa", "input_sa_pred"):
        raise ValueError(f'input_column must be "auto", "input_sa" or "input_sa_pred", got {input_column!r}')
    input_threshold = calibration.input_sa_threshold if input_sa_threshold is None else input_sa_threshold
    if input_threshold is None or not math.isfinite(float(input_threshold)):
        raise ValueError(
            "input_sa_threshold: not given and the calibration stores none; pass input_sa_threshold or "
            "fit the calibration with input_sa=..."
        )
    input_threshold = float(input_threshold)

    ids = images["image"].astype(str).reset_index(drop=True)
    if layers is not None:
        score = mean_sa(layers, calibration.layers, column="sa_pred").reindex(ids).to_numpy(float)
    else:
        _require_columns(images, ["mean_sa_pred"], "images")
        score = pd.to_numeric(images["mean_sa_pred"], errors="coerce").to_numpy(float)

    input_sa, source = _input_sa(images, input_column)
    raw = score
    if calibration.combination:
        score = np.zeros(len(ids))
        for column, weight in calibration.combination.items():
            values = raw if column == "mean_sa_pred" else pd.to_numeric(images[column], errors="coerce").to_numpy(float)
            score = score + float(weight) * values
    est = calibration.predict(score)
    quality = (est["lower"] if use_lower else est["estimated_dice"]).to_numpy(float)
    prior = images["reason"].fillna("").astype(str).to_numpy() if "reason" in images.columns else None

    flags, reasons = [], []
    for i in range(len(ids)):
        if not np.isfinite(score[i]):
            note = prior[i].strip() if prior is not None else ""
            flags.append(True)
            same = not note or note == REASON_EMPTY or note.startswith("empty prediction")
            reasons.append(REASON_EMPTY if same else f"{REASON_EMPTY} ({note})")
        elif quality[i] < threshold:
            flags.append(True)
            if not np.isfinite(input_sa[i]):
                reasons.append(REASON_NO_INPUT_SA)
            elif input_sa[i] < input_threshold:
                reasons.append(REASON_LOW_INPUT_SA)
            else:
                reasons.append(REASON_MODEL_FAILS)
        else:
            flags.append(False)
            reasons.append("")

    return pd.DataFrame(
        {
            "image": ids,
            "mean_sa_pred": raw,
            "input_sa": input_sa,
            "input_sa_source": source,
            "estimated_dice": est["estimated_dice"].to_numpy(float),
            "lower": est["lower"].to_numpy(float),
            "upper": est["upper"].to_numpy(float),
            "flag": np.asarray(flags, dtype=bool),
            "reason": reasons,
        },
        columns=GATE_COLUMNS,
    )


def _input_sa(images: pd.DataFrame, input_column: InputColumn) -> tuple[np.ndarray, list[str]]:
    n = len(images)
    nan = np.full(n, np.nan)

    def col(name: str) -> np.ndarray:
        if name not in images.columns:
            return nan
        return pd.to_numeric(images[name], errors="coerce").to_numpy(float)

    if input_column == "input_sa":
        _require_columns(images, ["input_sa"], "images")
        values = col("input_sa")
        return values, ["label" if np.isfinite(v) else "" for v in values]
    if input_column == "input_sa_pred":
        _require_columns(images, ["input_sa_pred"], "images")
        values = col("input_sa_pred")
        return values, ["prediction" if np.isfinite(v) else "" for v in values]
    if "input_sa" not in images.columns and "input_sa_pred" not in images.columns:
        raise ValueError(f"images must have an input_sa_pred (or input_sa) column; it has {list(images.columns)}")
    with_label, label_free = col("input_sa"), col("input_sa_pred")
    known = np.isfinite(with_label)
    values = np.where(known, with_label, label_free)
    source = ["label" if k else ("prediction" if np.isfinite(v) else "") for k, v in zip(known, values, strict=True)]
    return values, source
