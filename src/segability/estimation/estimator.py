"""A label-free Dice estimator on the SA profile, with intervals, an out-of-range check and a gate.

Fitted on labelled calibration images **and synthetic shifts of those same images**
(:func:`segability.datasets.shifted_suite`), so that it has seen failing outputs; applied to the
SA profile (:func:`segability.estimation.profile.sa_profile`) of new images.

- **Model**: candidates are ridge regressions (``RidgeCV`` on standardised features, on several
  feature sets) and gradient-boosted trees (``HistGradientBoostingRegressor``), chosen by grouped
  cross-validation (``GroupKFold``: every version of a source image in one fold; or, with
  ``select_groups``, e.g. one shift family per fold, so that the choice rewards what carries over to
  a shift the calibration did not contain) on the MAE.
- **Interval**: cross-conformal with the same grouped folds: the out-of-fold absolute residuals
  give the radius (:func:`segability.estimation.calibration.conformal_radius`).
- **Out of range**: the Mahalanobis distance of the standardised features (Ledoit-Wolf
  covariance) beyond the 99th percentile of the calibration's own out-of-fold distances. Such an
  image gets no confident estimate: status ``shift``, interval [0, 1], its estimate not clipped.
- **Gate** (:meth:`QualityEstimator.gate`): the ``review_fraction`` least trusted images (out of
  range first, then the lowest lower bound), or every image whose estimate is below a threshold.
  Every flag carries a :class:`FlagStatus` from the evidence and its reason in words.

The fitted estimator is JSON (feature names, standardiser, ridge coefficients, conformal radius,
out-of-range statistics, the model fingerprint and the package version); a tree model is stored
beside it with ``joblib`` (a pickle: load it only from a file you made yourself; :meth:`load`
asks for ``trust_trees=True``). It refuses to apply to another model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from segability.errors import UsageError
from segability.estimation.calibration import conformal_radius

__all__ = ["FlagStatus", "QualityEstimator", "grouped_folds", "feature_sets", "FORMAT"]

FORMAT = "segability-quality-estimator/1"
ModelKind = Literal["ridge", "trees"]
_ALPHAS = tuple(np.logspace(-2, 3, 11))


class FlagStatus(str, Enum):
    """Why an image is (not) sent for review; written as its string value."""

    OK = "ok"
    IMAGE_QUALITY = "image_quality"
    MODEL = "model"
    SHIFT = "shift"

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    FlagStatus.OK: "",
    FlagStatus.IMAGE_QUALITY: "the input is not separable: the target's prototypes from the image intensities segment it poorly",
    FlagStatus.MODEL: "the features disagree with the output: its prototypes segment the features and the references poorly",
    FlagStatus.SHIFT: "the SA profile lies outside what calibration saw: no confident estimate",
}


def grouped_folds(groups: Sequence[Any], n_folds: int = 5) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs of ``GroupKFold``: all rows of one group in one test fold.

    Example:
        >>> folds = grouped_folds(["a", "a", "b", "c", "c", "d"], 2)
        >>> all(set(np.array(list("aabccd"))[te]).isdisjoint(np.array(list("aabccd"))[tr]) for tr, te in folds)
        True
    """
    from sklearn.model_selection import GroupKFold

    groups = np.asarray([str(g) for g in groups])
    k = min(n_folds, len(np.unique(groups)))
    if k < 2:
        raise UsageError("groups: grouped cross-validation needs at least two groups", argument="groups")
    return [(tr, te) for tr, te in GroupKFold(n_splits=k).split(np.zeros(len(groups)), groups=groups)]


def feature_sets(names: Sequence[str]) -> dict[str, list[str]]:
    """Candidate feature sets of a profile's columns (the ridge model is fitted on each)."""
    names = list(names)
    common = [n for n in names if n in ("pred_fraction", "pred_body_fraction", "empty_prediction") or n.startswith("unit_")]

    def kind(*prefixes: str) -> list[str]:
        return [n for n in names if any(n == p or n.startswith(p + ":") for p in prefixes)]

    summary = [n for n in names if n.startswith("mean:")]
    sets = {
        "summary": summary + kind("input_sa_pred", "input_sa_pred_body", "input_reverse", "input_reverse_body") + common,
        "sa_pred": kind("sa_pred", "input_sa_pred") + common,
        "sa_pred+body": kind("sa_pred", "sa_pred_body", "input_sa_pred", "input_sa_pred_body") + common,
        "reverse": kind("reverse", "reverse_body", "input_reverse", "input_reverse_body") + common,
        "all": names,
    }
    return {k: v for k, v in sets.items() if v}


