"""Structural pruning: the pruned network computes what the hook-zeroed one computes, shrinks,
reloads from its file; the rankings agree with hand computations; the CLI runs end to end."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from segability.compress import (  # noqa: E402
    FinetuneConfig,
    StudyConfig,
    compress_study,
    finetune,
    group_scores,
    load_pruned,
    model_cost,
    prunable_groups,
    prune_units,
    save_pruned,
    taylor_scores,
    units_for_fraction,
    zeroing_plan,
)
from segability.prune import mask_units, output_dice  # noqa: E402


# ----------------------------------------------------------------------------- networks
def reference_trained() -> nn.Module:
    from segability.models import load_reference_model

    return load_reference_model()


def basic_unet() -> nn.Module:
    from monai.networks.nets import BasicUNet

    torch.manual_seed(0)
    return BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)).eval()


def plain_conv_unet() -> nn.Module:
    try:  # dynamic_network_architectures pulls timm (and torchvision) unless installed with --no-deps
        from dynamic_network_architectures.architectures.unet import PlainConvUNet
    except ImportError as exc:
        pytest.skip(f"dynamic_network_architectures is not importable here: {exc}")
    torch.manual_seed(0)
    return PlainConvUNet(
        1, 3, (4, 8, 16), nn.Conv2d, 3, (1, 2, 2), 2, 2, 2, conv_bias=True, norm_op=nn.InstanceNorm2d,
        norm_op_kwargs={"affine": True, "eps": 1e-5}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=False,
    ).eval()


def unet_3d() -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=2).eval()


def _randomise_norms(net: nn.Module) -> nn.Module:
    """Give every norm layer a non-trivial affine map (and running statistics), so that a channel
    zeroed before the norm is not zero after it."""
    gen = torch.Generator().manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase):
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
                    m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
    return net


NETWORKS = [
    pytest.param(reference_trained, (2, 1, 32, 32), id="reference-unet-trained"),
    pytest.param(lambda: _randomise_norms(basic_unet()), (2, 1, 32, 32), id="monai-basicunet"),
    pytest.param(lambda: _randomise_norms(plain_conv_unet()), (2, 1, 32, 32), id="nnunet-plainconvunet"),
    pytest.param(lambda: _randomise_norms(unet_3d()), (2, 1, 16, 16, 16), id="monai-unet-3d"),
]


def _every_other(groups) -> dict[str, list[int]]:
    return {g.name: list(range(0, g.channels, 2)) for g in groups}


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize(("build", "shape"), NETWORKS)
def test_pruned_network_equals_the_network_zeroed_after_every_layer(build, shape):
    net = build()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    groups = prunable_groups(net, x)
    units = _every_other(groups)
    plan = zeroing_plan(net, units, x)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with mask_units(net, plan), torch.no_grad():
        zeroed = net(x)
    small = prune_units(copy.deepcopy(net), units, x)
    with torch.no_grad():
        pruned, full = small(x), net(x)
    torch.testing.assert_close(pruned, zeroed, atol=1e-5, rtol=1e-5)
    assert (full - zeroed).abs().max() > 1e-2  # the units mattered: the test can fail
    for k, v in net.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k])
    (p0, m0), (p1, m1) = model_cost(net, x), model_cost(small, x)
    assert p1 < 0.5 * p0 and m1 < 0.5 * m0  # about half the channels of every layer: ~1/4 of the cost


def test_output_convolutions_are_never_in_a_group():
    net = reference_trained()
    groups = prunable_groups(net, torch.zeros(1, 1, 32, 32))
    members = {layer for g in groups for layer in g.layers}
    assert "model.2.0.conv" not in members and "model.2.1.conv.unit0.conv" not in members  # the head
    # residual units couple their convolution with the residual one; the up path couples the
    # transposed convolution with the identity-residual unit after it
    assert groups[0].layers == ("model.0.residual", "model.0.conv.unit0.conv")
    assert groups[-1].layers == ("model.1.submodule.2.0.conv", "model.1.submodule.2.1.conv.unit0.conv")
    assert [g.channels for g in groups] == [16, 32, 64, 128, 32, 16]


def test_zeroing_only_the_convolution_is_the_same_when_norms_map_zero_to_zero():
    from segability.models import reference_unet

    net = reference_unet(channels=(4, 8, 16), strides=(2, 2)).eval()  # fresh BatchNorm: 0 -> 0
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    groups = prunable_groups(net, x)
    units = _every_other(groups)
    convs = {layer: units[g.name] for g in groups for layer in g.layers}
    with mask_units(net, convs), torch.no_grad():
        zeroed = net(x)
    with torch.no_grad():
        pruned = prune_units(copy.deepcopy(net), units, x)(x)
    torch.testing.assert_close(pruned, zeroed, atol=1e-5, rtol=1e-5)


def test_zeroing_before_a_shifted_batchnorm_differs_by_the_constant_it_leaves():
    # conv1 (1 -> 2) -> BN -> ReLU -> conv2 (2 -> 1, 3x3, zero padding). Unit 1 of conv1 zeroed
    # before the BN becomes a = relu(b - g m / sqrt(v + eps)) after it; removing the unit instead
    # removes a * sum(w2[:, 1]) in the interior, less at the borders: |difference| <= |a| sum |w2[:, 1]|.
    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 2, 1), bn=nn.BatchNorm2d(2), act=nn.ReLU(), conv2=nn.Conv2d(2, 1, 3, padding=1),
    )).eval()
    with torch.no_grad():
        net.bn.running_mean.copy_(torch.tensor([0.0, -1.0]))
        net.bn.running_var.copy_(torch.tensor([1.0, 4.0]))
        net.bn.weight.copy_(torch.tensor([1.0, 2.0]))
        net.bn.bias.copy_(torch.tensor([0.0, 0.5]))
    a = max(0.0, 0.5 - 2.0 * (-1.0) / math.sqrt(4.0 + net.bn.eps))  # 1.4999...
    w = net.conv2.weight.detach()[0, 1].double()
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with mask_units(net, {"conv1": [1]}), torch.no_grad():
        conv_zeroed = net(x).double()
    with torch.no_grad():
        pruned = prune_units(copy.deepcopy(net), {"conv1": [1]}, x)(x).double()
    diff = conv_zeroed - pruned
    torch.testing.assert_close(diff[..., 1:-1, 1:-1], torch.full_like(diff[..., 1:-1, 1:-1], a * float(w.sum())))
    assert float(diff.abs().max()) <= a * float(w.abs().sum()) + 1e-6
    assert float(diff[..., 0, 0]) == pytest.approx(a * float(w[1:, 1:].sum()), abs=1e-5)  # corner: 2x2 of the kernel
    with mask_units(net, zeroing_plan(net, {"conv1": [1]}, x)), torch.no_grad():
        torch.testing.assert_close(net(x).double(), pruned, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- artefact
def test_saved_model_reloads_to_the_same_outputs(tmp_path):
    from segability.io import load_model
    from segability.models import REFERENCE_ARCH

    net = reference_trained()
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    groups = prunable_groups(net, x)
    small = prune_units(copy.deepcopy(net), units_for_fraction(group_scores(net, groups, "l1"), 0.5), x)
    path = save_pruned(small, tmp_path / "m.pt", factory="segability.models:reference_unet",
                       factory_args=REFERENCE_ARCH, meta={"ranking": "l1"})
    again = load_pruned(path)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), atol=0, rtol=0)
    assert again.segability_meta == {"ranking": "l1"}
    assert model_cost(again, x) == model_cost(small, x)
    # as a model factory: `segability analyze --model segability.compress:load_pruned --model-arg path=...`
    loaded = load_model("segability.compress:load_pruned", model_args={"path": str(path)})
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x), atol=0, rtol=0)
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a pruned model"):
        load_pruned(tmp_path / "other.pt")


def test_a_file_runs_only_a_factory_it_may_name(tmp_path):
    # a crafted file naming any callable must not get it called
    save_pruned(nn.Conv2d(1, 1, 1), tmp_path / "evil.pt", factory="os:system", factory_args={"command": "true"})
    with pytest.raises(ValueError, match="factory="):
        load_pruned(tmp_path / "evil.pt")
    save_pruned(nn.Conv2d(1, 1, 1), tmp_path / "file.pt", factory=f"{tmp_path / 'net.py'}:build")
    with pytest.raises(ValueError, match="factory="):
        load_pruned(tmp_path / "file.pt")
    # an nn.Module class is trusted; the caller may name any factory
    conv = nn.Conv2d(2, 3, 1)
    save_pruned(conv, tmp_path / "conv.pt", factory="torch.nn:Conv2d", factory_args={"in_channels": 2, "out_channels": 3, "kernel_size": 1})
    x = torch.rand(1, 2, 4, 4)
    torch.testing.assert_close(load_pruned(tmp_path / "conv.pt")(x), conv(x))
    (tmp_path / "net.py").write_text("from torch import nn\n\ndef build():\n    return nn.Conv2d(1, 1, 1)\n")
    assert isinstance(load_pruned(tmp_path / "file.pt", factory=f"{tmp_path / 'net.py'}:build"), nn.Conv2d)


# ----------------------------------------------------------------------------- rankings
def _coupled() -> tuple[nn.Module, torch.Tensor]:
    """Two 1x1 convolutions added together (one group of 3 units), then a head."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(1, 3, 1, bias=False)
            self.b = nn.Conv2d(1, 3, 1, bias=False)
            self.head = nn.Conv2d(3, 1, 1, bias=False)

        def forward(self, x):
            return self.head(self.a(x) + self.b(x))

    net = Net().eval()
    with torch.no_grad():
        net.a.weight.copy_(torch.tensor([1.0, -4.0, 2.0]).view(3, 1, 1, 1))
        net.b.weight.copy_(torch.tensor([3.0, 0.0, -1.0]).view(3, 1, 1, 1))
        net.head.weight.copy_(torch.tensor([1.0, 1.0, 1.0]).view(1, 3, 1, 1))
    return net, torch.ones(1, 1, 2, 2)


