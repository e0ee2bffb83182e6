"""Real clients: analyze() on MONAI networks, segmentation_models_pytorch and plain user modules.

Random weights, tiny feature sizes, small inputs, CPU. Every run must give one row per chosen
layer (and the input) per image, with SA in [0, 1] or NaN with a stated reason; token and
channels-last layers must be scored, and their scores must equal those of an explicit reshape
(MONAI's own ``UNETR.proj_feat`` for the ViT tokens).
"""

from __future__ import annotations

import math

import numpy as np
import pandas.testing as pdt
import pytest
import torch
from torch import nn

from segability.analysis import analyze

monai_nets = pytest.importorskip("monai.networks.nets")

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread, so that OpenMP does not oversubscribe a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blob_labels(shape: tuple[int, ...]) -> torch.Tensor:
    """A centred box on every image: (N, *spatial) 0/1."""
    n, _, *spatial = shape
    label = torch.zeros(n, *spatial)
    label[(slice(None), *[slice(s // 4, 3 * s // 4) for s in spatial])] = 1
    return label


def check_rows(res, n_images: int, layers: list[str]) -> None:
    """One row per image and layer (+ input); SA in [0, 1] or NaN with a reason."""
    table = res.layers
    assert len(table) == n_images * (len(layers) + 1)
    assert table.groupby("image").size().tolist() == [len(layers) + 1] * n_images
    assert set(table["layer"]) == {"input", *layers}
    for column in ("sa", "sa_pred"):
        scored = table[column].notna()
        assert table.loc[scored, column].between(0.0, 1.0).all(), column
        assert (table.loc[~scored, "reason"] != "").all(), f"{column} NaN without a reason"
    assert (table.loc[table["layer"] == "input", "depth"] == 0).all()
    assert len(res.images) == n_images


def conv_names(net: nn.Module) -> list[str]:
    return [n for n, m in net.named_modules() if isinstance(m, CONVS)]


CASES = {
    "UNet-2d": (lambda: monai_nets.UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), (2, 1, 32, 32)),
    "UNet-3d": (lambda: monai_nets.UNet(3, 1, 2, channels=(4, 8), strides=(2,)), (2, 1, 16, 16, 16)),
    "BasicUNet": (lambda: monai_nets.BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)), (2, 1, 32, 32)),
    "AttentionUnet": (lambda: monai_nets.AttentionUnet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2)), (2, 1, 32, 32)),
    "SegResNet-3d": (
        lambda: monai_nets.SegResNet(
            3, init_filters=4, in_channels=1, out_channels=1, blocks_down=(1, 1), blocks_up=(1,), norm=("group", {"num_groups": 2})
        ),
        (1, 1, 16, 16, 16),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_monai_cnns_every_convolution(name):
    torch.manual_seed(0)
    build, shape = CASES[name]
    net = build()
    x = torch.rand(shape)
    res = analyze(net, x, blob_labels(shape), units=True)
    layers = conv_names(net)
    check_rows(res, shape[0], layers)
    assert (res.layers["reason"].isin(["", "empty prediction: sa_pred undefined"])).all()
    assert res.layers["sa"].notna().all()  # labels given: every layer is scored
    # depth is the forward order: the first convolution called is the encoder's first
    first = res.layers[res.layers["image"] == "0"]
    assert first["depth"].tolist() == list(range(len(layers) + 1))
    assert sorted(first["layer"]) == sorted(["input", *layers])
    # units: one row per channel of every layer
    channels = first.set_index("layer")["channels"]
    assert len(res.units) == shape[0] * int(channels.sum())
    assert res.units["sa"].between(0, 1).all()
    assert res.settings["spatial_dims"] == len(shape) - 2


def test_segresnet_conv_is_scored_before_the_in_place_residual_add():
    # MONAI's ResBlock adds the identity in place to conv2's output (x += identity); the
    # conv's row must score the conv's own output, which a hook-time reduction sees.
    torch.manual_seed(0)
    net = CASES["SegResNet-3d"][0]()
    x = torch.rand(1, 1, 16, 16, 16)
    layer = "down_layers.1.1.conv2.conv"
    hooked = analyze(net, x, layers=[layer], low_memory=True)
    kept = analyze(net, x, layers=[layer], low_memory=False)  # in-place change detected: rescored
    pdt.assert_frame_equal(hooked.layers, kept.layers)
    # the reference: the same conv wrapped so its output is copied before anything touches it
    conv = net.get_submodule(layer)

    class Copy(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner(t).clone()

    parent = net.get_submodule(layer.rsplit(".", 1)[0])
    parent.conv = Copy(conv)
    reference = analyze(net, x, layers=[layer])
    cols = ["sa", "sa_pred", "channels", "shape", "reason"]
    pdt.assert_frame_equal(hooked.layers[cols], reference.layers[cols])


def test_unetr_transformer_tokens_are_scored_like_monai_proj_feat():
    pytest.importorskip("einops", reason="MONAI's ViT blocks need einops")
    torch.manual_seed(0)
    net = monai_nets.UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=24, mlp_dim=32, num_heads=2)
    x = torch.rand(1, 1, 32, 32, 32)
    y = blob_labels(x.shape)
    res = analyze(net, x, y, layers="vit.blocks.*")  # the 12 blocks, not their sub-modules
    blocks = [f"vit.blocks.{i}" for i in range(12)]
    check_rows(res, 1, blocks)
    rows = res.layers[res.layers["layer"] != "input"]
    assert (rows["reason"] == "").all() and rows["sa"].notna().all()  # scored, not skipped
    assert (rows["shape"] == "8x24").all() and (rows["channels"] == 24).all()  # 2x2x2 patches of 16^3
    assert rows["depth"].tolist() == list(range(1, 13))
    # MONAI's own token-to-grid mapping gives the same scores
    explicit = analyze(net, x, y, layers="vit.blocks.*", reshape=net.proj_feat, low_memory=False)
    pdt.assert_frame_equal(res.layers, explicit.layers)


def test_unetr_2d_every_convolution_and_vit_block():
    pytest.importorskip("einops", reason="MONAI's ViT blocks need einops")
    torch.manual_seed(0)
    net = monai_nets.UNETR(1, 1, (32, 32), feature_size=4, hidden_size=24, mlp_dim=32, num_heads=2, spatial_dims=2)
    x = torch.rand(2, 1, 32, 32)
    res = analyze(net, x, blob_labels(x.shape), guide="label")
    check_rows(res, 2, conv_names(net) + [f"vit.blocks.{i}" for i in range(12)])  # the default: blocks too
    assert res.layers["sa"].notna().all()


SWIN_LAYERS = ["swinViT.layers*.0.blocks.0", "swinViT.layers*.0.downsample", "swinViT.layers*.0"]


@pytest.mark.parametrize(
    "shape",
    [(1, 1, 64, 64), pytest.param((1, 1, 64, 32, 32), marks=pytest.mark.slow)],
    ids=["2d", "3d"],
)
def test_swin_unetr_channels_last_stages_are_scored(shape):
    pytest.importorskip("einops", reason="MONAI's Swin blocks need einops")
    torch.manual_seed(0)
    dims = len(shape) - 2
    net = monai_nets.SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), spatial_dims=dims
    )
    x = torch.rand(shape)
    y = blob_labels(shape)
    res = analyze(net, x, y, layers=SWIN_LAYERS, guide="label", low_memory=False)
    names = [f"swinViT.layers{i}.0{part}" for i in range(1, 5) for part in (".blocks.0", ".downsample", "")]
    check_rows(res, shape[0], names)
    rows = res.layers[res.layers["layer"] != "input"]
    assert (rows["reason"] == "").all() and rows["sa"].notna().all()
    first = rows[rows["image"] == "0"].set_index("layer")
    # blocks and patch merging return channels-last (B, *grid, C); the stage returns channels-first
    assert first.loc["swinViT.layers1.0.blocks.0", "channels"] == 12
    assert first.loc["swinViT.layers1.0.blocks.0", "shape"].endswith("x12")
    for i in range(1, 5):
        # the stage output is the patch-merging output moved to channels-first: same scores
        merged, stage = first.loc[f"swinViT.layers{i}.0.downsample"], first.loc[f"swinViT.layers{i}.0"]
        assert merged["channels"] == stage["channels"] == 12 * 2**i
        assert merged[["sa", "sa_pred"]].tolist() == stage[["sa", "sa_pred"]].tolist()
    if dims == 3:
        return
    # the documented override: a reshape callable that moves the channels gives the same rows
    blocks = "swinViT.layers*.0.blocks.0"
    explicit = analyze(net, x, y, layers=blocks, guide="label", reshape=lambda t: t.movedim(-1, 1))
    cols = ["image", "channels", "shape", "sa", "sa_pred", "reason"]
    auto = res.layers[res.layers["layer"].str.contains("blocks|input")].reset_index(drop=True)
    pdt.assert_frame_equal(explicit.layers[cols], auto[cols])


