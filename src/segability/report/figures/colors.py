"""Colours fixed across the report: Okabe-Ito, safe for colour-blind readers."""

from __future__ import annotations

__all__ = ["COLORS", "GROUP_COLORS"]

# Okabe-Ito: distinguishable with any colour vision deficiency.
COLORS = {
    "sa": "#0072B2",  # blue: SA against the label
    "sa_pred": "#E69F00",  # orange: SA against the network's prediction
    "encoder": "#56B4E9",
    "bottleneck": "#999999",
    "decoder": "#CC79A7",
    "outline": "#56B4E9",
    "point": "#0072B2",
}
GROUP_COLORS = (
    "#0072B2",
    "#E69F00",
    "#009E73",
    "#D55E00",
    "#CC79A7",
    "#56B4E9",
    "#F0E442",
    "#000000",
)