def test_l1_of_a_group_is_the_mean_of_its_convolutions():
    net, x = _coupled()
    groups = prunable_groups(net, x)
    assert [(g.name, g.layers) for g in groups] == [("a", ("a", "b"))]
    s = group_scores(net, groups, "l1")["a"]
    torch.testing.assert_close(s, torch.tensor([(1 + 3) / 2, (4 + 0) / 2, (2 + 1) / 2], dtype=torch.float64))
    assert units_for_fraction({"a": s}, 0.34) == {"a": [2]}


def test_taylor_is_weight_times_gradient_summed_per_filter():
    net, x = _coupled()
    y = torch.zeros(1, 1, 2, 2)
    loss = lambda out, lab: ((out - lab) ** 2).sum()  # noqa: E731
    # out = sum_c (a_c + b_c) = 1 per pixel (x = 1), 4 pixels: L = 4 * 1^2, dL/dout = 2 * 1 per pixel;
    # dL/da_c = dL/db_c = 2 * 4 pixels = 8; |w g|: a = 8 * [1, 4, 2], b = 8 * [3, 0, 1]
    s = taylor_scores(net, ["a", "b"], x, y, loss=loss)
    torch.testing.assert_close(s["a"], torch.tensor([8.0, 32.0, 16.0], dtype=torch.float64))
    torch.testing.assert_close(s["b"], torch.tensor([24.0, 0.0, 8.0], dtype=torch.float64))
    g = group_scores(net, prunable_groups(net, x), "taylor", x, y, loss=loss)["a"]
    torch.testing.assert_close(g, torch.tensor([16.0, 16.0, 12.0], dtype=torch.float64))
    assert all(p.grad is None for p in net.parameters())  # gradients did not leak into .grad


