"""What a new user ran into (issue #15): nnU-Net raw names, checkpoints of the common trainers,
SimpleITK's axis order, and a default layer choice that covers every stage of UNETR, SwinUNETR
and nnU-Net's networks."""

from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import segability
from data_factories import write_model_file
from segability.analysis.features import layer_names
from segability.capture import conv_layers, default_layers
from segability.cli.app import app
from segability.errors import UsageError
from segability.io import load_item, load_model, load_state_dict, pair_labels, read_image
from segability.io.reading import read_channels


# ------------------------------------------------------------------------------------ pairing
def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4) if affine is None else affine), path)
    return path


def _nnunet_raw(root, cases=("la_003", "la_007"), channels=2, shape=(5, 4, 3)):
    """imagesTr/{case}_{c:04d}.nii.gz (channel c filled with 10 * case index + c) and labelsTr/{case}.nii.gz."""
    images, labels = root / "imagesTr", root / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    for i, case in enumerate(cases):
        for c in range(channels):
            _nifti(images / f"{case}_{c:04d}.nii.gz", np.full(shape, 10 * i + c))
        _nifti(labels / f"{case}.nii.gz", np.zeros(shape))
    return images, labels


def test_nnunet_raw_names_pair_and_channel_files_make_one_image(tmp_path):
    images, labels = _nnunet_raw(tmp_path)
    files = segability.io.find_images(images)
    pairing = pair_labels(files, labels)
    assert [(i.name, lab.name) for i, lab in pairing.pairs] == [
        ("la_003_0000.nii.gz", "la_003.nii.gz"), ("la_007_0000.nii.gz", "la_007.nii.gz"),
    ]  # fmt: skip
    assert pairing.unpaired_images == [] and pairing.unpaired_labels == []
    first = pairing.pairs[1][0]
    assert [p.name for p in pairing.image_files(first)] == ["la_007_0000.nii.gz", "la_007_0001.nii.gz"]
    x, y = load_item(pairing.image_files(first), pairing.pairs[1][1])
    assert x.shape == (2, 5, 4, 3) and y.shape == (1, 5, 4, 3)
    assert x[0].unique().tolist() == [10.0] and x[1].unique().tolist() == [11.0]  # channel order kept


def test_nnunet_single_channel_and_label_suffix(tmp_path):
    images, labels = _nnunet_raw(tmp_path, channels=1)
    for f in labels.iterdir():
        f.rename(labels / f.name.replace(".nii.gz", "_seg.nii.gz"))
    pairing = pair_labels(segability.io.find_images(images), labels, label_suffix="_seg")
    assert [(i.name, lab.name) for i, lab in pairing.pairs] == [
        ("la_003_0000.nii.gz", "la_003_seg.nii.gz"), ("la_007_0000.nii.gz", "la_007_seg.nii.gz"),
    ]  # fmt: skip
    assert pairing.channels == {}
    assert pairing.image_files(pairing.pairs[0][0]) == pairing.pairs[0][0]


def test_exact_stems_pair_first_and_partial_pairing_is_reported(tmp_path):
    images = [tmp_path / n for n in ("a_0000.png", "b_0000.png", "c.png")]
    labels = tmp_path / "labels"
    labels.mkdir()
    for n in ("a_0000.png", "b.png", "z.png"):  # a by its own stem, b by nnU-Net's rule, c by none
        (labels / n).write_bytes(b"")
    pairing = pair_labels(images, labels)
    assert [(i.name, None if lab is None else lab.name) for i, lab in pairing.pairs] == [
        ("a_0000.png", "a_0000.png"), ("b_0000.png", "b.png"), ("c.png", None),
    ]  # fmt: skip
    assert [p.name for p in pairing.unpaired_labels] == ["z.png"]
    assert "1 image(s) without a label" in pairing.describe()


def test_labels_that_pair_with_no_image_are_refused(tmp_path):
    images = [tmp_path / f"scan{i}.png" for i in range(7)]
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(3):
        (labels / f"mask{i}.png").write_bytes(b"")
    with pytest.raises(UsageError) as err:
        pair_labels(images, labels, argument="labels")
    assert err.value.argument == "labels"
    message = str(err.value)
    assert "no image pairs with a label" in message
    assert "'scan0', 'scan1', 'scan2', 'scan3', 'scan4'] ..." in message and "'mask0', 'mask1', 'mask2']" in message
    assert "case1_0000.nii.gz" in message and "label_suffix" in message  # the rules