@dataclass
class QualityEstimator:
    """A fitted label-free Dice estimator (build it with :meth:`fit`).

    Attributes:
        features: the profile columns it reads, in order.
        kind: ``"ridge"`` or ``"trees"``.
        center, scale, fill: per-feature standardiser and the value that replaces a missing one
            (the calibration median).
        coef, intercept, ridge_alpha: the ridge model on standardised features (kind ``ridge``).
        radius: conformal half-width at miscoverage ``alpha``.
        post_map: knots ``[x, y]`` of an isotonic map from the model's raw estimate to Dice, fitted
            on its out-of-fold estimates (``post_calibration="isotonic"``); empty for none.
        ood_location, ood_precision, ood_threshold: Mahalanobis statistics of the calibration
            profiles and the distance beyond which an image is out of range.
        evidence: feature groups for the flag reason (``input`` and ``model`` columns) with their
            calibration means and standard deviations.
        model_hash, version: the model the estimator belongs to and the package version.
        cv: grouped-CV MAE and Spearman of every candidate.
        n, n_groups: calibration rows and source images.
    """

    features: list[str]
    kind: ModelKind
    center: list[float]
    scale: list[float]
    fill: list[float]
    coef: list[float]
    intercept: float
    ridge_alpha: float
    radius: float
    alpha: float
    ood_location: list[float]
    ood_precision: list[list[float]]
    ood_threshold: float
    evidence: dict[str, Any]
    model_hash: str
    version: str
    choice: str = ""
    cv: dict[str, dict[str, float]] = field(default_factory=dict)
    n: int = 0
    n_groups: int = 0
    post_map: list[list[float]] = field(default_factory=list)  # isotonic knots [x, y] on the raw estimate; [] = none
    trees: Any = None  # the HistGradientBoostingRegressor when kind == "trees" (not in the JSON)

    # ------------------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        profile: pd.DataFrame,
        dice: Any,
        groups: Sequence[Any],
        *,
        model_hash: str,
        kinds: Sequence[ModelKind] = ("ridge", "trees"),
        alpha: float = 0.1,
        n_folds: int = 5,
        seed: int = 0,
        select_groups: Sequence[Any] | None = None,
        post_calibration: Literal["none", "isotonic"] = "none",
        extra_sets: Mapping[str, Sequence[str]] | None = None,
    ) -> QualityEstimator:
        """Fit on calibration profiles (clean and shifted images) and their true Dice.

        Args:
            profile: :func:`~segability.estimation.profile.sa_profile` rows (``image`` ignored).
            dice: true Dice per row.
            groups: source image per row (a clean image and its shifted versions share one).
            model_hash: :func:`~segability.estimation.calibration.state_dict_hash` of the model.
            kinds: candidate model kinds.
            alpha: interval miscoverage (0.1: 90% intervals).
            n_folds: grouped CV folds.
            seed: seed of the trees.
            select_groups: groups of the cross-validation that chooses the model and gives the
                conformal residuals, when they should differ from ``groups`` -- e.g. the shift
                family, so that the choice rewards what carries over to an unseen kind of shift.
            post_calibration: ``"isotonic"`` maps the chosen model's estimate through an isotonic
                regression of Dice on its out-of-fold estimates (a monotone correction of the
                model's bias, e.g. a ridge model's shrinkage towards the mean); the conformal
                residuals then come from that map cross-fitted over the same folds.
            extra_sets: more candidate feature sets for the ridge model (name -> profile columns;
                columns the profile lacks are left out), besides :func:`feature_sets`.

        Raises:
            UsageError: mismatched lengths, fewer than two groups, or no finite Dice.
        """
        from sklearn.covariance import LedoitWolf

        names = [c for c in profile.columns if c != "image"]
        x_all = profile[names].to_numpy(float)
        y = np.asarray(dice, dtype=float)
        groups = np.asarray([str(g) for g in groups])
        if not len(x_all) == len(y) == len(groups):
            raise UsageError(f"dice and groups must give one value per profile row ({len(x_all)})", argument="dice")
        ok = np.isfinite(y)
        if ok.sum() < 10:
            raise UsageError("dice: fewer than 10 finite values to calibrate on", argument="dice")
        select = groups if select_groups is None else np.asarray([str(g) for g in select_groups])
        if len(select) != len(ok):
            raise UsageError(f"select_groups must give one value per profile row ({len(ok)})", argument="select_groups")
        x_all, y, groups, select = x_all[ok], y[ok], groups[ok], select[ok]
        usable = [j for j in range(len(names)) if np.isfinite(x_all[:, j]).any()]
        names = [names[j] for j in usable]
        x_all = x_all[:, usable]
        fill = np.nanmedian(x_all, axis=0)
        x_filled = np.where(np.isfinite(x_all), x_all, fill)
        center = x_filled.mean(0)
        scale = x_filled.std(0)
        scale = np.where(scale > 1e-9, scale, 1.0)
        z = (x_filled - center) / scale
        folds = grouped_folds(select, n_folds)

        candidates: dict[str, tuple[str, list[int]]] = {}
        if "ridge" in kinds:
            sets = feature_sets(names)
            for set_name, wanted in (extra_sets or {}).items():
                if [c for c in wanted if c in names]:
                    sets[set_name] = [c for c in wanted if c in names]
            for set_name, cols in sets.items():
                candidates[f"ridge:{set_name}"] = ("ridge", [names.index(c) for c in cols])
        if "trees" in kinds:
            candidates["trees:all"] = ("trees", list(range(len(names))))
        if not candidates:
            raise UsageError(f"kinds must name 'ridge' and/or 'trees', got {list(kinds)}", argument="kinds")
        cv: dict[str, dict[str, float]] = {}
        oof: dict[str, np.ndarray] = {}
        for label, (kind, cols) in candidates.items():
            pred = np.empty(len(y))
            for tr, te in folds:
                model = _make(kind, seed).fit(z[np.ix_(tr, cols)], y[tr])
                pred[te] = model.predict(z[np.ix_(te, cols)])
            pred = np.clip(pred, 0.0, 1.0)
            oof[label] = pred
            cv[label] = {"mae": float(np.mean(np.abs(pred - y))), "spearman": _spearman(pred, y)}
        choice = min(cv, key=lambda k: cv[k]["mae"])
        coef = np.zeros(len(names))
        intercept, ridge_alpha, trees = float(np.mean(y)), math.nan, None
        kind, cols = candidates[choice]
        model = _make(kind, seed).fit(z[:, cols], y)
        if kind == "ridge":
            coef[cols] = model.coef_
            intercept, ridge_alpha = float(model.intercept_), float(model.alpha_)
        else:
            trees = _TreesOnColumns(model, cols)
        post_map: list[list[float]] = []
        residual = np.abs(oof[choice] - y)
        if post_calibration == "isotonic":
            post_map, residual = _isotonic_post_map(oof[choice], y, folds)
        elif post_calibration != "none":
            raise UsageError(f'post_calibration must be "none" or "isotonic", got {post_calibration!r}', argument="post_calibration")
        radius = conformal_radius(residual, alpha)

        # out of range: Mahalanobis distance; the threshold from out-of-fold distances, since a
        # calibration row is always nearer a covariance fitted on itself
        d_oof = np.empty(len(y))
        for tr, te in folds:
            lw = LedoitWolf().fit(z[tr])
            d_oof[te] = _mahalanobis(z[te], lw.location_, lw.precision_)
        lw = LedoitWolf().fit(z)
        threshold = float(np.quantile(d_oof, 0.99))

        input_cols = [c for c in names if c.startswith("input_")]
        model_cols = [c for c in names if c.startswith(("sa_pred_body:", "reverse_body:", "reverse:"))]
        evidence = {
            "input": input_cols,
            "model": model_cols,
            "input_mean": float(np.mean(x_filled[:, [names.index(c) for c in input_cols]])) if input_cols else math.nan,
            "input_std": float(np.std(x_filled[:, [names.index(c) for c in input_cols]].mean(1))) if input_cols else math.nan,
            "model_mean": float(np.mean(x_filled[:, [names.index(c) for c in model_cols]])) if model_cols else math.nan,
            "model_std": float(np.std(x_filled[:, [names.index(c) for c in model_cols]].mean(1))) if model_cols else math.nan,
        }
        return cls(
            features=names, kind=kind, center=center.tolist(), scale=scale.tolist(), fill=fill.tolist(),
            coef=coef.tolist(), intercept=intercept, ridge_alpha=ridge_alpha, radius=float(radius), alpha=float(alpha),
            ood_location=lw.location_.tolist(), ood_precision=lw.precision_.tolist(), ood_threshold=threshold,
            evidence=evidence, model_hash=str(model_hash), version=_package_version(), choice=choice, cv=cv,
            n=int(len(y)), n_groups=int(len(np.unique(groups))), post_map=post_map, trees=trees,
        )  # fmt: skip

    # ------------------------------------------------------------------------ applying
    def predict(self, profile: pd.DataFrame, *, model_hash: str | None = None) -> pd.DataFrame:
        """Estimated Dice, interval, out-of-range check and the evidence behind a flag, per image.

        Args:
            profile: SA profile rows with (at least) :attr:`features`.
            model_hash: the hash of the model the profile came from; checked when given.

        Returns:
            ``image``, ``estimated_dice``, ``lower``, ``upper``, ``distance`` (Mahalanobis),
            ``out_of_range`` (bool), ``evidence`` (the flag reason this image would get).

        Raises:
            UsageError: missing feature columns, or another model's hash.
        """
        if model_hash is not None:
            self.check_model(model_hash)
        missing = [c for c in self.features if c not in profile.columns]
        if missing:
            raise UsageError(f"profile lacks the estimator's features {missing[:5]}{' ...' if len(missing) > 5 else ''}", argument="profile")
        x = profile[self.features].to_numpy(float)
        x = np.where(np.isfinite(x), x, np.asarray(self.fill))
        z = (x - np.asarray(self.center)) / np.asarray(self.scale)
        if self.kind == "trees" and self.trees is None:
            raise UsageError("this estimator's tree model was not loaded (load(..., trust_trees=True))", argument="trees")
        raw = self.trees.predict(z) if self.kind == "trees" else z @ np.asarray(self.coef) + self.intercept
        mapped = np.interp(raw, self.post_map[0], self.post_map[1]) if self.post_map else raw
        distance = _mahalanobis(z, np.asarray(self.ood_location), np.asarray(self.ood_precision))
        out = distance > self.ood_threshold
        est = np.where(out, raw, np.clip(mapped, 0.0, 1.0))  # out of range: reported as computed, not clipped
        lower = np.where(out, 0.0, np.clip(est - self.radius, 0.0, 1.0))
        upper = np.where(out, 1.0, np.clip(est + self.radius, 0.0, 1.0))
        ids = profile["image"].astype(str).to_numpy() if "image" in profile else np.arange(len(profile)).astype(str)
        return pd.DataFrame({
            "image": ids, "estimated_dice": est, "lower": lower, "upper": upper,
            "distance": distance, "out_of_range": out, "evidence": self._evidence(x, out),
        })  # fmt: skip

    def _evidence(self, x: np.ndarray, out: np.ndarray) -> list[str]:
        """The flag reason from the evidence: shift when out of range, else the weaker of input / model."""
        ev = self.evidence

        def z(kind: str) -> np.ndarray:
            cols = [self.features.index(c) for c in ev[kind] if c in self.features]
            if not cols or not np.isfinite(ev[f"{kind}_std"]):
                return np.full(len(x), np.inf)
            return (x[:, cols].mean(1) - ev[f"{kind}_mean"]) / max(ev[f"{kind}_std"], 1e-9)

        zi, zm = z("input"), z("model")
        status = np.where(zi < zm, FlagStatus.IMAGE_QUALITY.value, FlagStatus.MODEL.value)
        return np.where(out, FlagStatus.SHIFT.value, status).tolist()

    def gate(
        self,
        profile: pd.DataFrame,
        *,
        review_fraction: float | None = 0.2,
        threshold: float | None = None,
        model_hash: str | None = None,
    ) -> pd.DataFrame:
        """Which images go to a person, and why.

        Args:
            profile: SA profile rows.
            review_fraction: flag this share of the images, the least trusted (out of range first,
                then the lowest lower bound); None to use ``threshold`` only.
            threshold: also flag every image whose estimated Dice is below it.
            model_hash: checked against the estimator's model when given.

        Returns:
            :meth:`predict`'s table plus ``flag`` (bool), ``status`` (a :class:`FlagStatus`
            value) and ``reason`` (words; empty when not flagged).

        Example:
            >>> # est = QualityEstimator.fit(...); est.gate(profile, review_fraction=0.2)
        """
        if review_fraction is None and threshold is None:
            raise UsageError("give review_fraction or threshold", argument="review_fraction")
        if review_fraction is not None and not 0.0 <= review_fraction <= 1.0:
            raise UsageError(f"review_fraction must be in [0, 1], got {review_fraction!r}", argument="review_fraction")
        table = self.predict(profile, model_hash=model_hash)
        flag = table["out_of_range"].to_numpy().copy()
        if review_fraction is not None:
            k = int(math.ceil(review_fraction * len(table)))
            trust = np.where(table["out_of_range"], -np.inf, table["lower"].to_numpy(float))
            order = np.lexsort((table["estimated_dice"].to_numpy(float), trust))
            flag[order[:k]] = True
        if threshold is not None:
            flag |= table["estimated_dice"].to_numpy(float) < threshold
        table["flag"] = flag
        table["status"] = np.where(flag, table["evidence"], FlagStatus.OK.value)
        table["reason"] = [FlagStatus(s).message for s in table["status"]]
        return table

    def check_model(self, model_hash: str) -> None:
        """Raise when ``model_hash`` is not the model the estimator was fitted for."""
        if str(model_hash) != self.model_hash:
            raise UsageError(
                f"this estimator was fitted for model {self.model_hash[:12]}..., not {str(model_hash)[:12]}...: "
                "fit one for this model",
                argument="model",
            )

    # --------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready contents (the tree model, if any, is not included)."""
        out = {k: v for k, v in asdict(self).items() if k != "trees"}
        return {"format": FORMAT, **_json_ready(out)}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON (and, for trees, ``<path>.trees.joblib`` beside it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        os.replace(tmp, path)
        if self.kind == "trees":
            import joblib

            joblib.dump(self.trees, _trees_path(path))
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityEstimator:
        """The estimator of :meth:`to_dict`'s contents (e.g. embedded in another JSON file); a tree
        model is not part of it (:meth:`load` reads it).

        Raises:
            UsageError: contents of another format.
        """
        data = dict(data)
        if data.pop("format", None) != FORMAT:
            raise UsageError(f"not a segability quality estimator ({FORMAT})", argument="data")
        # JSON has no inf / NaN: an infinite radius (too few residuals) and undefined numbers come back
        infinite_radius = data.get("radius") is None
        data = _from_json(data)
        if infinite_radius:
            data["radius"] = math.inf
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, trust_trees: bool = False) -> QualityEstimator:
        """Read a file written by :meth:`save`.

        A ridge estimator is plain JSON. A tree estimator's model is a pickle (``joblib``):
        unpickling runs code from the file, so it is loaded only with ``trust_trees=True``, for a
        file you created yourself.

        Raises:
            UsageError: not an estimator file, or a tree model without ``trust_trees``.
        """
        path = Path(path)
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise UsageError(f"{path} is not a segability quality estimator ({FORMAT})", argument="path")
        est = cls.from_dict(data)
        if est.kind == "trees":
            if not trust_trees:
                raise UsageError(
                    f"{path} holds a tree model stored as a pickle ({_trees_path(path).name}); loading a pickle runs "
                    "code from the file: pass trust_trees=True only for a file you created yourself",
                    argument="trust_trees",
                )
            import joblib

            est.trees = joblib.load(_trees_path(path))
        return est