def _toy_sa() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """feat unit 0 = 0.5 * channel 0 (the label as +-1 plus noise): SA 1; unit 1 = -3 * channel 1
    (pure noise, the larger filter)."""
    net = nn.Sequential(OrderedDict(feat=nn.Conv2d(2, 2, 1), head=nn.Conv2d(2, 1, 1))).eval()
    with torch.no_grad():
        net.feat.weight.copy_(torch.tensor([[0.5, 0.0], [0.0, -3.0]]).view(2, 2, 1, 1))
        net.feat.bias.zero_()
        net.head.weight.copy_(torch.tensor([4.0, 0.1]).view(1, 2, 1, 1))
        net.head.bias.zero_()
    rng = np.random.default_rng(0)
    labels = np.zeros((4, 1, 12, 12), dtype=np.float32)
    for i in range(4):
        r, c = rng.integers(0, 7, 2)
        labels[i, 0, r : r + 4, c : c + 4] = 1
    images = np.concatenate([(2 * labels - 1) + 0.3 * rng.uniform(-1, 1, labels.shape), rng.normal(size=labels.shape)], 1)
    return net, torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels)


def _np_unit_sa(feature: np.ndarray, label: np.ndarray) -> float:
    """Direct ProtoSeg of one channel with the label as guide, mean Dice over images (float64)."""
    out = []
    for f, t in zip(feature.astype(np.float64), label.astype(np.float64), strict=True):
        fg, bg = f[t == 1].mean(), f[t == 0].mean()
        seg = (np.abs(f - fg) < np.abs(f - bg)).astype(np.float64)
        out.append(2 * (seg * t).sum() / (seg.sum() + t.sum()))
    return float(np.mean(out))


