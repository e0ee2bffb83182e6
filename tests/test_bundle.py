"""MONAI bundles (``segability.io.bundle``, ``--bundle DIR``): the same SA table as the network given by
hand, and a usage error naming ``--bundle`` for each way a bundle can be broken."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from data_factories import blob
from segability.cli.app import app
from segability.io import load_item, load_preprocess
from segability.io.bundle import read_bundle

NET = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0}
PIXDIM = [1.2, 1.2, 1.2]  # no voxel of the input falls halfway between two of the analysed grid (no nearest-neighbour ties)
CONFIG = {
    "bundle_root": ".",
    "image_key": "image",
    "device": "$torch.device('cpu')",
    "network_def": {"_target_": "UNet", **NET},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": [
        {"_target_": "LoadImaged", "keys": "@image_key"},
        {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
        {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "LPS"},
        {"_target_": "Spacingd", "keys": "@image_key", "pixdim": PIXDIM, "mode": "bilinear"},
        {"_target_": "ScaleIntensityd", "keys": "@image_key"},
        {"_target_": "EnsureTyped", "keys": "@image_key"},
    ]},
    "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 1, "overlap": 0.25},
}  # fmt: skip
LAYERS = "model.0.conv,model.1.submodule.conv,model.2.conv"


def _network(seed: int = 0, **changes):
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(**{**NET, **changes}).eval()


def write_bundle(folder: Path, config: dict | None = CONFIG, weights: object = "model", name: str = "inference.json") -> Path:
    """A bundle folder: ``configs/<name>`` and ``models/model.pt`` (a checkpoint ``{"model": state dict}``)."""
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    if config is not None:
        (folder / "configs" / name).write_text(json.dumps(config))
    if weights == "model":
        torch.save({"model": _network().state_dict()}, folder / "models" / "model.pt")
    elif weights is not None:
        torch.save(weights, folder / "models" / "model.pt")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundle_data")
    (root / "images").mkdir()
    (root / "labels").mkdir()
    affine = np.array([[1.5, 0, 0, -3.0], [0, 1.0, 0, 4.0], [0, 0, 2.0, 1.0], [0, 0, 0, 1]])
    image, label = blob((18, 20, 12), seed=7)
    nib.save(nib.Nifti1Image(image * 300.0, affine), root / "images" / "vol0.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labels" / "vol0.nii.gz")
    return {"root": root, "bundle": write_bundle(root / "bundle")}


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bundle_gives_the_sa_table_of_the_network_and_preprocessing_by_hand(data, tmp_path):
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Orientationd,
        ScaleIntensityd,
        Spacingd,
    )

    import segability

    result = run("analyze", "--bundle", data["bundle"], "--images", data["root"] / "images", "--labels", data["root"] / "labels",
                 "--out", tmp_path / "run", "--layers", LAYERS, "--no-report", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    got = segability.load_result(tmp_path / "run")
    assert got.settings["roi_size"] == [16, 16, 16]  # the bundle's SlidingWindowInferer

    # By hand: the same network and weights, MONAI transforms written out, the label on the same grid.
    net = _network()
    net.load_state_dict(torch.load(data["bundle"] / "models" / "model.pt")["model"])
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="LPS"),
                   Spacingd("image", pixdim=PIXDIM, mode="bilinear"), ScaleIntensityd("image"), EnsureTyped("image")])  # fmt: skip
    lab = Compose([LoadImaged("label"), EnsureChannelFirstd("label"), Orientationd("label", axcodes="LPS"),
                   Spacingd("label", pixdim=PIXDIM, mode="nearest")])  # fmt: skip
    x = pre({"image": str(data["root"] / "images" / "vol0.nii.gz")})["image"].as_tensor()
    y = lab({"label": str(data["root"] / "labels" / "vol0.nii.gz")})["label"].as_tensor()
    assert tuple(x.shape[1:]) != (18, 20, 12)  # the preprocessing did change the grid
    ref = segability.analyze_windows(net, x, y, roi_size=(16, 16, 16), overlap=0.25, layers=LAYERS.split(","), image_id="vol0.nii.gz")
    cols = ["image", "layer", "sa", "sa_pred", "status"]
    pd.testing.assert_frame_equal(got.layers[cols].reset_index(drop=True), ref.layers[cols].reset_index(drop=True), atol=1e-6)
    assert got.layers["sa"].notna().all() and got.layers.loc[got.layers["layer"] != "input", "sa"].between(0, 1).all()
    np.testing.assert_allclose(got.images["dice"], ref.images["dice"], atol=1e-6)


def test_bundle_preprocessing_reads_the_file_and_moves_the_label_onto_its_grid(data):
    pre = pickle.loads(pickle.dumps(load_preprocess(str(data["bundle"]))))  # travels to Ray actors
    x, y = load_item(data["root"] / "images" / "vol0.nii.gz", data["root"] / "labels" / "vol0.nii.gz", pre)
    assert x.shape == y.shape and float(x.min()) == 0.0 and float(x.max()) == 1.0  # ScaleIntensityd
    # LPS flips the first two axes: the label's first voxel along them is the input's last.
    _, label = blob((18, 20, 12), seed=7)
    assert int(y.sum()) > 0 and abs(float(y.sum()) * 1.2**3 - label.sum() * 3.0) / (label.sum() * 3.0) < 0.1  # same volume in mm^3


def test_yaml_config_and_the_window_size(data, tmp_path):
    yaml = pytest.importorskip("yaml")
    folder = write_bundle(tmp_path / "b", config=None)
    (folder / "configs" / "inference.yaml").write_text(yaml.safe_dump(CONFIG))
    info = read_bundle(folder)
    assert info.config.name == "inference.yaml" and info.roi_size == (16, 16, 16) and info.network_key == "network_def"
    assert info.image_key == "image" and info.has_preprocessing


def _broken(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    if kind == "no_configs":
        (folder / "models").mkdir(parents=True)
    elif kind == "no_network":
        write_bundle(folder, {k: v for k, v in CONFIG.items() if not k.startswith("network")})
    elif kind == "no_weights":
        write_bundle(folder, weights=None)
    elif kind == "torchscript":
        write_bundle(folder, weights=None)
        torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 2, 1)), folder / "models" / "model.ts")
    elif kind == "wrong_weights":
        write_bundle(folder, weights={"model": _network(channels=[4, 16]).state_dict()})
    elif kind == "bad_network":
        config = copy.deepcopy(CONFIG)
        config["network_def"]["_target_"] = "NoSuchNet"
        write_bundle(folder, config)
    return folder


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("no_configs", "has no configs/inference.json"),
        ("no_network", "defines no network_def"),
        ("no_weights", "has no models/model.pt"),
        ("torchscript", "only models/model.ts, a TorchScript module"),
        ("wrong_weights", "does not fit"),
        ("bad_network", "'network_def' of inference.json cannot be built"),
    ],
)
def test_broken_bundles_are_usage_errors_naming_the_flag(data, tmp_path, kind, message):
    folder = _broken(tmp_path, kind)
    result = run("analyze", "--bundle", folder, "--images", data["root"] / "images", "--out", tmp_path / "run", "--no-report")
    assert result.exit_code == 2, result.output
    assert "--bundle" in result.output and message in result.output.replace("\n", "")
    assert not (tmp_path / "run").exists()


def test_bundle_excludes_model_and_qc_commands_take_it(data, tmp_path):
    result = run("analyze", "--bundle", data["bundle"], "--model", "x.py:f", "--images", data["root"] / "images",
                 "--out", tmp_path / "run")  # fmt: skip
    assert result.exit_code == 2 and "--bundle brings the network and its weights: leave out --model" in result.output
    for command in ("qc", "calibrate", "evaluate-qc"):
        assert "--bundle" in run(command, "--help").output


def test_weights_as_plain_state_dict(tmp_path):
    from segability.io.bundle import load_bundle

    folder = write_bundle(tmp_path / "plain", weights=_network(seed=3).state_dict())
    net, info = load_bundle(folder)
    reference = _network(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), reference.state_dict().values(), strict=True))
    assert info.model_args()["bundle"] == str(folder.resolve())
    shutil.rmtree(folder)


def test_exported_maps_match_monai_inverting_the_bundle_preprocessing(data, tmp_path):
    """``--bundle`` with ``--export-maps``: the probability on the input's grid is what MONAI's own
    ``Compose.inverse`` makes of the kept map (Spacing and Orientation undone), everywhere."""
    from monai.data import MetaTensor

    result = run("analyze", "--bundle", data["bundle"], "--images", data["root"] / "images", "--out", tmp_path / "run",
                 "--layers", LAYERS, "--keep-maps", "1", "--export-maps", "nifti", "--no-report", "--no-progress")  # fmt: skip
    assert result.exit_code == 0, result.output
    source = nib.load(data["root"] / "images" / "vol0.nii.gz")
    case = tmp_path / "run" / "maps" / "vol0"
    for name in ("probability", "prediction", *LAYERS.split(",")):
        img = nib.load(case / f"{name}.nii.gz")
        np.testing.assert_array_equal(img.affine, source.affine)
        assert img.shape == source.shape
    pre = load_preprocess(str(data["bundle"])).transforms()
    x = pre({"image": str(data["root"] / "images" / "vol0.nii.gz")})["image"]
    kept = np.load(tmp_path / "run" / "maps.npz")["0:prediction"]
    assert kept.shape == tuple(x.shape[1:])
    back = pre.inverse({"image": MetaTensor(torch.as_tensor(kept)[None], meta=x.meta, applied_operations=x.applied_operations)})
    np.testing.assert_allclose(np.asarray(nib.load(case / "probability.nii.gz").dataobj), back["image"][0].numpy(), atol=1e-5)


def test_layers_lists_the_bundle_network_and_bundle_excludes_nnunet(data, tmp_path):
    result = run("layers", "--bundle", data["bundle"])
    assert result.exit_code == 0, result.output
    for name in LAYERS.split(","):
        assert name in result.output
    assert run("layers", "--bundle", data["bundle"], "--model", "x.py:f").exit_code == 2
    both = run("analyze", "--bundle", data["bundle"], "--nnunet", tmp_path, "--images", data["root"] / "images",
               "--out", tmp_path / "run")  # fmt: skip
    assert both.exit_code == 2 and "leave out --nnunet" in both.output