def test_cli_exits_2_naming_labels_when_nothing_pairs(tmp_path):
    nets = write_model_file(tmp_path / "models")
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(2):
        np.save(images / f"case{i}.npy", np.zeros((1, 8, 8), np.float32))
        np.save(labels / f"label{i}.npy", np.zeros((1, 8, 8), np.float32))
    result = CliRunner().invoke(app, ["analyze", "--model", f"{nets}:tiny_net", "--images", str(images), "--labels", str(labels),
                                      "--out", str(tmp_path / "out"), "--no-report", "--no-progress"])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "--labels" in result.stderr and "no image pairs with a label" in result.stderr
    assert not (tmp_path / "out" / "layers.parquet").exists()


def test_channel_files_without_labels(tmp_path):
    images, _ = _nnunet_raw(tmp_path, channels=3)
    pairing = pair_labels(segability.io.find_images(images), None)
    assert [i.name for i, _ in pairing.pairs] == ["la_003_0000.nii.gz", "la_007_0000.nii.gz"]
    assert [len(v) for v in pairing.channels.values()] == [3, 3]
    years = [tmp_path / "scan_2019.png", tmp_path / "scan_2020.png"]  # not channels: no 0000
    assert pair_labels(years, None).pairs == [(years[0], None), (years[1], None)]
    mixed = [tmp_path / "a.png", tmp_path / "a.nii.gz"]  # label-free runs never needed unique stems
    assert len(pair_labels(mixed, None).pairs) == 2


def test_incomplete_channel_files_are_an_error(tmp_path):
    images, labels = _nnunet_raw(tmp_path, channels=3)
    (images / "la_007_0001.nii.gz").unlink()
    with pytest.raises(ValueError, match="'la_007' has the channel files 0000, 0002"):
        pair_labels(segability.io.find_images(images), labels)
    with pytest.raises(ValueError, match="different spatial shapes"):
        _nifti(tmp_path / "big.nii.gz", np.zeros((6, 4, 3)))
        read_channels([images / "la_003_0000.nii.gz", tmp_path / "big.nii.gz"])


# -------------------------------------------------------------------------------- checkpoints
def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.Conv3d(4, 2, 1))


def _reference_state():
    torch.manual_seed(1)
    return {k: torch.randn_like(v) for k, v in _tiny().state_dict().items()}


def _check_loaded(path, state):
    net = load_model(_tiny, path)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


def test_nnunet_checkpoint_loads(tmp_path):
    state = _reference_state()
    checkpoint = {  # as nnUNetTrainer.save_checkpoint writes it (numpy scalars in the logs)
        "network_weights": state,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5), np.float32(0.6)], "ema_fg_dice": [np.nanmean([0.1, 0.2])]},
        "_best_ema": np.float64(0.7),
        "current_epoch": 3,
        "init_args": {"plans": {"configurations": {"3d_fullres": {"patch_size": [64, 64, 64]}}}, "configuration": "3d_fullres",
                      "fold": 0, "device": torch.device("cpu")},  # fmt: skip
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    torch.save(checkpoint, tmp_path / "checkpoint_final.pth")
    _check_loaded(tmp_path / "checkpoint_final.pth", state)
    compiled = {**checkpoint, "network_weights": {f"_orig_mod.{k}": v for k, v in state.items()}}  # torch.compile
    torch.save(compiled, tmp_path / "compiled.pth")
    _check_loaded(tmp_path / "compiled.pth", state)


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()} | {"criterion.weight": torch.ones(2)},
                                "epoch": 4, "hyper_parameters": {"lr": 0.1}}, id="lightning-model-prefix-and-loss-buffer"),  # fmt: skip
        pytest.param(lambda s: {"state_dict": {f"net.{k}": v for k, v in s.items()}}, id="lightning-net-prefix"),
        pytest.param(lambda s: {f"module.{k}": v for k, v in s.items()}, id="ddp"),
        pytest.param(lambda s: {"state_dict": {f"module.model.{k}": v for k, v in s.items()}}, id="ddp-around-lightning"),
        pytest.param(lambda s: dict(s), id="monai-bundle-model.pt"),
        pytest.param(lambda s: {"model": s, "optimizer": {"state": {}}, "epoch": 2}, id="monai-checkpoint-saver"),
        pytest.param(lambda s: {"checkpoint": 1, "state_dict": {"model": s}}, id="nested-once"),
    ],
)
def test_common_checkpoints_load(tmp_path, wrap):
    state = _reference_state()
    torch.save(wrap(state), tmp_path / "w.pt")
    _check_loaded(tmp_path / "w.pt", state)


