"""segability's low-resolution ProtoSeg equals the direct full-resolution method (benchmarks/direct.py).

The direct method resizes every channel to the guide's size, takes weighted means and full squared
distances there, and loops over units; the fast path never resizes all channels (adjoint-resized
guide, K-channel logits, midpoint threshold for units). In float64 both must agree to ~1e-10, and
binary maps must be identical except at pixels the direct method itself calls a tie (margin within
1e-9), for 1D/2D/3D, with and without mask, one-channel and K=3 guides, and features at full,
1/2, 1/4, 1/8 and a non-integer fraction of the guide's resolution.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from segability.core.functional import (
    UndefinedPrototypeWarning,
    protoseg,
    protoseg_units,
    prototypes,
)
from segability.core.reduction import score_layer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from direct import (  # noqa: E402
    direct_distances,
    direct_layer_sa,
    direct_protoseg,
    direct_prototypes,
    direct_unit_maps,
    direct_unit_sa,
)

ATOL = 1e-10
TIE = 1e-9

GUIDE_SIZES = {1: (48,), 2: (32, 24), 3: (16, 16, 8)}
# Features' spatial size as a fraction of the guide's: full, 1/2, 1/4, 1/8, and a non-integer one.
FRACTIONS = [1, 2, 4, 8, "odd"]
CASES = [(d, frac) for d in (1, 2, 3) for frac in FRACTIONS]


def _feature_size(guide_size: tuple[int, ...], frac: int | str) -> tuple[int, ...]:
    if frac == "odd":
        return tuple(max(1, (3 * s) // 7) for s in guide_size)
    return tuple(max(1, s // frac) for s in guide_size)


def _smooth(gen: torch.Generator, channels: int, size: tuple[int, ...]) -> torch.Tensor:
    """(2, channels, *size) spatially coherent random field, so maps have real regions and edges."""
    coarse = torch.randn(2, channels, *[max(2, s // 4) for s in size], generator=gen, dtype=torch.float64)
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(coarse, size=size, mode=mode, align_corners=False)


def _inputs(dims: int, frac: int | str, *, classes: int = 1, masked: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(1000 * dims + 10 * FRACTIONS.index(frac) + seed)
    size = GUIDE_SIZES[dims]
    fsize = _feature_size(size, frac)
    features = torch.randn(2, 5, *fsize, generator=gen, dtype=torch.float64) + _smooth(gen, 5, fsize)
    logits = 3.0 * _smooth(gen, classes if classes > 1 else 1, size)
    guide = torch.softmax(logits, dim=1) if classes > 1 else torch.sigmoid(logits)
    mask = None
    if masked:
        mask = (torch.rand(2, 1, *size, generator=gen, dtype=torch.float64) > 0.3).to(torch.float64)
        mask = mask * torch.rand(2, 1, *size, generator=gen, dtype=torch.float64).clamp_min(0.5)
    references = torch.cat([guide[:, :1] > 0.5, torch.rand(2, 1, *size, generator=gen) > 0.6], dim=1)
    return features, guide, mask, references.to(torch.float64)


def _top2_gap(distances: torch.Tensor) -> torch.Tensor:
    """(B, *S) gap between the smallest and second-smallest distance: a tie where it is ~0."""
    two = distances.topk(2, dim=1, largest=False).values
    return two[:, 1] - two[:, 0]


# ------------------------------------------------------------------- the direct method, by hand
def test_direct_method_matches_hand_computation() -> None:
    # Features [0, 4] resized to 4 samples: [0, 1, 3, 4]; guide [0, 0, 1, 1].
    f = torch.tensor([[[0.0, 4.0]]], dtype=torch.float64)
    g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(direct_prototypes(f, g), torch.tensor([[[0.5], [3.5]]], dtype=torch.float64))
    expected = torch.tensor([[[0.25, 0.25, 6.25, 12.25], [12.25, 6.25, 0.25, 0.25]]], dtype=torch.float64)
    torch.testing.assert_close(direct_distances(f, g), expected)
    ref = torch.tensor([[[0.0, 1.0, 1.0, 1.0]]], dtype=torch.float64)
    # Map [0, 0, 1, 1] vs reference [0, 1, 1, 1]: Dice = 2 * 2 / (2 + 3).
    torch.testing.assert_close(direct_layer_sa(f, g, ref), torch.tensor([[0.8]], dtype=torch.float64))
    torch.testing.assert_close(direct_unit_sa(f, g, ref), torch.tensor([[[0.8]]], dtype=torch.float64))


def test_tie_goes_to_background_in_both() -> None:
    # Both prototypes are 2.0 (target mean of [0, 4], background [2]): every pixel is a tie, and a
    # tie is not target, so the map is empty and its Dice with [0, 0, 1] is 0 (not 2 * 1 / (3 + 1)).
    f = torch.tensor([[[0.0, 4.0, 2.0]]], dtype=torch.float64)
    g = torch.tensor([[[1.0, 1.0, 0.0]]], dtype=torch.float64)
    ref = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    torch.testing.assert_close(direct_layer_sa(f, g, ref), zero)
    torch.testing.assert_close(direct_unit_sa(f, g, ref), zero.unsqueeze(-1))
    layer, unit, _ = score_layer(f, g, ref, units=True)
    torch.testing.assert_close(layer, zero)
    torch.testing.assert_close(unit, zero.unsqueeze(-1))


# ------------------------------------------------------------------------- whole-layer ProtoSeg
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize(("dims", "frac"), CASES)
def test_prototypes_and_protoseg_equal_direct(dims: int, frac: int | str, classes: int, masked: bool) -> None:
    features, guide, mask, _ = _inputs(dims, frac, classes=classes, masked=masked)

    torch.testing.assert_close(
        prototypes(features, guide, mask), direct_prototypes(features, guide, mask), rtol=0, atol=ATOL
    )

    fast = protoseg(features, guide, mask)
    direct = direct_protoseg(features, guide, mask)
    assert fast.shape == direct.shape == (2, max(classes, 2), *GUIDE_SIZES[dims])
    torch.testing.assert_close(fast, direct, rtol=0, atol=ATOL)

    decided = _top2_gap(direct_distances(features, guide, mask)) > TIE
    assert bool(decided.any())
    assert torch.equal(fast.argmax(1)[decided], direct.argmax(1)[decided])


# ------------------------------------------------------------------------------------- units
@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("dims", "frac"), CASES)
def test_unit_maps_equal_direct(dims: int, frac: int | str, masked: bool, chunk_size: int | None) -> None:
    features, guide, mask, _ = _inputs(dims, frac, masked=masked, seed=1)
    fast = protoseg_units(features, guide, mask, chunk_size=chunk_size)
    maps, margins = direct_unit_maps(features, guide, mask)
    assert fast.shape == maps.shape == (2, 5, *GUIDE_SIZES[dims])
    decided = margins.abs() > TIE
    assert bool(maps.any()) and bool((~maps).any())
    assert torch.equal(fast.bool()[decided], maps[decided])


# ------------------------------------------------------------------------------------ SA scores
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize(("dims", "frac"), CASES)
def test_score_layer_equals_direct(dims: int, frac: int | str, masked: bool, chunk_size: int | None) -> None:
    features, guide, mask, references = _inputs(dims, frac, masked=masked, seed=2)
    # The scores are compared exactly, so the data must not hold a near-tie the two methods may
    # round to different sides (continuous random data does not; this guards the fixture).
    assert bool((_top2_gap(direct_distances(features, guide, mask)) > TIE).all())
    assert bool((direct_unit_maps(features, guide, mask)[1].abs() > TIE).all())

    layer, unit, undefined = score_layer(features, guide, references, mask, units=True, chunk_size=chunk_size)
    assert not bool(undefined.any())
    torch.testing.assert_close(layer, direct_layer_sa(features, guide, references, mask), rtol=0, atol=ATOL)
    torch.testing.assert_close(unit, direct_unit_sa(features, guide, references, mask), rtol=0, atol=ATOL)
    assert bool((layer > 0).any()) and bool((unit < 1).any())


def test_undefined_prototype_is_nan_in_both() -> None:
    features, guide, _, _ = _inputs(2, 4)
    guide = guide.clone()
    guide[1] = 0.0  # image 1 has no target weight
    with pytest.warns(UndefinedPrototypeWarning):
        fast = protoseg(features, guide)
    direct = direct_protoseg(features, guide)
    assert bool(direct[1].isnan().all()) and bool(fast[1].isnan().all())
    torch.testing.assert_close(fast[0], direct[0], rtol=0, atol=ATOL)