def test_sa_ranks_the_unit_that_segments_the_label_first():
    net, x, y = _toy_sa()
    groups = prunable_groups(net, x)
    sa = group_scores(net, groups, "sa", x, y)["feat"]
    expected = [_np_unit_sa(w * x[:, c : c + 1].numpy(), y.numpy()) for c, w in ((0, 0.5), (1, -3.0))]
    np.testing.assert_allclose(sa.numpy(), expected, atol=1e-9)
    assert expected[0] == pytest.approx(1.0)
    assert units_for_fraction({"feat": sa}, 0.5) == {"feat": [1]}  # SA drops the noise unit
    assert units_for_fraction(group_scores(net, groups, "l1"), 0.5) == {"feat": [0]}  # L1 the signal


def test_random_ranking_is_seeded_and_global_scope_normalises_and_keeps_one_unit():
    net, x = _coupled()
    groups = prunable_groups(net, x)
    a, b = group_scores(net, groups, "random", seed=3), group_scores(net, groups, "random", seed=3)
    torch.testing.assert_close(a["a"], b["a"])
    assert not torch.equal(a["a"], group_scores(net, groups, "random", seed=4)["a"])
    s = {"p": torch.tensor([1.0, 2.0]), "q": torch.tensor([30.0, 40.0, 50.0, 60.0])}
    # L2-normalised: p / 2.236 = [.447, .894], q / 91.65 = [.327, .436, .546, .655]
    assert units_for_fraction(s, 0.5, "global") == {"p": [0], "q": [0, 1]}
    assert units_for_fraction(s, 0.5, "global", normalize=False) == {"p": [0], "q": [0]}  # p keeps its best unit
    with pytest.raises(ValueError, match="ranking"):
        group_scores(net, groups, "hessian")
    with pytest.raises(ValueError, match="ranking set"):
        group_scores(net, groups, "sa")


