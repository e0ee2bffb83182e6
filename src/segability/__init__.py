"""segability: what every layer and unit of a segmentation network can segment.

Implements the segmentation ability (SA) of He et al., "Segmentation Ability Map: Interpret deep
features for medical image segmentation", Medical Image Analysis (2023). The whole public API is
re-exported here.
"""

from __future__ import annotations

__version__ = "0.1.0"

from segability.analysis import SAResult, analyze, load_result
from segability.capture import FeatureRecorder, LayerInfo, list_layers
from segability.core import (
    SegmentationAbility,
    UndefinedPrototypeWarning,
    prototypes,
    protoseg,
    protoseg_units,
    sa_score,
)

__all__ = [
    "__version__",
    "FeatureRecorder",
    "LayerInfo",
    "SAResult",
    "analyze",
    "list_layers",
    "load_result",
    "SegmentationAbility",
    "UndefinedPrototypeWarning",
    "prototypes",
    "protoseg",
    "protoseg_units",
    "sa_score",
]
