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


# ----------------------------------------------------------------------------- deep ensemble
from segability.errors import UsageError  # noqa: E402
from segability.estimation.baselines import (  # noqa: E402
    ensemble_agreement,
    ensemble_members,
    ensemble_scores,
    forward_passes,
    stream_ensemble_scores,
)


def _toy_member(bias: float) -> dict[str, torch.Tensor]:
    """A 1x1 convolution (weight 10): foreground where x > -bias / 10, probability sigmoid(10 x + bias)."""
    return {"weight": torch.full((1, 1, 1, 1), 10.0, dtype=torch.float64), "bias": torch.tensor([bias], dtype=torch.float64)}


def test_ensemble_pairwise_dice_of_two_toy_models_by_hand():
    # x: one row 0.1 ... 0.6; member 0 (bias -2.5) marks x > 0.25 -> 4 pixels {0.3 .. 0.6};
    # member 1 (bias -4.5) marks x > 0.45 -> 2 pixels {0.5, 0.6}. Dice = 2 * 2 / (4 + 2) = 2/3.
    # image 2: x = 0 -> both empty -> Dice 1 (they agree).
    net = torch.nn.Conv2d(1, 1, 1).double()
    net.load_state_dict(_toy_member(-2.5))
    members = ensemble_members(net, [_toy_member(-4.5)], names=["b.pt"])
    assert members[0] is net and members[1] is not net
    predicts = [lambda x, m=m: torch.sigmoid(m(x)) for m in members]
    x = torch.stack([torch.tensor([[[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]]), torch.zeros(1, 1, 6)]).double()
    torch.testing.assert_close(ensemble_agreement(predicts, x), torch.tensor([2 / 3, 1.0]))
    # three members: add one marking x > 0.35 -> {0.4, 0.5, 0.6}: pairs 2*3/7, 2*2/5 and 2/3
    members3 = ensemble_members(net, [_toy_member(-4.5), _toy_member(-3.5)])
    predicts3 = [lambda x, m=m: torch.sigmoid(m(x)) for m in members3]
    expected = (2 / 3 + 6 / 7 + 4 / 5) / 3
    assert float(ensemble_agreement(predicts3, x[:1])[0]) == pytest.approx(expected, abs=1e-6)
    # the entropy of the members' mean probability, by hand
    scores = ensemble_scores(predicts, x)
    p0 = 1 / (1 + np.exp(-(10 * np.arange(1, 7) / 10 - 2.5)))
    p1 = 1 / (1 + np.exp(-(10 * np.arange(1, 7) / 10 - 4.5)))
    expected_entropy = -np.mean([h(p) for p in (p0 + p1) / 2])
    assert float(scores["ensemble_entropy"][0]) == pytest.approx(expected_entropy, abs=1e-6)  # x was float32
    assert float(scores["ensemble_dice"][0]) == pytest.approx(2 / 3, abs=1e-6)


def test_ensemble_multiclass_target_and_stream():
    # two "models" returning fixed softmax maps: target 1 where argmax == 1
    a = torch.tensor([[[0.1, 0.2, 0.7, 0.1]], [[0.8, 0.1, 0.2, 0.3]], [[0.1, 0.7, 0.1, 0.6]]]).permute(1, 0, 2)[None]
    b = torch.tensor([[[0.1, 0.7, 0.1, 0.1]], [[0.8, 0.2, 0.8, 0.8]], [[0.1, 0.1, 0.1, 0.1]]]).permute(1, 0, 2)[None]
    a = a.reshape(1, 3, 4)  # class 1 (argmax) at pixels 0 ... -> a: {0}, b: {0, 2, 3}
    b = b.reshape(1, 3, 4)
    x = torch.zeros(1, 1, 4)
    members = [lambda t: a, lambda t: b]
    # a: argmax per pixel of [[.1,.2,.7,.1],[.8,.1,.2,.3],[.1,.7,.1,.6]] -> 1, 2, 0, 2 -> target 1 at {0};
    # b: [[.1,.7,.1,.1],[.8,.2,.8,.8],[.1,.1,.1,.1]] -> 1, 0, 1, 1 -> {0, 2, 3}; Dice 2 * 1 / 4
    torch.testing.assert_close(ensemble_agreement(members, x, target=1), torch.tensor([0.5]))
    out = stream_ensemble_scores(members, [("i", x[0])], target=1)
    assert out["image"] == ["i"] and out["ensemble_dice"] == [0.5]


def test_ensemble_weights_that_do_not_fit_name_the_argument_and_file():
    net = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(UsageError, match=r"ensemble_weights: wrong\.pt does not fit") as err:
        ensemble_members(net, [{"weight": torch.ones(2, 1, 1, 1), "bias": torch.zeros(2)}], names=["wrong.pt"])
    assert err.value.argument == "ensemble_weights" and "weight (2, 1, 1, 1) vs (1, 1, 1, 1)" in str(err.value)
    with pytest.raises(UsageError, match="keys missing: bias"):
        ensemble_members(net, [{"weight": torch.ones(1, 1, 1, 1)}], names=["half.pt"])
    with pytest.raises(UsageError, match="at least one"):
        ensemble_members(net, [])
    with pytest.raises(ValueError, match="at least two"):
        ensemble_agreement([lambda t: t], torch.rand(1, 1, 4))


def test_forward_passes():
    assert [forward_passes(m) for m in ("entropy", "max_prob_foreground", "boundary_confidence")] == [1, 1, 1]
    assert forward_passes("tta_flip", spatial_dims=3) == 4 and forward_passes("mc_dropout", n_mc=8) == 8
    assert forward_passes("ensemble_dice", n_members=3) == 3
    with pytest.raises(ValueError, match="n_members"):
        forward_passes("ensemble_dice")


def test_evaluate_qc_ensemble_weights(tmp_path):
    """``evaluate-qc --ensemble-weights``: a member with the model's own weights agrees fully (Dice 1 on
    every image); a file of another architecture is a usage error naming the flag and the file."""
    import pandas as pd
    from typer.testing import CliRunner

    from data_factories import make_png_folder, write_model_file
    from segability.cli.app import app
    from segability.io import load_model

    images, labels = make_png_folder(tmp_path, n=8, size=24, corrupt=False, orphan=False)
    spec = f"{write_model_file(tmp_path)}:tiny_net"
    same = tmp_path / "same.pt"
    torch.save(load_model(spec).state_dict(), same)
    wrong = tmp_path / "wrong.pt"
    torch.save(torch.nn.Conv2d(1, 3, 1).state_dict(), wrong)
    run = CliRunner().invoke
    base = ["evaluate-qc", "--model", spec, "--images", str(images), "--labels", str(labels), "--seeds", "0", "--no-progress"]
    res = run(app, [*base, "--out", str(tmp_path / "e"), "--ensemble-weights", str(same), "--ensemble-weights", str(same)])
    assert res.exit_code == 0, res.output
    scores = pd.read_csv(tmp_path / "e" / "qc_scores.csv")
    assert scores["ensemble_dice"].tolist() == [1.0] * 8
    # the ensemble's mean probability is the model's own: its entropy is the entropy baseline
    np.testing.assert_allclose(scores["ensemble_entropy"], scores["entropy"], atol=1e-6)
    assert {"ensemble_dice", "ensemble_entropy"} <= set(pd.read_csv(tmp_path / "e" / "qc_comparison.csv")["method"])
    res = run(app, [*base, "--out", str(tmp_path / "w"), "--ensemble-weights", str(wrong)])
    assert res.exit_code == 2
    assert "--ensemble-weights" in res.output and "wrong.pt" in res.output