def test_unknown_checkpoint_names_its_keys_and_the_understood_ones(tmp_path):
    torch.save({"ema": {"w": torch.ones(1)}, "epoch": 3, "weights_ema": {"x": 1}}, tmp_path / "w.pt")
    with pytest.raises(UsageError) as err:
        load_state_dict(tmp_path / "w.pt")
    message = str(err.value)
    assert "its top-level keys are 'ema', 'epoch', 'weights_ema'" in message
    for key in ("'state_dict'", "'network_weights'", "'model'", "'module.'", "'_orig_mod.'"):
        assert key in message


# ----------------------------------------------------------------- SimpleITK vs nibabel order
def test_simpleitk_and_nibabel_read_the_same_xyz_array(tmp_path):
    """segability reads NIfTI through MONAI's NibabelReader only (no SimpleITK / ITKReader in
    segability.io): arrays are in the file's voxel order (i, j, k), as ``nib.load(f).get_fdata()``.
    SimpleITK's ``GetArrayFromImage`` gives (k, j, i); transposed, it is the same array, and its
    LPS geometry is nibabel's RAS affine with the first two axes flipped."""
    sitk = pytest.importorskip("SimpleITK")
    data = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)  # every voxel distinct, no symmetric axis
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [1.5, 0.0, 0.0, -4.0], [0.0, 0.0, 3.0, 7.0], [0, 0, 0, 1]])
    path = _nifti(tmp_path / "v.nii.gz", data, affine)
    ours = read_image(path)[0].numpy()
    np.testing.assert_array_equal(ours, data)
    np.testing.assert_array_equal(np.asarray(nib.load(path).dataobj), data)
    itk = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), ours)
    assert itk.GetSize() == data.shape
    lps = np.diag([-1.0, -1.0, 1.0])
    direction = np.array(itk.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(lps @ direction @ np.diag(itk.GetSpacing()), affine[:3, :3], atol=1e-5)
    np.testing.assert_allclose(lps @ np.array(itk.GetOrigin()), affine[:3, 3], atol=1e-5)


# --------------------------------------------------------------------------- default layers
def _dna(kind: str, dims: int = 3) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if dims == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    common = dict(conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=False)  # fmt: skip
    torch.manual_seed(0)
    if kind == "plain":
        return PlainConvUNet(1, 4, [4, 8, 16, 16], conv, 3, [1, 2, 2, 2], 2, 2, 2, **common).eval()
    return ResidualEncoderUNet(1, 4, [4, 8, 16, 16], conv, 3, [1, 2, 2, 2], [1, 2, 2, 2], 2, 1, **common).eval()


def _unetr(dims: int = 3) -> nn.Module:
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    return UNETR(1, 2, (32,) * dims, feature_size=12, hidden_size=24, mlp_dim=48, num_heads=2, spatial_dims=dims).eval()


def _swin(dims: int = 3) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    return SwinUNETR(1, 2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), spatial_dims=dims).eval()


STAGES = [f"encoder.stages.{i}" for i in range(4)] + [f"decoder.stages.{i}" for i in range(3)]


