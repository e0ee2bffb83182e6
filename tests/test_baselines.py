"""segability.estimation.baselines: values computed by hand on tiny probability maps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from segability.estimation import (
    boundary_confidence,
    mc_dropout_agreement,
    mean_entropy,
    mean_max_prob_foreground,
    pairwise_dice,
    tta_flip_agreement,
)


def h(p: float) -> float:
    """Binary entropy in nats, by hand."""
    return -sum(q * math.log(q) for q in (p, 1 - p) if q > 0)


SPATIAL = [(8,), (6, 6), (4, 4, 4)]


# ----------------------------------------------------------------------------- entropy
@pytest.mark.parametrize("spatial", SPATIAL)
def test_entropy_constant_half_is_minus_ln2(spatial):
    prob = torch.full((2, 1, *spatial), 0.5, dtype=torch.float64)
    torch.testing.assert_close(mean_entropy(prob), torch.full((2,), -math.log(2), dtype=torch.float64))
    certain = (torch.rand(2, 1, *spatial) > 0.5).double()
    torch.testing.assert_close(mean_entropy(certain), torch.zeros(2, dtype=torch.float64))


def test_entropy_by_hand_and_categorical():
    prob = torch.tensor([[[0.5, 1.0, 0.0, 0.9]], [[0.2, 0.2, 0.3, 0.3]]], dtype=torch.float64)
    expected = torch.tensor([-(h(0.5) + h(0.9)) / 4, -(2 * h(0.2) + 2 * h(0.3)) / 4], dtype=torch.float64)
    torch.testing.assert_close(mean_entropy(prob), expected)
    uniform = torch.full((1, 3, 5, 5), 1 / 3)
    torch.testing.assert_close(mean_entropy(uniform, target=1), torch.tensor([-math.log(3)]))
    # K-channel entropy uses all classes, not the target against the rest.
    two = torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]], [[0.0, 0.0]]]).reshape(1, 3, 2)
    torch.testing.assert_close(mean_entropy(two, target=0), torch.tensor([-math.log(2)]))


# ----------------------------------------------------------------------------- confidence
def test_max_prob_foreground_by_hand():
    prob = torch.tensor([[[0.9, 0.6, 0.2, 0.4]], [[0.1, 0.2, 0.3, 0.4]]])
    out = mean_max_prob_foreground(prob)
    assert out[0].item() == pytest.approx(0.75)
    assert math.isnan(out[1].item())  # empty prediction: undefined, not confident
    assert mean_max_prob_foreground(prob, threshold=0.7)[0].item() == pytest.approx(0.9)
    # K channels: pixels whose argmax is the target, their max probability.
    k = torch.tensor([[[0.7, 0.1, 0.2], [0.2, 0.5, 0.2], [0.1, 0.4, 0.6]]])  # (1, 3 classes, 3 pixels)
    assert mean_max_prob_foreground(k, target=1)[0].item() == pytest.approx(0.5)
    assert mean_max_prob_foreground(k, target=2)[0].item() == pytest.approx(0.6)


def test_boundary_confidence_1d_by_hand():
    p = torch.tensor([[[0.9, 0.9, 0.8, 0.7, 0.2, 0.1, 0.1, 0.05]]], dtype=torch.float64)
    conf = [0.9, 0.9, 0.8, 0.7, 0.8, 0.9, 0.9, 0.95]
    assert boundary_confidence(p, band=0).item() == pytest.approx(np.mean(conf))
    assert boundary_confidence(p, band=1).item() == pytest.approx(np.mean(conf[:3] + conf[5:]))
    assert boundary_confidence(p, band=2).item() == pytest.approx(np.mean(conf[:2] + conf[6:]))
    assert math.isnan(boundary_confidence(p, band=4).item())  # the band covers everything


@pytest.mark.parametrize("spatial", SPATIAL)
def test_boundary_confidence_band_against_distance_reference(spatial):
    """Compare with a brute-force Chebyshev-distance band, in 1D, 2D and 3D."""
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(3, 1, *spatial, generator=g, dtype=torch.float64)
    prob[2] = 0.3  # empty prediction: no boundary, everything counts
    for band in (1, 2):
        got = boundary_confidence(prob, band=band)
        for b in range(3):
            p = prob[b, 0].numpy()
            fg = p > 0.5
            coords = np.array(list(itertools.product(*[range(s) for s in spatial])))
            labels = fg[tuple(coords.T)]
            dist = np.abs(coords[:, None, :] - coords[None, :, :]).max(-1)
            near_other = ((dist <= band) & (labels[None, :] != labels[:, None])).any(1)
            conf = np.maximum(p, 1 - p)[tuple(coords.T)]
            keep = ~near_other
            ref = conf[keep].mean() if keep.any() else math.nan
            assert got[b].item() == pytest.approx(ref, nan_ok=True)


def test_probabilities_are_validated():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mean_entropy(torch.full((1, 1, 4), 1.5))
    with pytest.raises(ValueError, match="target"):
        mean_max_prob_foreground(torch.full((1, 3, 4), 1 / 3))
    with pytest.raises(ValueError, match="band"):
        boundary_confidence(torch.full((1, 1, 4), 0.5), band=-1)
    with pytest.raises(ValueError, match="shape"):
        mean_entropy(torch.full((4, 4), 0.5))


# ----------------------------------------------------------------------------- agreement
def test_pairwise_dice_by_hand():
    a = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    b = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]])
    c = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    # Image 0 pairs: (a,b) 2/3, (a,c) 0, (b,c) 0. Image 1: all empty.
    torch.testing.assert_close(pairwise_dice([a, b, c]), torch.tensor([2 / 9, 1.0]))
    assert math.isnan(pairwise_dice([a, b], empty="nan")[1].item())


@pytest.mark.parametrize("spatial", SPATIAL)
def test_tta_equivariant_model_agrees_fully(spatial):
    x = torch.rand(2, 1, *spatial)
    torch.testing.assert_close(tta_flip_agreement(lambda t: t, x), torch.ones(2))
    threshold_model = lambda t: (t > 0.3).float()  # noqa: E731 (pixel-wise, hence flip-equivariant)
    torch.testing.assert_close(tta_flip_agreement(threshold_model, x, flips=[tuple(range(2, x.ndim))]),
                               torch.ones(2))


def test_tta_position_dependent_model_by_hand():
    x = torch.ones(1, 1, 4, 4)
    left = torch.tensor([1.0, 1.0, 0.0, 0.0])

    def left_half(t: torch.Tensor) -> torch.Tensor:  # keeps only the left columns: not equivariant
        return t * left

    # Original: left half. Flip H and back: left half. Flip W and back: right half.
    # Pairs: (orig, H) = 1, (orig, W) = 0, (H, W) = 0.
    torch.testing.assert_close(tta_flip_agreement(left_half, x), torch.tensor([1 / 3]))
    torch.testing.assert_close(tta_flip_agreement(left_half, x, flips=[3]), torch.tensor([0.0]))
    torch.testing.assert_close(tta_flip_agreement(left_half, x, flips=[2]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="flips"):
        tta_flip_agreement(left_half, x, flips=[1])


def test_tta_multiclass_target():
    x = torch.rand(1, 1, 6, 6)

    def two_class(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([1 - t, t], dim=1)

    torch.testing.assert_close(tta_flip_agreement(two_class, x, target=1), torch.ones(1))
    with pytest.raises(ValueError, match="target"):
        tta_flip_agreement(two_class, x)


class DropNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = torch.nn.BatchNorm1d(1)
        self.drop = torch.nn.Dropout(0.5)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.bn.training, self.drop.training))
        return (self.drop(x) > 0).float()


def test_mc_dropout_raises_without_dropout_and_keeps_flags():
    net = torch.nn.Sequential(torch.nn.Conv1d(1, 1, 1), torch.nn.Sigmoid())
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_agreement(net, torch.rand(1, 1, 4), n=3)
    zero = torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Sigmoid())
    with pytest.raises(ValueError, match="no dropout"):
        mc_dropout_agreement(zero, torch.rand(1, 1, 4), n=3)


def test_mc_dropout_modes_value_and_restore():
    net = DropNet()
    net.train()
    net.bn.eval()  # a mixed state that must come back exactly
    before = {n: m.training for n, m in net.named_modules()}
    x = torch.ones(2, 1, 64)
    rng_before = torch.get_rng_state()
    score = mc_dropout_agreement(net, x, n=5, seed=3)
    assert {n: m.training for n, m in net.named_modules()} == before
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is untouched
    assert net.seen == [(False, True)] * 5  # BatchNorm in eval, dropout in train, during the passes

    # Reference: the same masks drawn by hand, pairwise Dice in NumPy.
    torch.manual_seed(3)
    masks = [(torch.nn.functional.dropout(x, 0.5, training=True) > 0).numpy().reshape(2, -1) for _ in range(5)]
    ref = np.zeros(2)
    for a, b in itertools.combinations(masks, 2):
        ref += 2 * (a & b).sum(1) / (a.sum(1) + b.sum(1))
    ref /= 10
    np.testing.assert_allclose(score.numpy(), ref, rtol=1e-6)
    assert 0.3 < float(score.mean()) < 0.7  # about 1/2 for independent masks of rate 1/2
    assert torch.equal(mc_dropout_agreement(net, x, n=5, seed=3), score)


def test_mc_dropout_restores_flags_when_a_pass_raises():
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.BatchNorm1d(1))
    net.eval()

    def broken(t: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mc_dropout_agreement(net, torch.rand(1, 1, 4), broken, n=2)
    assert not any(m.training for m in net.modules())


def test_mc_dropout_with_predict_callable_and_3d():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 1), torch.nn.Dropout3d(0.3))
    x = torch.rand(2, 1, 4, 4, 4)
    score = mc_dropout_agreement(net, x, lambda t: torch.sigmoid(net(t)), n=4)
    assert score.shape == (2,) and bool(((score >= 0) & (score <= 1)).all())
    assert net.training  # as found
