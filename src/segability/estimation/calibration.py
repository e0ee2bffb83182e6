"""From a label-free score (mean SA) to an estimated Dice with a conformal interval.

A :class:`Calibration` is fitted once on a labelled calibration set (score and true Dice per
image) and then applied to unlabelled images. The map is an isotonic regression (nondecreasing,
clipped to [0, 1]) or a straight line clipped to [0, 1]; ``"auto"`` picks the one with the lower
cross-validated mean absolute error. The interval is split-conformal: part of the calibration set
is held out from the fit, and the interval radius is the ``ceil((m + 1)(1 - alpha)) / m`` empirical
quantile of the held-out absolute residuals (``m`` held-out images), so that a new exchangeable
image's Dice lies in ``[estimate - radius, estimate + radius]`` with probability at least
``1 - alpha``.

A calibration is only valid for the model and layer set it was made with; it stores a
:func:`fingerprint` of both and :meth:`Calibration.check_fingerprint` refuses any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from sklearn.isotonic import IsotonicRegression

__all__ = ["Calibration", "fingerprint", "state_dict_hash", "conformal_radius", "choose_map", "CALIBRATION_FORMAT"]

CALIBRATION_FORMAT = "segability.calibration/1"

MapMethod = Literal["isotonic", "linear"]
FitMethod = Literal["auto", "isotonic", "linear"]


# ----------------------------------------------------------------------------- fingerprints
def state_dict_hash(model: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a model's state: every entry's name, dtype, shape and values.

    The state dict holds parameters and buffers (e.g. BatchNorm running statistics), all of which
    change the outputs. Values are hashed from CPU copies, so the hash is the same on any device.

    Args:
        model: an ``nn.Module`` or a state dict (name -> tensor).

    Returns:
        64 hexadecimal digits.

    Example:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> state_dict_hash(a) == state_dict_hash(b)
        True
    """
    if isinstance(model, torch.nn.Module):
        state = model.state_dict()
    elif isinstance(model, Mapping):
        state = model
    else:
        raise ValueError(f"model must be an nn.Module or a state dict, got {type(model).__name__}")
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"model: state entry {name!r} is not a tensor ({type(value).__name__})")
        t = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(value.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(model_state_hash: str, layers: Sequence[str]) -> dict[str, Any]:
    """What a calibration is valid for: the model's state hash and the (sorted) layer set.

    Args:
        model_state_hash: e.g. :func:`state_dict_hash` of the model.
        layers: the layers whose mean SA is the score (order does not matter).

    Returns:
        ``{"model": model_state_hash, "layers": sorted unique layer names}``.

    Example:
        >>> fingerprint("ab12", ["up2", "up1", "up1"])
        {'model': 'ab12', 'layers': ['up1', 'up2']}
    """
    if not isinstance(model_state_hash, str) or not model_state_hash:
        raise ValueError(f"model_state_hash must be a non-empty string, got {model_state_hash!r}")
    if isinstance(layers, str):
        raise ValueError(f"layers must be a sequence of layer names, got the string {layers!r}")
    names = sorted({str(n) for n in layers})
    if not names:
        raise ValueError("layers must name at least one layer")
    return {"model": model_state_hash, "layers": names}


# ----------------------------------------------------------------------------- the maps
def _as_1d(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be numeric (a sequence, array, Series or tensor): {err}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    return arr


def _fit_map(x: np.ndarray, y: np.ndarray, method: MapMethod) -> dict[str, Any]:
    """Fit one map on finite (x, y); return its JSON-able parameters."""
    if method == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(x, y)
        return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}
    if method == "linear":
        if np.ptp(x) == 0:
            return {"slope": 0.0, "intercept": float(np.mean(y))}
        slope, intercept = np.polyfit(x, y, 1)
        return {"slope": float(slope), "intercept": float(intercept)}
    raise ValueError(f'method must be "auto", "isotonic" or "linear", got {method!r}')


def _apply_map(method: MapMethod, params: Mapping[str, Any], x: np.ndarray) -> np.ndarray:
    """Estimated Dice in [0, 1]; NaN where ``x`` is NaN."""
    if method == "isotonic":
        # Piecewise-linear between the knots and constant outside: what sklearn's predict does.
        out = np.interp(x, np.asarray(params["x"], float), np.asarray(params["y"], float))
    else:
        out = params["slope"] * x + params["intercept"]
    out = np.clip(out, 0.0, 1.0)
    return np.where(np.isnan(x), np.nan, out)


def _cv_errors(x: np.ndarray, y: np.ndarray, method: MapMethod, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold absolute errors per point (the same folds for every method at one seed)."""
    fold_of = np.random.default_rng(seed).permutation(len(x)) % folds
    errors = np.empty(len(x))
    for f in range(folds):
        test = fold_of == f
        params = _fit_map(x[~test], y[~test], method)
        errors[test] = np.abs(_apply_map(method, params, x[test]) - y[test])
    return errors


def choose_map(
    x: np.ndarray, y: np.ndarray, method: FitMethod, *, folds: int = 5, seed: int = 0
) -> tuple[MapMethod, str, dict[str, float]]:
    """Resolve ``"auto"`` by cross-validated MAE; returns (method, why, {method: cv MAE}).

    Isotonic is chosen only when its cross-validated MAE beats the line's by more than one standard
    error of the paired per-image difference (the one-standard-error rule); the line otherwise.
    """
    if method in ("isotonic", "linear"):
        return method, f"{method}: requested", {}
    if method != "auto":
        raise ValueError(f'method must be "auto", "isotonic" or "linear", got {method!r}')
    n_folds = min(int(folds), len(x) // 2)
    if n_folds < 2:
        return "linear", f"linear: too few points ({len(x)}) to cross-validate, the simpler map", {}
    errors = {m: _cv_errors(x, y, m, n_folds, seed) for m in ("linear", "isotonic")}
    mae = {m: float(e.mean()) for m, e in errors.items()}
    # One-standard-error rule: the isotonic map (many knots) must beat the straight line by more
    # than the standard error of the paired per-image difference; otherwise the simpler line wins.
    gain = errors["linear"] - errors["isotonic"]
    se = float(gain.std(ddof=1) / math.sqrt(len(gain)))
    if float(gain.mean()) > se:
        why = (
            f"isotonic: {n_folds}-fold cross-validated MAE {mae['isotonic']:.4f} vs {mae['linear']:.4f} "
            f"for linear, better by more than one standard error ({se:.4f}; n={len(x)})"
        )
        best: MapMethod = "isotonic"
    else:
        why = (
            f"linear: {n_folds}-fold cross-validated MAE {mae['linear']:.4f} vs {mae['isotonic']:.4f} "
            f"for isotonic, which is not better by more than one standard error ({se:.4f}; n={len(x)})"
        )
        best = "linear"
    return best, why, mae


def conformal_radius(residuals: np.ndarray, alpha: float) -> float:
    """Split-conformal radius: the ``ceil((m + 1)(1 - alpha))``-th smallest of ``m`` residuals.

    Infinite when that rank exceeds ``m`` (too few held-out residuals for this ``alpha``).

    Example:
        >>> conformal_radius(np.arange(1.0, 20.0), 0.1)  # m = 19: rank ceil(20 * 0.9) = 18
        18.0
    """
    m = len(residuals)
    rank = math.ceil((m + 1) * (1.0 - alpha) - 1e-12)
    if m == 0 or rank > m:
        return math.inf
    return float(np.sort(residuals)[rank - 1])


# ----------------------------------------------------------------------------- calibration
@dataclass
class Calibration:
    """A fitted map from a score to an estimated Dice, with a split-conformal interval.

    Build it with :meth:`fit`; apply it with :meth:`predict`; keep it with :meth:`save` /
    :meth:`load`. Scores must be oriented so that higher means better expected quality.

    Attributes:
        method: ``"isotonic"`` or ``"linear"``.
        parameters: isotonic knots ``{"x": [...], "y": [...]}`` or ``{"slope", "intercept"}``.
        radius: conformal half-width of the interval (``inf`` if the held-out part was too small).
        alpha: miscoverage level; intervals cover the Dice with probability >= ``1 - alpha``.
        layers: layers whose mean SA is the score.
        fingerprint: what the calibration is valid for (see :func:`fingerprint`).
        n: calibration images used (finite score and Dice).
        n_fit: images the map was fitted on; ``n - n_fit`` gave the conformal residuals.
        input_sa_threshold: default input-SA threshold of the quality gate (a quantile of the
            calibration set's input SA), or None when no input SA was given.
        input_sa_quantile: the quantile level behind ``input_sa_threshold``.
        choice: which map and why (the cross-validated MAEs for ``"auto"``).
        cv_mae: cross-validated MAE per candidate map (empty unless ``"auto"``).
        score_range: (min, max) of the calibration scores; outside, the estimate is extrapolated
            (linear) or constant (isotonic).
        version: segability version that made it.
        combination: when not empty, the score is ``sum_c w_c * table[c]`` over these columns
            (e.g. ``{"mean_sa_pred": w1, "input_sa_pred": w2}``, fitted on the calibration set)
            instead of ``mean_sa_pred`` alone.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> s = rng.uniform(0.3, 0.9, 200)
        >>> d = np.clip(s + rng.normal(0, 0.03, 200), 0, 1)
        >>> cal = Calibration.fit(s, d, method="linear", fingerprint=fingerprint("h", ["up1"]),
        ...                       layers=["up1"])
        >>> out = cal.predict([0.5])
        >>> bool(abs(out.estimated_dice[0] - 0.5) < 0.02), bool(out.lower[0] < 0.5 < out.upper[0])
        (True, True)
    """

    method: MapMethod
    parameters: dict[str, Any]
    radius: float
    alpha: float
    layers: list[str]
    fingerprint: dict[str, Any]
    n: int
    n_fit: int = 0
    input_sa_threshold: float | None = None
    input_sa_quantile: float | None = None
    choice: str = ""
    cv_mae: dict[str, float] = field(default_factory=dict)
    score_range: tuple[float, float] = (math.nan, math.nan)
    version: str = ""
    combination: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        score: Any,
        dice: Any,
        *,
        method: FitMethod = "auto",
        alpha: float = 0.1,
        fingerprint: dict[str, Any],
        layers: Sequence[str],
        seed: int = 0,
        holdout: float = 0.5,
        folds: int = 5,
        input_sa: Any = None,
        input_sa_quantile: float = 0.1,
    ) -> Calibration:
        """Fit the map and its conformal radius on a labelled calibration set.

        The images (those with a finite score and Dice) are split at random: a ``holdout``
        fraction gives the conformal residuals, the rest fits the map (and, for ``"auto"``, the
        cross-validation that picks it). The residual part never touches the fit, which is what
        makes the interval valid.

        Args:
            score: label-free score per image (e.g. mean ``sa_pred``), higher = better.
            dice: true Dice per image, same length, in [0, 1].
            method: ``"auto"`` (lower cross-validated MAE), ``"isotonic"`` or ``"linear"``.
            alpha: miscoverage level in (0, 1).
            fingerprint: see :func:`fingerprint`; its ``"layers"`` must match ``layers``.
            layers: the layers whose mean SA is the score.
            seed: seed of the random split and folds.
            holdout: fraction of images held out for the conformal residuals, in (0, 1).
            folds: cross-validation folds for ``"auto"``.
            input_sa: input SA per calibration image (label-free ``input_sa_pred`` for a gate that
                runs without labels); its ``input_sa_quantile`` quantile becomes the gate's
                default input-SA threshold.
            input_sa_quantile: quantile level in (0, 1).

        Returns:
            The fitted :class:`Calibration`.

        Raises:
            ValueError: mismatched lengths, Dice outside [0, 1], fewer than 4 usable images, bad
                ``alpha`` / ``holdout`` / ``method``, or a fingerprint that disagrees with ``layers``.
        """
        x, y = _as_1d(score, "score"), _as_1d(dice, "dice")
        if len(x) != len(y):
            raise ValueError(f"score and dice must have the same length, got {len(x)} and {len(y)}")
        if np.isinf(x).any():
            raise ValueError("score contains infinite values")
        if ((y < 0) | (y > 1)).any():
            raise ValueError(f"dice values must lie in [0, 1], got min {np.nanmin(y):g} and max {np.nanmax(y):g}")
        if not 0.0 < float(alpha) < 1.0:
            raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
        if not 0.0 < float(holdout) < 1.0:
            raise ValueError(f"holdout must lie in (0, 1), got {holdout!r}")
        if method not in ("auto", "isotonic", "linear"):
            raise ValueError(f'method must be "auto", "isotonic" or "linear", got {method!r}')
        layers = _layer_list(layers)
        fp = _check_fingerprint_dict(fingerprint)
        if "layers" in fp and sorted(map(str, fp["layers"])) != sorted(set(layers)):
            raise ValueError(
                f"fingerprint: its layers {fp['layers']} differ from layers {layers}; build it with "
                "fingerprint(model_hash, layers)"
            )
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = x[ok], y[ok]
        n = len(x)
        if n < 4:
            raise ValueError(f"score/dice: need at least 4 images with a finite score and Dice, got {n}")

        order = np.random.default_rng(seed).permutation(n)
        n_conf = min(n - 2, max(2, int(round(holdout * n))))
        conf_idx, fit_idx = order[:n_conf], order[n_conf:]
        chosen, why, mae = choose_map(x[fit_idx], y[fit_idx], method, folds=folds, seed=seed)
        params = _fit_map(x[fit_idx], y[fit_idx], chosen)
        residuals = np.abs(y[conf_idx] - _apply_map(chosen, params, x[conf_idx]))
        radius = conformal_radius(residuals, float(alpha))
        if math.isinf(radius):
            warnings.warn(
                f"only {n_conf} held-out images: too few for alpha={alpha}; the interval is [0, 1]",
                UserWarning,
                stacklevel=2,
            )

        threshold = None
        quantile = None
        if input_sa is not None:
            q = float(input_sa_quantile)
            if not 0.0 < q < 1.0:
                raise ValueError(f"input_sa_quantile must lie in (0, 1), got {input_sa_quantile!r}")
            values = _as_1d(input_sa, "input_sa")
            values = values[np.isfinite(values)]
            if len(values) == 0:
                raise ValueError("input_sa has no finite value")
            threshold, quantile = float(np.quantile(values, q)), q

        return cls(
            method=chosen,
            parameters=params,
            radius=radius,
            alpha=float(alpha),
            layers=layers,
            fingerprint=fp,
            n=n,
            n_fit=len(fit_idx),
            input_sa_threshold=threshold,
            input_sa_quantile=quantile,
            choice=why,
            cv_mae=mae,
            score_range=(float(x.min()), float(x.max())),
            version=_package_version(),
        )

    # ------------------------------------------------------------------ use
    def predict(self, score: Any) -> pd.DataFrame:
        """Estimated Dice and its conformal interval, clipped to [0, 1].

        Args:
            score: one score or many (sequence, array, Series, tensor); NaN gives NaN rows.

        Returns:
            DataFrame with ``estimated_dice``, ``lower``, ``upper`` (index of ``score`` if a Series).

        Example:
            >>> cal = Calibration("linear", {"slope": 1.0, "intercept": 0.0}, 0.1, 0.1, ["l"],
            ...                   {"model": "h", "layers": ["l"]}, 100)
            >>> cal.predict([0.5, 0.95]).round(2).to_dict("list")
            {'estimated_dice': [0.5, 0.95], 'lower': [0.4, 0.85], 'upper': [0.6, 1.0]}
        """
        x = _as_1d(score, "score")
        est = _apply_map(self.method, self.parameters, x)
        lower = np.where(np.isnan(est), np.nan, np.clip(est - self.radius, 0.0, 1.0))
        upper = np.where(np.isnan(est), np.nan, np.clip(est + self.radius, 0.0, 1.0))
        index = score.index if isinstance(score, pd.Series) else None
        return pd.DataFrame({"estimated_dice": est, "lower": lower, "upper": upper}, index=index)

    def check_fingerprint(self, fingerprint: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``fingerprint`` is the one this calibration was made for.

        Example:
            >>> cal = Calibration("linear", {"slope": 1.0, "intercept": 0.0}, 0.1, 0.1, ["l"],
            ...                   {"model": "h", "layers": ["l"]}, 100)
            >>> cal.check_fingerprint({"model": "h", "layers": ["l"]})  # no error
        """
        given = _check_fingerprint_dict(fingerprint)
        mine = self.fingerprint
        problems = []
        for key in sorted(set(mine) | set(given)):
            a, b = mine.get(key), given.get(key)
            if key == "layers" and a is not None and b is not None:
                a_set, b_set = set(map(str, a)), set(map(str, b))
                if a_set != b_set:
                    problems.append(
                        f"layers differ (only in the calibration: {sorted(a_set - b_set)}; "
                        f"only in the given set: {sorted(b_set - a_set)})"
                    )
            elif a != b:
                problems.append(f"{key} differs (calibrated for {_short(a)}, got {_short(b)})")
        if problems:
            raise ValueError(
                "fingerprint: this calibration was made for another model or layer set: "
                + "; ".join(problems)
                + ". Fit a new calibration for this model and layer set."
            )

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        """JSON-able content (an infinite radius becomes ``None``)."""
        out = dataclasses.asdict(self)
        out["radius"] = None if math.isinf(self.radius) else float(self.radius)
        out["score_range"] = list(self.score_range)
        return {"format": CALIBRATION_FORMAT, **out}

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a small JSON file (method, knots or coefficients, radius, alpha, layers, ...)."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, allow_nan=True)
            fh.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        """Read a file written by :meth:`save`.

        Raises:
            ValueError: not a segability calibration file, or a required entry is missing.
        """
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"path: {os.fspath(path)!r} is not JSON: {err}") from None
        return cls.from_dict(data, os.fspath(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "") -> Calibration:
        """Read what :meth:`to_dict` gave (``source`` names where it came from, in errors).

        Raises:
            ValueError: not a segability calibration, or a required entry is missing.
        """
        if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"path: {source!r} is not a {CALIBRATION_FORMAT} file")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                    and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"path: {source!r} lacks the entries {missing}")
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["radius"] = math.inf if kwargs["radius"] is None else float(kwargs["radius"])
        if "score_range" in kwargs:
            kwargs["score_range"] = tuple(float(v) for v in kwargs["score_range"])
        if kwargs["method"] not in ("isotonic", "linear"):
            raise ValueError(f"path: unknown calibration method {kwargs['method']!r}")
        return cls(**kwargs)


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) > 16:
        return repr(value[:12] + "...")
    return repr(value)


def _layer_list(layers: Sequence[str]) -> list[str]:
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(f"layers must be a list of layer names, got {layers!r}")
    names = [str(n) for n in layers]
    if not names:
        raise ValueError("layers must name at least one layer")
    return names


def _check_fingerprint_dict(fp: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(fp, Mapping) or not fp:
        raise ValueError(f"fingerprint must be a non-empty dict (see segability.fingerprint), got {fp!r}")
    out = dict(fp)
    try:
        json.dumps(out)
    except (TypeError, ValueError) as err:
        raise ValueError(f"fingerprint must be JSON-serialisable: {err}") from None
    return out


def _package_version() -> str:
    import segability  # the package is fully imported by the time a calibration is fitted

    return str(getattr(segability, "__version__", "unknown"))