# ----------------------------------------------------------------------------- fine-tuning
def test_finetune_is_seeded_and_leaves_the_global_random_state():
    from segability.models import reference_unet

    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = (x > 0.6).float()
    cfg = FinetuneConfig(epochs=1, steps_per_epoch=2, batch_size=2, crop=16)
    nets = [reference_unet(channels=(4, 8), strides=(2,)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    state = torch.get_rng_state()
    losses = [finetune(n, x, y, cfg, seed=5) for n in nets]
    assert torch.equal(torch.get_rng_state(), state)
    assert losses[0] == losses[1] and len(losses[0]) == 2
    for p, q in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        assert torch.equal(p, q)
    assert not nets[0].training
    assert finetune(nets[0], x, y, FinetuneConfig(epochs=0)) == []
    with pytest.raises(ValueError, match="epochs"):
        FinetuneConfig(epochs=-1)
    with pytest.raises(ValueError, match="fractions"):
        StudyConfig(fractions=(0.0,))


# ----------------------------------------------------------------------------- study and CLI
def test_study_rows_costs_and_dice_before_fine_tuning():
    net, x, y = _toy_sa()
    cfg = StudyConfig(fractions=(0.5,), rankings=("sa", "random"), scopes=("layer",), seeds=(0, 1),
                      finetune=FinetuneConfig(epochs=0), latency_repeats=1)
    table = compress_study(net, (x, y), {"val": (x, y)}, cfg)
    assert table[["ranking", "seed"]].values.tolist() == [["none", 0], ["none", 1], ["sa", 0], ["sa", 1], ["random", 0], ["random", 1]]
    full = float(output_dice(net, x, y).mean())
    only_signal = float(output_dice(prune_units(copy.deepcopy(net), {"feat": [1]}, x), x, y).mean())
    assert table.loc[table.ranking == "none", "dice_val_before"].tolist() == pytest.approx([full, full])
    assert table.loc[table.ranking == "sa", "dice_val_before"].tolist() == pytest.approx([only_signal] * 2)
    # no fine-tuning: after == before
    np.testing.assert_allclose(table["dice_val_after"], table["dice_val_before"])
    p0, m0 = model_cost(net, x)
    row = table[table.ranking == "sa"].iloc[0]
    assert row["pruned_units"] == 1 and row["params"] == p0 - 4 and row["macs"] < m0  # a 2-weight filter, its bias, a head weight
    assert row["macs_kept"] == pytest.approx(row["macs"] / m0)


def test_cli_structural_demo_writes_a_table_a_figure_and_loadable_models(tmp_path):
    from typer.testing import CliRunner

    from segability.cli.app import app
    from segability.datasets import mni_lesions

    out = tmp_path / "out"
    args = ["prune", "--demo", "--structural", "--n", "2", "--n-train", "3", "--shift-n", "1", "--size", "32",
            "--cache-dir", str(tmp_path / "cache"), "--fraction", "0.5", "--rankings", "sa,l1", "--scope", "layer",
            "--seeds", "0", "--finetune-epochs", "1", "--finetune-steps", "2", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "prune.csv")
    assert table["ranking"].tolist() == ["none", "sa", "l1"]
    for column in ["scope", "fraction", "seed", "params", "macs", "latency_ms", "dice_val_before", "dice_val_after",
                   "dice_shift_before", "dice_shift_after", "model"]:
        assert column in table.columns
    assert (table["macs"].iloc[1:] < table["macs"].iloc[0]).all()
    assert (out / "prune_pareto.png").read_bytes()[:4] == b"\x89PNG"
    vx, vy = mni_lesions(2, "val", size=32, seed=1, cache_dir=tmp_path / "cache").as_tensors()
    for row in table.itertuples():
        model = load_pruned(out / "models" / row.model)
        assert model_cost(model, vx[:1]) == (row.params, row.macs)
        assert float(output_dice(model, vx, vy).mean()) == pytest.approx(row.dice_val_after, abs=1e-9)
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    bad = CliRunner().invoke(app, [*args, "--force", "--rankings", "sa,hessian"])
    assert bad.exit_code == 2 and "hessian" in bad.output


TOY_FACTORY = '''
from collections import OrderedDict
from torch import nn


def build():
    return nn.Sequential(OrderedDict(feat=nn.Conv2d(2, 2, 1), head=nn.Conv2d(2, 1, 1)))
'''


def test_cli_structural_with_a_model_file_fine_tunes_on_the_ranking_set(tmp_path):
    from typer.testing import CliRunner

    from segability.cli.app import app

    net, x, y = _toy_sa()
    (tmp_path / "toy.py").write_text(TOY_FACTORY)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    for folder, arrays in (("img", x), ("lab", y)):
        (tmp_path / folder).mkdir()
        for i, a in enumerate(arrays):
            np.save(tmp_path / folder / f"case{i}.npy", a.numpy())
    out = tmp_path / "out"
    common = ["prune", "--structural", "--model", f"{tmp_path / 'toy.py'}:build", "--weights", str(tmp_path / "w.pt"),
              "--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "--fraction", "0.5",
              "--rankings", "sa,l1", "--scope", "layer", "--out", str(out)]
    missing = CliRunner().invoke(app, common)
    assert missing.exit_code == 2 and "--rank-images" in missing.output
    args = [*common, "--rank-images", str(tmp_path / "img"), "--rank-labels", str(tmp_path / "lab"),
            "--finetune-epochs", "1", "--finetune-steps", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "prune.csv")
    assert table[["ranking", "seed", "pruned_units"]].values.tolist() == [["none", 0, 0], ["sa", 0, 1], ["l1", 0, 1]]
    assert "dice_shift_after" not in table.columns
    sa_before = float(output_dice(prune_units(copy.deepcopy(net), {"feat": [1]}, x), x, y).mean())
    assert table.loc[1, "dice_val_before"] == pytest.approx(sa_before, abs=1e-9)
    for row in table.itertuples():
        with pytest.raises(ValueError, match="factory="):
            load_pruned(out / "models" / row.model)  # the file names a .py file: the caller must agree to run it
        model = load_pruned(out / "models" / row.model, factory=f"{tmp_path / 'toy.py'}:build")
        assert model.feat.out_channels == (2 if row.ranking == "none" else 1)
        assert float(output_dice(model, x, y).mean()) == pytest.approx(row.dice_val_after, abs=1e-9)
