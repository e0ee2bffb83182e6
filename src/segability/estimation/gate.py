"""The quality gate: flag images whose estimated output quality is low, and say why.

Each image gets an estimated Dice (from its mean ``sa_pred`` through a :class:`Calibration`) and a
conformal interval. An image is flagged when the estimate (or the interval's lower end, with
``use_lower``) is below ``threshold``. The reason separates two causes using the SA of the raw
image (the ``"input"`` layer):

- low input SA: the target is hardly separable by intensity in the raw image itself, so the image
  is of poor quality or a genuinely hard case;
- normal input SA with low feature SA: the image looks ordinary, yet the network's features do not
  separate its prediction, so the model fails on it.

An image whose prediction is empty has an undefined SA (NaN); it is flagged, never scored. The
verdict is a :class:`GateStatus` (``qc.csv``'s ``status`` column); the ``reason`` is rendered from
it, and the gate reads the analysis' own ``status`` column, never its prose.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Literal

import numpy as np
import pandas as pd

from segability.analysis.results import QC
from segability.core.reduction import Status
from segability.estimation.calibration import Calibration
from segability.estimation.selection import _require_columns, mean_sa

__all__ = [
    "GateStatus",
    "quality_gate",
    "failed_rows",
    "REASON_EMPTY",
    "REASON_LOW_INPUT_SA",
    "REASON_MODEL_FAILS",
    "REASON_NO_INPUT_SA",
    "GATE_COLUMNS",
]


class GateStatus(str, Enum):
    """The gate's verdict on one image, written to ``qc.csv`` as its string value.

    Every status but ``ok`` flags the image; ``reason`` is the verdict in words (rendered from the
    status, never parsed back).
    """

    OK = "ok"
    LOW_INPUT_SA = "low_input_sa"
    MODEL_FAILS = "model_fails"
    NO_INPUT_SA = "no_input_sa"
    EMPTY_PREDICTION = "empty_prediction"
    SA_UNDEFINED = "sa_undefined"
    FAILED = "failed"

    @property
    def reason(self) -> str:
        """The status in words ("" for ``ok``)."""
        return _REASONS[self]

    def render(self, detail: str = "") -> str:
        """The reason, with ``detail`` (e.g. an error message) in parentheses when there is one.

        Example:
            >>> GateStatus.FAILED.render("OSError: truncated file")
            'not analysed: the image could not be read or the model failed on it (OSError: truncated file)'
        """
        detail = detail.strip()
        return f"{self.reason} ({detail})" if detail and detail != self.reason else self.reason


_REASONS = {
    GateStatus.OK: "",
    GateStatus.LOW_INPUT_SA: "low input SA: target hardly separable in the raw image (image quality or a hard case)",
    GateStatus.MODEL_FAILS: "low feature SA with normal input SA: the model fails on this image",
    GateStatus.NO_INPUT_SA: "low feature SA; input SA undefined, cause unknown",
    GateStatus.EMPTY_PREDICTION: "empty prediction: SA undefined",
    GateStatus.SA_UNDEFINED: "SA undefined in every layer of the calibration: not scored",
    GateStatus.FAILED: "not analysed: the image could not be read or the model failed on it",
}

REASON_EMPTY = GateStatus.EMPTY_PREDICTION.reason
REASON_LOW_INPUT_SA = GateStatus.LOW_INPUT_SA.reason
REASON_MODEL_FAILS = GateStatus.MODEL_FAILS.reason
REASON_NO_INPUT_SA = GateStatus.NO_INPUT_SA.reason

# qc.csv: the QC schema's columns, then the scores the gate used, each named by what it holds.
SCORE_COLUMNS = ["mean_sa_pred", "input_sa_pred", "input_sa", "input_sa_source"]
GATE_COLUMNS = [*QC.base_names, *SCORE_COLUMNS]

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
    """Estimated Dice, interval, flag, status and reason for every image.

    The status decides (:class:`GateStatus`), in this order: an image whose analysis ``status`` is
    ``failed`` or ``empty_prediction`` gets that status; an image without a defined score gets
    ``sa_undefined``; an image whose estimate is below ``threshold`` gets ``low_input_sa``,
    ``model_fails`` or ``no_input_sa`` from its input SA; every other image is ``ok``. Every status
    but ``ok`` flags the image.

    Args:
        images: the ``images`` table of an analysis run (``image``, ``mean_sa_pred``,
            ``input_sa_pred``, and ``input_sa`` / ``status`` / ``reason`` when present; without a
            ``status`` column every image counts as analysed).
        calibration: a fitted :class:`Calibration` (check its fingerprint against the model first).
        threshold: flag images whose estimated Dice is below this, in [0, 1].
        use_lower: compare the interval's lower end instead of the estimate (a stricter gate:
            flags every image that could be below ``threshold`` at level ``1 - alpha``).
        input_sa_threshold: input SA below this means "hardly separable in the raw image";
            defaults to the calibration's stored quantile of its input SA.
        layers: the ``layers`` table of the same run. When given, the score is recomputed as the
            mean ``sa_pred`` over ``calibration.layers``; otherwise ``images["mean_sa_pred"]`` is
            used, which is right only when the calibration used every analysed layer.
        input_column: which input SA the reason compares with the threshold: ``"auto"`` takes
            ``input_sa`` (against the label) where it is known and the label-free
            ``input_sa_pred`` elsewhere; or force one of the two columns.

    Returns:
        DataFrame with :data:`GATE_COLUMNS`, one row per image, in table order: the columns of
        :data:`segability.analysis.results.QC` (``image``, ``estimated_dice``, ``lower``,
        ``upper``, ``flag``, ``status``, ``reason``), then ``mean_sa_pred`` (over the
        calibration's layers), ``input_sa_pred``, ``input_sa`` (NaN without labels) and
        ``input_sa_source`` (``"label"``, ``"prediction"`` or ``""``: which input SA the reason used).

    Raises:
        ValueError: missing columns, a threshold outside [0, 1], no input-SA threshold at all, or
            (with ``layers``) a calibration layer the run did not analyse.

    Example:
        >>> import pandas as pd
        >>> cal = Calibration("linear", {"slope": 1.0, "intercept": 0.0}, 0.05, 0.1, ["l"],
        ...                   {"model": "h", "layers": ["l"]}, 100, input_sa_threshold=0.5)
        >>> images = pd.DataFrame({"image": ["a", "b", "c", "d"], "mean_sa_pred": [0.9, 0.4, 0.4, None],
        ...                        "input_sa_pred": [0.8, 0.2, 0.8, None],
        ...                        "status": ["ok", "ok", "ok", "empty_prediction"]})
        >>> gate = quality_gate(images, cal)
        >>> gate.flag.tolist()
        [False, True, True, True]
        >>> gate.status.tolist()
        ['ok', 'low_input_sa', 'model_fails', 'empty_prediction']
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
    analysed = _text(images, "status", default=Status.OK.value)
    notes = _text(images, "reason")

    statuses, reasons = [], []
    for i in range(len(ids)):
        detail = ""
        if analysed[i] == Status.FAILED.value:
            status, detail = GateStatus.FAILED, notes[i]
        elif analysed[i] == Status.EMPTY_PREDICTION.value:
            status = GateStatus.EMPTY_PREDICTION  # the analysis' reason says the same
        elif not np.isfinite(score[i]):
            status, detail = GateStatus.SA_UNDEFINED, notes[i]
        elif quality[i] >= threshold:
            status = GateStatus.OK
        elif not np.isfinite(input_sa[i]):
            status = GateStatus.NO_INPUT_SA
        elif input_sa[i] < input_threshold:
            status = GateStatus.LOW_INPUT_SA
        else:
            status = GateStatus.MODEL_FAILS
        statuses.append(status.value)
        reasons.append(status.render(detail))

    return pd.DataFrame(
        {
            "image": ids,
            "estimated_dice": est["estimated_dice"].to_numpy(float),
            "lower": est["lower"].to_numpy(float),
            "upper": est["upper"].to_numpy(float),
            "flag": np.asarray([s != GateStatus.OK.value for s in statuses], dtype=bool),
            "status": pd.Series(statuses, dtype=object),
            "reason": pd.Series(reasons, dtype=object),
            "mean_sa_pred": raw,
            "input_sa_pred": _numbers(images, "input_sa_pred"),
            "input_sa": _numbers(images, "input_sa"),
            "input_sa_source": pd.Series(source, dtype=object),
        },
        columns=GATE_COLUMNS,
    )


def failed_rows(images: Sequence[str], details: Sequence[str]) -> pd.DataFrame:
    """Gate rows (:data:`GATE_COLUMNS`) for images that have no analysis at all (a file that could
    not be read, a model that raised): flagged, status ``failed``, the error as detail.

    Example:
        >>> failed_rows(["scan.nii.gz"], ["OSError: truncated"])[["image", "flag", "status"]].values.tolist()
        [['scan.nii.gz', True, 'failed']]
    """
    n = len(images)
    if len(details) != n:
        raise ValueError(f"details must give one text per image, got {len(details)} for {n} images")
    nan = np.full(n, np.nan)
    return pd.DataFrame(
        {
            "image": pd.Series([str(i) for i in images], dtype=object),
            "estimated_dice": nan, "lower": nan, "upper": nan,
            "flag": np.ones(n, dtype=bool),
            "status": pd.Series([GateStatus.FAILED.value] * n, dtype=object),
            "reason": pd.Series([GateStatus.FAILED.render(str(d)) for d in details], dtype=object),
            "mean_sa_pred": nan, "input_sa_pred": nan, "input_sa": nan,
            "input_sa_source": pd.Series([""] * n, dtype=object),
        },
        columns=GATE_COLUMNS,
    )  # fmt: skip


def _text(images: pd.DataFrame, column: str, default: str = "") -> list[str]:
    if column not in images.columns:
        return [default] * len(images)
    return [default if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in images[column]]


def _numbers(images: pd.DataFrame, column: str) -> np.ndarray:
    if column not in images.columns:
        return np.full(len(images), np.nan)
    return pd.to_numeric(images[column], errors="coerce").to_numpy(float)


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
