"""The SA-profile quality gate: calibration of a :class:`QualityEstimator` on labelled images and
their shifted versions, its file, and the gate it gives to new images (``segability calibrate
--estimator profile`` and ``segability qc``).
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

from segability.analysis import INPUT, SAResult, analyze
from segability.errors import UsageError
from segability.estimation.calibration import Calibration, state_dict_hash
from segability.estimation.estimator import QualityEstimator
from segability.estimation.gate import GATE_COLUMNS
from segability.estimation.reverse import ReferenceCache

__all__ = [
    "PROFILE_COLUMNS",
    "PROFILE_FORMAT",
    "DEFAULT_SHIFTS",
    "DEFAULT_SEVERITIES",
    "ProfileCalibration",
    "fit_profile_calibration",
    "load_calibration",
    "profile_gate",
    "references_path",
    "shift_image",
    "stream_profiles",
]

QC_COLUMNS = GATE_COLUMNS


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


def load_calibration(path: str | os.PathLike[str]) -> Any:
    """A calibration file of any kind: the mean-SA map (:class:`Calibration`), one per class of a
    multi-class model (:class:`~segability.estimation.per_class.ClassCalibrations`) or the
    SA-profile estimator (:class:`ProfileCalibration`), told apart by the file's ``format``."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not a calibration file (not JSON: {exc})", argument="path") from exc
    if isinstance(data, dict) and data.get("format") == PROFILE_FORMAT:
        return ProfileCalibration.load(path)
    from segability.estimation.per_class import (  # per_class builds on qc
        CLASSES_FORMAT,
        ClassCalibrations,
    )

    if isinstance(data, dict) and data.get("format") == CLASSES_FORMAT:
        return ClassCalibrations.from_dict(data, os.fspath(path))
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
