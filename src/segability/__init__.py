"""segability: what every layer and unit of a segmentation network can segment.

Implements the segmentation ability (SA) of He et al., "Segmentation Ability Map: Interpret deep
features for medical image segmentation", Medical Image Analysis (2023). The whole public API is
re-exported here; names are imported on first use, so ``import segability`` (and the CLI's
``--help``) stays fast without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "prototypes": "segability.core.functional",
    "protoseg": "segability.core.functional",
    "protoseg_units": "segability.core.functional",
    "sa_score": "segability.core.functional",
    "UndefinedPrototypeWarning": "segability.core.functional",
    "SegmentationAbility": "segability.core.metric",
    "Status": "segability.core.reduction",
    "UsageError": "segability.errors",
    "FeatureRecorder": "segability.capture",
    "LayerInfo": "segability.capture",
    "list_layers": "segability.capture",
    "SAResult": "segability.analysis",
    "analyze": "segability.analysis",
    "analyze_windows": "segability.analysis",
    "AnalysisConfig": "segability.analysis",
    "load_result": "segability.analysis",
    "qc": "segability.estimation.qc",
    "evaluate_qc": "segability.estimation.qc",
    "Calibration": "segability.estimation.calibration",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:
    from segability.analysis import AnalysisConfig, SAResult, analyze, analyze_windows, load_result
    from segability.capture import FeatureRecorder, LayerInfo, list_layers
    from segability.core.functional import (
        UndefinedPrototypeWarning,
        protoseg,
        protoseg_units,
        prototypes,
        sa_score,
    )
    from segability.core.metric import SegmentationAbility
    from segability.core.reduction import Status
    from segability.errors import UsageError
    from segability.estimation.calibration import Calibration
    from segability.estimation.qc import evaluate_qc, qc


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'segability' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