@pytest.mark.parametrize(
    ("build", "expected", "shape"),
    [
        pytest.param(lambda: _unetr(3), [f"vit.blocks.{i}" for i in range(12)], (1, 1, 32, 32, 32), id="monai-unetr-3d"),
        # Swin needs 32x the input at the bottom (instance norm of one voxel fails): 64 per side, 2D to stay fast.
        pytest.param(lambda: _swin(2), [f"swinViT.layers{i}.0" for i in range(1, 5)], (1, 1, 64, 64), id="monai-swinunetr-2d"),
        pytest.param(lambda: _dna("plain"), STAGES, (1, 1, 32, 32, 32), id="dna-plainconvunet-3d"),
        pytest.param(lambda: _dna("residual"), STAGES, (1, 1, 32, 32, 32), id="dna-residualencoderunet-3d"),
    ],
)
def test_default_layers_cover_every_stage_and_all_are_called(build, expected, shape):
    net = build()
    names = layer_names(net, "auto")
    modules = dict(net.named_modules())
    for name in expected:
        assert name in names
    assert not any(isinstance(modules[n], (nn.ModuleList, nn.ModuleDict)) for n in names)
    if expected is STAGES:  # one row per stage: nothing else of the encoder / decoder (no uncalled seg heads)
        assert names == STAGES
    else:  # no block inside a chosen stage or block, and every other convolution as before
        assert not any(a.startswith(b + ".") for a in names for b in names)
        outside = [c for c in conv_layers(net) if not any(c.startswith(e + ".") for e in expected)]
        assert [n for n in names if n not in expected] == outside
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = segability.analyze(net, torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    rows = res.layers.set_index("layer")
    assert list(rows.index) == ["input", *names]
    assert (rows["status"] == "ok").all(), rows[rows["status"] != "ok"][["status", "reason"]]
    assert rows["sa_pred"].between(0, 1).all()


def test_default_layers_of_3d_swin_are_its_called_stages():
    names = default_layers(_swin(3))
    assert [n for n in names if n.startswith("swinViT.layers")] == [f"swinViT.layers{i}.0" for i in range(1, 5)]
    assert "swinViT.layers1" not in names  # the ModuleList: never called itself


def test_plain_conv_nets_keep_every_convolution():
    from monai.networks.nets import BasicUNet, UNet

    for net in (UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
                BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4))):  # fmt: skip
        assert default_layers(net) == conv_layers(net) != []


def test_a_handmade_transformer_stack_picks_its_blocks_not_the_whole_encoder():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.mlp = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.mlp(self.attn(x, x, x)[0])

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(1, 8, 4, stride=4)
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            for b in self.blocks:
                t = b(t)
            return t

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(Encoder())  # one element holding blocks: not a "stage of blocks"
            self.head = nn.Conv2d(8, 1, 1)

        def forward(self, x):
            t = self.layers(x)
            g = t.transpose(1, 2).reshape(x.shape[0], 8, x.shape[2] // 4, x.shape[3] // 4)
            return nn.functional.interpolate(self.head(g), size=x.shape[2:])

    net = Net().eval()
    names = default_layers(net)
    assert names == ["layers.0.embed", "layers.0.blocks.0", "layers.0.blocks.1", "layers.0.blocks.2", "head"]
    res = segability.analyze(net, torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert (res.layers["status"] == "ok").all()


TWO_CHANNELS = '''
import torch
from torch import nn


def two_channel_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 4, 1), nn.ReLU(), nn.Conv3d(4, 1, 1))
'''


def test_a_file_run_reads_every_channel_file_of_a_case(tmp_path):
    """analyze on an nnU-Net raw folder of two channel files per case: the model gets both, and the
    tables equal the analysis of the stacked tensors; the channel files enter the resume fingerprint."""
    rng = np.random.default_rng(0)
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    xs, ys = [], []
    for case in ("a", "b"):
        x = rng.random((2, 6, 5, 4)).astype(np.float32)
        y = (x[0] > 0.5).astype(np.float32)
        for c in range(2):
            _nifti(images / f"{case}_{c:04d}.nii.gz", x[c])
        _nifti(labels / f"{case}.nii.gz", y)
        xs.append(torch.from_numpy(x))
        ys.append(torch.from_numpy(y)[None])
    (tmp_path / "nets.py").write_text(TWO_CHANNELS)
    args = ["analyze", "--model", f"{tmp_path / 'nets.py'}:two_channel_net", "--images", str(images), "--labels", str(labels),
            "--out", str(tmp_path / "run"), "--no-report", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run = segability.load_result(tmp_path / "run")
    net = load_model(f"{tmp_path / 'nets.py'}:two_channel_net")
    direct = segability.analyze(net, torch.stack(xs), torch.stack(ys), ids=["a_0000.nii.gz", "b_0000.nii.gz"])
    np.testing.assert_allclose(run.layers["sa"], direct.layers["sa"], atol=1e-6)
    np.testing.assert_allclose(run.images["dice"], direct.images["dice"], atol=1e-9)
    import json

    fingerprint = json.loads((tmp_path / "run" / "shards" / "run.json").read_text())
    assert fingerprint["channel_files"] == {"a_0000.nii.gz": ["a_0001.nii.gz"], "b_0000.nii.gz": ["b_0001.nii.gz"]}
