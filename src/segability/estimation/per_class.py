"""The mean-SA quality gate of a multi-class run: one calibration per class, one gate row per image and class.

A multi-class analysis (``classes=`` / ``--classes``) scores every class in one pass;
:meth:`segability.SAResult.by_class` splits it into the single-target results a ``target=c`` run
would give, and each class gets its own :class:`~segability.estimation.calibration.Calibration`
(its Dice, its layers, its interval). ``qc.csv`` then has ``class`` and ``class_name`` columns;
an image is flagged per class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from segability.analysis.results import SAResult
from segability.estimation.calibration import Calibration, fingerprint, state_dict_hash
from segability.estimation.qc import fit_calibration, gate_result

__all__ = ["CLASSES_FORMAT", "ClassCalibrations", "fit_class_calibrations", "gate_classes"]

CLASSES_FORMAT = "segability.class-calibrations/1"


@dataclass
class ClassCalibrations:
    """One mean-SA :class:`Calibration` per class of a multi-class model.

    Attributes:
        classes: the calibration of each class, by class index.
        names: the class names, by class index.
    """

    classes: dict[int, Calibration]
    names: dict[int, str]

    @property
    def layers(self) -> list[str]:
        """Every layer some class's calibration reads (the layers a gated analysis needs)."""
        return sorted({layer for cal in self.classes.values() for layer in cal.layers})

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless every class's calibration was made for ``model``'s weights."""
        digest = state_dict_hash(model)
        for c, cal in self.classes.items():
            try:
                cal.check_fingerprint(fingerprint(digest, cal.layers))
            except ValueError as exc:
                raise ValueError(f"class {c} ({self.names.get(c, c)}): {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CLASSES_FORMAT,
            "classes": {str(c): {"name": self.names.get(c, str(c)), "calibration": cal.to_dict()} for c, cal in self.classes.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the calibrations as one JSON file."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> ClassCalibrations:
        """Read what :meth:`to_dict` wrote.

        Raises:
            ValueError: not a file of this format, or a class entry is malformed.
        """
        if not isinstance(data, Mapping) or data.get("format") != CLASSES_FORMAT or not isinstance(data.get("classes"), Mapping):
            raise ValueError(f"path: {source!r} is not a {CLASSES_FORMAT} file")
        classes, names = {}, {}
        for key, entry in data["classes"].items():
            if not str(key).isdigit() or not isinstance(entry, Mapping) or "calibration" not in entry:
                raise ValueError(f"path: {source!r}: class entry {key!r} must be {{'name', 'calibration'}}")
            classes[int(key)] = Calibration.from_dict(entry["calibration"], source)
            names[int(key)] = str(entry.get("name", key))
        if not classes:
            raise ValueError(f"path: {source!r} holds no class")
        return cls(classes, names)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ClassCalibrations:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")), os.fspath(path))


def fit_class_calibrations(model: nn.Module, result: SAResult, **kwargs: Any) -> ClassCalibrations:
    """A :func:`~segability.estimation.qc.fit_calibration` per class of a labelled multi-class analysis.

    Args:
        model: the analysed network.
        result: an analysis with ``classes`` (tables with a ``class`` column).
        **kwargs: passed to :func:`~segability.estimation.qc.fit_calibration` (``method``, ``alpha``, ...).

    Raises:
        ValueError: ``result`` is a single-target analysis, or a class cannot be calibrated
            (the message names the class).
    """
    parts = result.by_class()
    if not parts:
        raise ValueError("result: a single-target analysis; use fit_calibration")
    classes, names = {}, {}
    for c, (name, part) in parts.items():
        try:
            classes[c] = fit_calibration(model, part, **kwargs)
        except ValueError as exc:
            raise ValueError(f"class {c} ({name}): {exc}") from exc
        names[c] = name
    return ClassCalibrations(classes, names)


def gate_classes(
    result: SAResult,
    calibrations: ClassCalibrations,
    *,
    threshold: float = 0.75,
    use_lower: bool = False,
    failed: dict[str, str] | None = None,
) -> pd.DataFrame:
    """The gate of every class: :func:`~segability.estimation.qc.gate_result` per class, rows
    with ``class`` and ``class_name`` after ``image`` (images by class, in the analysis's order).

    Raises:
        ValueError: the analysis lacks a class of the calibrations.
    """
    parts = result.by_class()
    missing = sorted(set(calibrations.classes) - set(parts))
    if missing:
        raise ValueError(f"the analysis has no class {missing} of the calibration (it has {sorted(parts)})")
    frames = []
    for c, cal in calibrations.classes.items():
        gate = gate_result(parts[c][1], cal, threshold=threshold, use_lower=use_lower, failed=failed)
        gate.insert(1, "class", c)
        gate.insert(2, "class_name", calibrations.names.get(c, parts[c][0]))
        frames.append(gate)
    return pd.concat(frames, ignore_index=True)