def test_segmentation_models_pytorch_unet():
    smp = pytest.importorskip(
        "segmentation_models_pytorch",
        reason="segmentation_models_pytorch needs torchvision, which cannot be installed beside this torch build",
    )
    torch.manual_seed(0)
    net = smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=1, encoder_depth=3, decoder_channels=(16, 8, 4))
    x = torch.rand(2, 1, 32, 32)
    res = analyze(net, x, blob_labels(x.shape))
    check_rows(res, 2, conv_names(net))
    assert res.layers["sa"].notna().all()


class TupleNet(nn.Module):
    """A plain user module with deep supervision: returns (main logits, auxiliary logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.head = nn.Conv2d(8, 1, 1)
        self.aux = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.act(self.enc(x))
        u = self.up(self.act(self.down(f)))
        return self.head(torch.cat([f, u], 1)), self.aux(u)


class MainOnly(nn.Module):
    def __init__(self, inner: nn.Module, as_dict: bool = False) -> None:
        super().__init__()
        self.inner = inner
        self.as_dict = as_dict

    def forward(self, x: torch.Tensor):
        main, aux = self.inner(x)
        return {"aux": aux, "seg": main} if self.as_dict else main


def test_plain_module_returning_a_tuple_uses_the_first_element():
    torch.manual_seed(0)
    net = TupleNet()
    x = torch.rand(3, 1, 16, 16)
    y = blob_labels(x.shape)
    res = analyze(net, x, y, units=True)
    check_rows(res, 3, ["enc", "down", "up", "head", "aux"])
    first = res.layers[res.layers["image"] == "0"]
    assert first["layer"].tolist() == ["input", "enc", "down", "up", "head", "aux"]
    assert first["shape"].tolist() == ["1x16x16", "4x16x16", "4x8x8", "4x16x16", "1x16x16", "1x16x16"]
    # the same scores as a model returning only the main output, or a dict read by key
    main = analyze(MainOnly(net), x, y, layers=["inner.enc", "inner.down", "inner.up", "inner.head", "inner.aux"], units=True)
    with pytest.warns(UserWarning, match=r"called more than once .*'inner\.act'"):  # the ReLU is used twice
        keyed = analyze(MainOnly(net, as_dict=True), x, y, layers="inner.*", units=True, output_key="seg")
    keyed.layers = keyed.layers[keyed.layers["layer"] != "inner.act"].reset_index(drop=True)
    keyed.layers["depth"] = keyed.layers.groupby("image").cumcount()  # without the ReLU's depth
    for other in (main, keyed):
        table = other.layers.assign(layer=other.layers["layer"].str.removeprefix("inner."))
        pdt.assert_frame_equal(table, res.layers)
    with pytest.raises(ValueError, match="output_key"):
        analyze(MainOnly(net, as_dict=True), x, y)


def test_monai_metatensor_dataloader_ids_come_from_file_names():
    data = pytest.importorskip("monai.data")
    torch.manual_seed(0)
    net = monai_nets.UNet(2, 1, 1, channels=(4, 8), strides=(2,))
    items = []
    for i, folder in enumerate(["a", "b", "c"]):
        image = data.MetaTensor(torch.rand(1, 16, 16), meta={"filename_or_obj": f"/data/{folder}/case{i % 2}.nii.gz"})
        items.append({"image": image, "label": blob_labels((1, 1, 16, 16))[0][None]})
    loader = data.DataLoader(items, batch_size=2)
    res = analyze(net, loader)
    # case0 appears twice in different folders: the derived id is made unique
    assert res.images["image"].tolist() == ["case0.nii.gz", "case1.nii.gz", "case0.nii.gz#2"]
    plain = analyze(net, torch.stack([it["image"].as_tensor() for it in items]), torch.stack([it["label"] for it in items]))
    np.testing.assert_array_equal(res.layers["sa"].to_numpy(), plain.layers["sa"].to_numpy())
    assert not any(math.isnan(v) for v in res.images["dice"])


def test_3d_unet_on_the_embedded_3d_lesion_crops(tmp_path):
    """The 3D variant of the embedded data through a 3D MONAI UNet: label and label-free SA."""
    from monai.networks.nets import UNet

    from segability.datasets import mni_lesions_3d

    data = mni_lesions_3d(2, "test", size=32, seed=3, cache_dir=False)
    x, y = data.as_tensors()
    torch.manual_seed(0)
    net = UNet(3, 1, 1, channels=(4, 8), strides=(2,))
    res = analyze(net, x, y, units=True, ids=data.ids)
    assert set(res.images["image"]) == set(data.ids)
    n_layers = res.layers["layer"].nunique()
    assert len(res.layers) == 2 * n_layers and n_layers >= 3
    scored = res.layers.dropna(subset=["sa_pred"])
    assert scored["sa_pred"].between(0, 1).all() and scored["sa"].between(0, 1).all()
    assert set(res.layers["shape"].str.count("x")) == {3}  # C x D x H x W