# --------------------------------------------------------------------------------- helpers
class _TreesOnColumns:
    """A fitted tree model that reads a subset of the standardised columns."""

    def __init__(self, model: Any, cols: list[int]):
        self.model, self.cols = model, list(cols)

    def predict(self, z: np.ndarray) -> np.ndarray:
        return self.model.predict(z[:, self.cols])


def _isotonic_post_map(oof: np.ndarray, y: np.ndarray, folds: list[tuple[np.ndarray, np.ndarray]]) -> tuple[list[list[float]], np.ndarray]:
    """Isotonic knots of Dice on the out-of-fold estimates, and the residuals of that map cross-fitted."""
    from sklearn.isotonic import IsotonicRegression

    def fit(x: np.ndarray, t: np.ndarray) -> IsotonicRegression:
        return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, t)

    residual = np.empty(len(y))
    for tr, te in folds:
        residual[te] = np.abs(fit(oof[tr], y[tr]).predict(oof[te]) - y[te])
    iso = fit(oof, y)
    return [iso.X_thresholds_.tolist(), iso.y_thresholds_.tolist()], residual


def _make(kind: str, seed: int) -> Any:
    if kind == "ridge":
        from sklearn.linear_model import RidgeCV

        return RidgeCV(alphas=_ALPHAS)
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(
        max_iter=150, learning_rate=0.06, max_leaf_nodes=15, min_samples_leaf=10, l2_regularization=1.0,
        early_stopping=False, random_state=seed,
    )  # fmt: skip


def _mahalanobis(z: np.ndarray, location: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = z - location
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import stats

    if np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(stats.spearmanr(a, b).statistic)


def _trees_path(path: Path) -> Path:
    return path.with_name(path.name + ".trees.joblib")


def _json_ready(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_ready(value.item())
    return value


def _from_json(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def _package_version() -> str:
    import segability

    return str(getattr(segability, "__version__", "unknown"))
