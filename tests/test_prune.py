"""SA-guided pruning: rankings checked on a network whose unit SA and filter norms are known by
construction, masking hooks that never leak, the Dice curve against a hand computation."""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from segability.prune import (
    filter_l1,
    mask_units,
    output_dice,
    plot_prune_curve,
    prunable_layers,
    prune_curve,
    unit_scores,
    units_to_prune,
)

# ----------------------------------------------------------------------------- a known network
# feat: 1x1 conv, unit 0 = 0.5 * input channel 0 (the label as +-1 plus small noise), unit 1 =
# -3 * input channel 1 (pure noise). head: 4 * unit 0 + 0.1 * unit 1. So unit 0 segments the label
# perfectly (SA 1) but has the smaller filter (L1 0.5 < 3).


def toy_model() -> nn.Module:
    net = nn.Sequential(OrderedDict(feat=nn.Conv2d(2, 2, 1), head=nn.Conv2d(2, 1, 1)))
    with torch.no_grad():
        net.feat.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, -3.0]]).view(2, 2, 1, 1))
        net.feat.bias.zero_()
        net.head.weight.copy_(torch.tensor([4.0, 0.1]).view(1, 2, 1, 1))
        net.head.bias.zero_()
    return net.eval()


def toy_data(n: int = 6, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        r, c = rng.integers(0, size - 5, 2)
        h, w = rng.integers(3, 6, 2)
        labels[i, 0, r : r + h, c : c + w] = 1
    signal = (2 * labels - 1) + 0.3 * rng.uniform(-1, 1, labels.shape)
    noise = rng.normal(size=labels.shape)
    images = np.concatenate([signal, noise], axis=1).astype(np.float32)
    return torch.from_numpy(images), torch.from_numpy(labels)


def np_dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Mean over images of the Dice of binary maps (both empty: 1), float64."""
    out = []
    for p, t in zip(pred.astype(np.float64), label.astype(np.float64), strict=True):
        den = p.sum() + t.sum()
        out.append(1.0 if den == 0 else 2 * (p * t).sum() / den)
    return float(np.mean(out))


def np_unit_sa(feature: np.ndarray, label: np.ndarray) -> float:
    """Direct ProtoSeg of one channel with the label as guide: mean Dice over images (float64)."""
    out = []
    for f, t in zip(feature.astype(np.float64), label.astype(np.float64), strict=True):
        fg, bg = f[t == 1].mean(), f[t == 0].mean()
        seg = (np.abs(f - fg) < np.abs(f - bg)).astype(np.float64)
        out.append(2 * (seg * t).sum() / (seg.sum() + t.sum()))
    return float(np.mean(out))


# ----------------------------------------------------------------------------- layers and scores
def test_the_output_convolution_is_never_a_candidate():
    x, _ = toy_data()
    assert prunable_layers(toy_model(), x) == {"feat": 2}


def test_unet_head_is_excluded_and_every_other_convolution_kept():
    from monai.networks.nets import UNet

    from segability import list_layers

    torch.manual_seed(0)
    net = UNet(2, 1, 1, channels=(4, 8), strides=(2,), num_res_units=1)
    x = torch.rand(1, 1, 16, 16)
    convs = [info for info in list_layers(net, x) if info.type in ("Conv2d", "ConvTranspose2d")]
    # In this UNet the only 1-channel convolutions are the last up-convolution and its residual unit.
    expected = {info.name: info.shape[0] for info in convs if info.shape[0] != 1}
    assert len(expected) < len(convs)
    assert prunable_layers(net, x) == expected
    assert list(prunable_layers(net, x)) == [info.name for info in convs if info.shape[0] != 1]


def test_sa_ranking_matches_a_direct_computation_and_ranks_the_label_unit_first():
    x, y = toy_data()
    scores = unit_scores(toy_model(), x, y, ranking="sa")
    assert list(scores) == ["feat"]
    unit0 = 0.5 * x[:, 0].numpy()
    unit1 = -3.0 * x[:, 1].numpy()
    assert scores["feat"][0].item() == pytest.approx(1.0, abs=1e-12)
    assert scores["feat"][1].item() == pytest.approx(np_unit_sa(unit1, y[:, 0].numpy()), abs=1e-6)
    assert np_unit_sa(unit0, y[:, 0].numpy()) == pytest.approx(1.0)
    assert scores["feat"][1] < 0.8


def test_l1_ranking_follows_the_weights_set():
    x, y = toy_data()
    scores = unit_scores(toy_model(), x, y, ranking="l1")
    torch.testing.assert_close(scores["feat"], torch.tensor([0.5, 3.0], dtype=torch.float64))


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(4, 6, 3, groups=2), nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ConvTranspose3d(2, 3, 2), nn.Conv1d(3, 5, 3)],
    ids=["conv2d-groups", "convT2d-groups", "convT3d", "conv1d"],
)
def test_filter_l1_sums_each_output_channels_weights(conv):
    torch.manual_seed(1)
    w = conv.weight.detach().double()
    out_channels = conv.out_channels
    expected = torch.zeros(out_channels, dtype=torch.float64)
    transposed = isinstance(conv, (nn.ConvTranspose2d, nn.ConvTranspose3d))
    for o in range(out_channels):
        if transposed:  # weight (in, out/g, *k): output o reads inputs of its group only
            per = out_channels // conv.groups
            g, j = divmod(o, per)
            rows = range(g * conv.in_channels // conv.groups, (g + 1) * conv.in_channels // conv.groups)
            expected[o] = sum(w[r, j].abs().sum() for r in rows)
        else:
            expected[o] = w[o].abs().sum()
    torch.testing.assert_close(filter_l1(conv), expected)


def test_random_ranking_is_seeded():
    x, y = toy_data()
    a = unit_scores(toy_model(), x, y, ranking="random", seed=3)
    b = unit_scores(toy_model(), x, y, ranking="random", seed=3)
    c = unit_scores(toy_model(), x, y, ranking="random", seed=4)
    torch.testing.assert_close(a["feat"], b["feat"])
    assert not torch.equal(a["feat"], c["feat"])


def test_bad_rankings_and_inputs_are_named():
    x, y = toy_data()
    with pytest.raises(ValueError, match="ranking"):
        unit_scores(toy_model(), x, y, ranking="taylor")
    with pytest.raises(ValueError, match="labels"):
        unit_scores(toy_model(), x, None, ranking="sa")
    with pytest.raises(ValueError, match="fraction"):
        units_to_prune({"a": torch.ones(3)}, 1.5)
    with pytest.raises(ValueError, match="scope"):
        units_to_prune({"a": torch.ones(3)}, 0.5, "net")


# ----------------------------------------------------------------------------- choosing units
def test_units_to_prune_per_layer_and_global_by_hand():
    s = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0, 40.0])}
    assert units_to_prune(s, 0.0) == {"a": [], "b": []}
    assert units_to_prune(s, 0.5) == {"a": [0], "b": [0]}  # floor(1.5) = 1, floor(1) = 1
    assert units_to_prune(s, 0.4, "global") == {"a": [0, 1], "b": []}
    # L2-normalised: a / 3.742 = [.267, .535, .802], b / 41.23 = [.243, .970]
    assert units_to_prune(s, 0.4, "global", normalize=True) == {"a": [0], "b": [0]}
    assert units_to_prune({"a": torch.arange(10.0)}, 0.3) == {"a": [0, 1, 2]}  # 0.3 * 10 is 3, not 2
    assert units_to_prune({"a": torch.tensor([0.5, math.nan, 0.1])}, 0.34) == {"a": [1]}  # NaN first


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.lists(st.floats(-5, 5), min_size=1, max_size=7), min_size=1, max_size=4),
    st.floats(0, 1),
    st.sampled_from(["layer", "global"]),
)
def test_units_to_prune_takes_the_lowest_and_the_right_count(layers, fraction, scope):
    scores = {f"l{i}": torch.tensor(v, dtype=torch.float64) for i, v in enumerate(layers)}
    chosen = units_to_prune(scores, fraction, scope)
    if scope == "layer":
        for name, s in scores.items():
            assert len(chosen[name]) == math.floor(fraction * len(s) + 1e-9)
            kept = [float(s[i]) for i in range(len(s)) if i not in chosen[name]]
            if chosen[name] and kept:
                assert max(float(s[i]) for i in chosen[name]) <= min(kept)
    else:
        total = sum(len(v) for v in layers)
        assert sum(len(v) for v in chosen.values()) == math.floor(fraction * total + 1e-9)
        pruned = [float(scores[n][i]) for n, idx in chosen.items() for i in idx]
        kept = [float(scores[n][i]) for n in scores for i in range(len(scores[n])) if i not in chosen[n]]
        if pruned and kept:
            assert max(pruned) <= min(kept)


# ----------------------------------------------------------------------------- masking
def _hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def test_mask_units_zeroes_exactly_those_channels_and_removes_its_hooks():
    net = toy_model()
    x, _ = toy_data(2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    feats = {}
    handle = net.feat.register_forward_hook(lambda m, a, o: feats.__setitem__("plain", o.detach()))
    with torch.no_grad():
        net(x)
    handle.remove()
    with mask_units(net, {"feat": [1]}), torch.no_grad():
        assert _hooks(net) == 1
        masked = net(x)
    assert _hooks(net) == 0
    expected = 4 * feats["plain"][:, :1]  # the head sees unit 0 only
    torch.testing.assert_close(masked, expected)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_mask_units_removes_its_hooks_when_the_forward_raises():
    net = toy_model()
    with pytest.raises(RuntimeError), mask_units(net, {"feat": [0]}):
        net(torch.zeros(1, 3, 4, 4))  # wrong channel count
    assert _hooks(net) == 0


def test_mask_units_rejects_unknown_layers_and_units():
    net = toy_model()
    with pytest.raises(ValueError, match="feat"), mask_units(net, {"fet": [0]}):
        pass
    with pytest.raises(ValueError, match=r"\[0, 2\)"), mask_units(net, {"feat": [2]}):
        pass
    assert _hooks(net) == 0


# ----------------------------------------------------------------------------- the curve
def test_prune_curve_against_hand_computed_dice():
    net = toy_model()
    x, y = toy_data()
    lab = y.numpy()
    unit0, unit1 = 0.5 * x[:, :1].numpy(), -3.0 * x[:, 1:].numpy()
    full = np_dice((4 * unit0 + 0.1 * unit1) > 0, lab)
    only0 = np_dice(4 * unit0 > 0, lab)  # unit 1 zeroed
    only1 = np_dice(0.1 * unit1 > 0, lab)  # unit 0 zeroed
    assert only0 == pytest.approx(1.0) and only1 < 0.8

    df = prune_curve(net, x, y, fractions=(0, 0.5), rankings=("sa", "l1", "random"), seeds=(0, 1, 2))
    assert list(df.columns) == ["ranking", "fraction", "seed", "dice", "pruned_units"]
    got = {(r.ranking, r.fraction, None if pd.isna(r.seed) else int(r.seed)): r.dice for r in df.itertuples()}
    for key, dice in got.items():
        if key[1] == 0:  # pruning 0% leaves the Dice unchanged
            assert dice == pytest.approx(full, abs=1e-12)
    assert float(output_dice(net, x, y).mean()) == pytest.approx(full, abs=1e-12)
    assert got[("sa", 0.5, None)] == pytest.approx(only0, abs=1e-12)
    assert got[("l1", 0.5, None)] == pytest.approx(only1, abs=1e-12)
    for seed in (0, 1, 2):
        dropped = units_to_prune(unit_scores(net, x, y, ranking="random", seed=seed), 0.5)["feat"]
        assert got[("random", 0.5, seed)] == pytest.approx(only1 if dropped == [0] else only0, abs=1e-12)
    assert df["pruned_units"].tolist() == [0, 1, 0, 1] + [0, 1] * 3
    assert _hooks(net) == 0


def test_prune_curve_ranks_on_a_separate_set_and_global_scope():
    net = toy_model()
    x, y = toy_data(seed=1)
    rx, ry = toy_data(seed=2)
    df = prune_curve(net, x, y, fractions=(0.5,), rankings=("sa",), scope="global", rank_images=rx, rank_labels=ry)
    # global 50% of the 2 units: the noise unit (lower SA on the ranking set) goes.
    assert df["dice"].tolist() == pytest.approx([np_dice(2 * x[:, :1].numpy() > 0, y.numpy())])


def test_prune_curve_accepts_lists_of_images_of_different_sizes():
    net = toy_model()
    x1, y1 = toy_data(2, size=12)
    x2, y2 = toy_data(2, size=10, seed=5)
    images = [*x1, *x2]
    labels = [*y1[:, 0], *y2[:, 0]]  # (H, W) labels
    df = prune_curve(net, images, labels, fractions=(0,), rankings=("l1",))
    expected = np.mean([
        np_dice(((4 * 0.5 * xi[:1] + 0.1 * -3 * xi[1:]) > 0).numpy()[None], yi[None, None].numpy())
        for xi, yi in zip(images, labels, strict=True)
    ])
    assert df["dice"].iloc[0] == pytest.approx(expected, abs=1e-12)


def test_plot_draws_one_line_per_ranking_with_the_seed_band(tmp_path):
    df = pd.DataFrame(
        {
            "ranking": ["sa", "sa", "random", "random", "random", "random"],
            "fraction": [0.0, 0.5, 0.0, 0.5, 0.0, 0.5],
            "seed": pd.array([None, None, 0, 0, 1, 1], dtype="Int64"),
            "dice": [0.9, 0.8, 0.9, 0.4, 0.9, 0.6],
        }
    )
    fig = plot_prune_curve(df, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = {line.get_label().split(" ")[0]: line.get_ydata() for line in fig.axes[0].get_lines()}
    np.testing.assert_allclose(lines["SA"], [0.9, 0.8])
    np.testing.assert_allclose(lines["random"], [0.9, 0.5])
    band = fig.axes[0].collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(0.4) and band.max() == pytest.approx(0.9)


# ----------------------------------------------------------------------------- command line
FACTORY = '''
from collections import OrderedDict
from torch import nn


def build():
    return nn.Sequential(OrderedDict(feat=nn.Conv2d(2, 2, 1), head=nn.Conv2d(2, 1, 1)))
'''


def test_cli_prune_with_a_model_file_matches_the_library(tmp_path):
    from typer.testing import CliRunner

    from segability.cli.app import app

    net = toy_model()
    x, y = toy_data(4)
    (tmp_path / "toy.py").write_text(FACTORY)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    for folder, arrays in (("img", x), ("lab", y)):
        (tmp_path / folder).mkdir()
        for i, a in enumerate(arrays):
            np.save(tmp_path / folder / f"case{i}.npy", a.numpy())
    out = tmp_path / "out"
    args = [
        "prune", "--model", f"{tmp_path / 'toy.py'}:build", "--weights", str(tmp_path / "w.pt"),
        "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"),
        "--fraction", "0,0.5", "--seeds", "0,1", "--out", str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "prune.csv")
    expected = prune_curve(net, x, y, fractions=(0, 0.5), seeds=(0, 1))
    assert list(table.columns) == ["ranking", "fraction", "seed", "dice", "pruned_units"]
    assert table["ranking"].tolist() == expected["ranking"].tolist()
    np.testing.assert_allclose(table["dice"], expected["dice"], atol=1e-9)
    assert (out / "prune.png").read_bytes()[:4] == b"\x89PNG"
    assert "fraction" in result.output and "random" in result.output

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    bad = CliRunner().invoke(app, [*args, "--force", "--rankings", "sa,taylor"])
    assert bad.exit_code == 2 and "taylor" in bad.output


def test_cli_prune_demo_ranks_on_train_and_evaluates_on_val(tmp_path, monkeypatch):
    from monai.networks.nets import UNet
    from typer.testing import CliRunner

    import segability.models
    from segability.cli.app import app
    from segability.datasets import mni_lesions

    torch.manual_seed(0)
    net = UNet(2, 1, 1, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    monkeypatch.setattr(segability.models, "load_reference_model", lambda **kw: net)
    args = ["prune", "--demo", "--n", "3", "--size", "32", "--cache-dir", str(tmp_path / "cache"),
            "--fraction", "0,0.5", "--rankings", "sa,l1", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "prune.csv")
    vx, vy = mni_lesions(3, "val", size=32, cache_dir=tmp_path / "cache").as_tensors()
    rx, ry = mni_lesions(3, "train", size=32, cache_dir=tmp_path / "cache").as_tensors()
    expected = prune_curve(net, vx, vy, fractions=(0, 0.5), rankings=("sa", "l1"), rank_images=rx, rank_labels=ry)
    np.testing.assert_allclose(table["dice"], expected["dice"], atol=1e-9)
