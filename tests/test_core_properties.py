"""Invariances the ProtoSeg math guarantees, checked with hypothesis on random 1D/2D/3D problems.

Features are drawn at the guide's resolution or lower (the core then works through the adjoint of
the resize), guides hard or soft, with or without a mask, in float64.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import segability

SETTINGS = settings(max_examples=25, deadline=None)
F64 = torch.float64


@st.composite
def problems(draw, k: int = 1):
    """(features (B, C, *s), guide (B, K, *S), mask (B, 1, *S) or None) with every class present."""
    d = draw(st.integers(1, 3))
    gsize = tuple(draw(st.integers(3, 7)) for _ in range(d))
    fsize = tuple(draw(st.integers(2, n)) for n in gsize)
    b, c = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    hard = draw(st.booleans())
    masked = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    f = torch.randn(b, c, *fsize, generator=gen, dtype=F64)
    if k == 1:
        g = torch.rand(b, 1, *gsize, generator=gen, dtype=F64)
        if hard:
            g = (g > 0.5).to(F64)
        g.view(b, -1)[:, 0], g.view(b, -1)[:, -1] = 0.0, 1.0
    else:
        logits = 3.0 * torch.randn(b, k, *gsize, generator=gen, dtype=F64)
        g = torch.softmax(logits, dim=1)
        if hard:
            g = torch.nn.functional.one_hot(logits.argmax(1), k).movedim(-1, 1).to(F64).contiguous()
        flat = g.view(b, k, -1)
        flat[:, :, :k] = torch.eye(k, dtype=F64)
    mask = None
    if masked:
        mask = (torch.rand(b, 1, *gsize, generator=gen) < 0.7).to(F64)
        mask.view(b, -1)[:, [0, 1, 2, -1]] = 1.0
    return f, g, mask


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (C,) vector as (1, C, 1, ...) against ``like``."""
    return v.reshape(1, -1, *([1] * (like.ndim - 2)))


@SETTINGS
@given(problems(), st.data())
def test_channel_permutation(problem, data) -> None:
    f, g, m = problem
    perm = torch.tensor(data.draw(st.permutations(range(f.shape[1]))))
    fp = f[:, perm]
    torch.testing.assert_close(segability.protoseg(fp, g, m), segability.protoseg(f, g, m), atol=1e-12, rtol=0)
    torch.testing.assert_close(segability.prototypes(fp, g, m), segability.prototypes(f, g, m)[:, :, perm])
    torch.testing.assert_close(segability.protoseg_units(fp, g, m), segability.protoseg_units(f, g, m)[:, perm])


@SETTINGS
@given(problems(), st.lists(st.floats(-5, 5), min_size=5, max_size=5))
def test_common_translation(problem, shift) -> None:
    f, g, m = problem
    v = torch.tensor(shift[: f.shape[1]], dtype=F64)
    moved = f + expand(v, f)
    # Distances are unchanged, so the probabilities are; prototypes move with the features.
    torch.testing.assert_close(segability.protoseg(moved, g, m), segability.protoseg(f, g, m), atol=1e-9, rtol=0)
    torch.testing.assert_close(
        segability.prototypes(moved, g, m), segability.prototypes(f, g, m) + v, atol=1e-12, rtol=1e-12
    )


@SETTINGS
@given(problems(), st.floats(0.1, 10.0))
def test_uniform_positive_scaling(problem, scale) -> None:
    f, g, m = problem
    p = segability.protoseg(f, g, m)
    ps = segability.protoseg(scale * f, g, m)
    # Distances scale by s^2: the binary map is unchanged and the log-odds scale by s^2.
    decisive = (p[:, 1] - p[:, 0]).abs() > 1e-9
    assert torch.equal(ps.argmax(1)[decisive], p.argmax(1)[decisive])
    ok = (p.min(1).values > 1e-200) & (ps.min(1).values > 1e-200)
    log_odds = (p[:, 1].log() - p[:, 0].log())[ok]
    log_odds_scaled = (ps[:, 1].log() - ps[:, 0].log())[ok]
    torch.testing.assert_close(log_odds_scaled, scale**2 * log_odds, atol=1e-8, rtol=1e-8)


@SETTINGS
@given(problems())
def test_swapping_guide_swaps_channels(problem) -> None:
    f, g, m = problem
    p = segability.protoseg(f, g, m)
    torch.testing.assert_close(segability.protoseg(f, 1.0 - g, m), p.flip(1), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        segability.prototypes(f, 1.0 - g, m), segability.prototypes(f, g, m).flip(1), atol=1e-10, rtol=1e-10
    )


@SETTINGS
@given(problems(k=3), st.permutations(range(3)))
def test_permuting_classes_permutes_output(problem, perm) -> None:
    f, g, m = problem
    perm = torch.tensor(perm)
    torch.testing.assert_close(segability.protoseg(f, g[:, perm], m), segability.protoseg(f, g, m)[:, perm])


@SETTINGS
@given(st.one_of(problems(), problems(k=3)), st.floats(0.01, 1.0))
def test_mask_scale_does_not_matter(problem, alpha) -> None:
    # Every class weight is scaled alike, so the normalised prototypes do not change.
    f, g, m = problem
    m = torch.ones_like(g[:, :1]) if m is None else m
    p = segability.protoseg(f, g, m)
    torch.testing.assert_close(segability.protoseg(f, g, alpha * m), p, atol=1e-10, rtol=0)
    torch.testing.assert_close(segability.protoseg(f, g), segability.protoseg(f, g, torch.ones_like(m)))


@SETTINGS
@given(problems(), st.sampled_from([None, 1, 2]))
def test_units_equal_protoseg_on_each_channel(problem, chunk) -> None:
    f, g, m = problem
    units = segability.protoseg_units(f, g, m, chunk_size=chunk)
    for c in range(f.shape[1]):
        p = segability.protoseg(f[:, c : c + 1], g, m)
        decisive = (p[:, 1] - p[:, 0]).abs() > 1e-9
        alone = p.argmax(1).to(F64)
        assert torch.equal(units[:, c][decisive], alone[decisive])
