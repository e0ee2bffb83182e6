"""The functional core: prototypes, feature segmentation and Dice, on tensors. Imports nothing above it."""

from segability.core.functional import (
    UndefinedPrototypeWarning,
    protoseg,
    protoseg_units,
    prototypes,
    sa_score,
)
from segability.core.metric import SegmentationAbility

__all__ = [
    "UndefinedPrototypeWarning",
    "prototypes",
    "protoseg",
    "protoseg_units",
    "sa_score",
    "SegmentationAbility",
]
