"""segability.io: model loading (factory specs, weights, pickle and TorchScript refusals) and images
(finding, pairing, reading every format, preprocessing)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from data_factories import blob, write_dicom_series, write_model_file
from segability.io import (
    ImageFileError,
    build_preprocess,
    find_images,
    image_stem,
    load_callable,
    load_item,
    load_model,
    load_preprocess,
    load_state_dict,
    pair_labels,
    parse_model_args,
    parse_shape,
    read_image,
)


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("models"))


def _same_params(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------- models
def test_factory_spec_with_args_builds_the_model(nets):
    net = load_model(f"{nets}:tiny_net", model_args={"spatial_dims": 3, "in_channels": 2})
    assert isinstance(net[1], nn.Conv3d) and net[1].in_channels == 2
    assert not net.training
    # The factory thresholds channel 0 at 0.5: logit = 10 * (x - 0.5), by construction.
    x = torch.tensor([0.2, 0.7]).view(1, 1, 2, 1, 1).repeat(1, 2, 1, 1, 1)
    assert torch.allclose(net(x).flatten(), torch.tensor([-3.0, 2.0]), atol=1e-5)


def test_module_spec_and_callable():
    conv = load_model("torch.nn:Conv2d", model_args={"in_channels": 1, "out_channels": 3, "kernel_size": 1})
    assert isinstance(conv, nn.Conv2d) and conv.out_channels == 3
    assert load_callable("json:dumps")([1]) == "[1]"
    built = load_model(lambda: nn.Conv1d(1, 1, 1))
    assert isinstance(built, nn.Conv1d)


@pytest.mark.parametrize(
    ("wrap", "note"),
    [
        (lambda sd: sd, "state dict"),
        (lambda sd: {"state_dict": sd, "epoch": 3}, "checkpoint"),
        (lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}}, "DataParallel keys"),
    ],
)
def test_weights_are_applied(nets, tmp_path, wrap, note):
    donor = load_model(f"{nets}:tiny_net", model_args={"seed": 7})
    path = tmp_path / "w.pt"
    torch.save(wrap(donor.state_dict()), path)
    net = load_model(f"{nets}:tiny_net", path)  # seed 0 by default: different until loaded
    assert _same_params(net, donor), note
    assert not _same_params(load_model(f"{nets}:tiny_net"), donor)


def test_weights_that_do_not_fit_name_the_argument(nets, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(load_model(f"{nets}:pointwise_net").state_dict(), path)
    with pytest.raises(ValueError, match=r"weights: .* does not fit the model .*: 5 keys with other shapes: 1\.weight: \(6, 1, 1, 1, 1\) in the file, \(4, 1, 3, 3\) in the model, "):
        load_model(f"{nets}:tiny_net", path)
    with pytest.raises(ValueError, match="weights: file .* not found"):
        load_model(f"{nets}:tiny_net", tmp_path / "missing.pt")
    torch.save({"optimizer": {"lr": 0.1}}, tmp_path / "opt.pt")
    with pytest.raises(ValueError, match=r"weights: .* without a state dict.*'optimizer'"):
        load_state_dict(tmp_path / "opt.pt")


def test_whole_pickled_model_is_refused_without_trust(nets, tmp_path):
    net = load_model(f"{nets}:tiny_net", model_args={"seed": 3})
    path = tmp_path / "full.pt"
    torch.save(net, path)
    for call in (lambda: load_model(str(path)), lambda: load_model(f"{nets}:tiny_net", path)):
        with pytest.raises(ValueError, match="arbitrary code") as info:
            call()
        assert "--trust-pickle" in str(info.value)
    trusted = load_model(str(path), trust_pickle=True)
    assert _same_params(trusted, net)
    # As --weights, a trusted whole model gives its state dict.
    assert _same_params(load_model(f"{nets}:tiny_net", path, trust_pickle=True), net)


def test_torchscript_is_refused_with_the_reason(nets, tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(nn.Sequential(nn.Conv2d(1, 1, 1))), path)
    for call in (
        lambda: load_model(str(path)),
        lambda: load_model(f"{nets}:tiny_net", path),
        lambda: load_model(f"{nets}:scripted_net"),
    ):
        with pytest.raises(ValueError, match="TorchScript") as info:
            call()
        assert "forward hooks" in str(info.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nets_without_colon", "model: 'nets_without_colon' is neither"),
        ("{nets}", "model: .* is a Python file; name its factory"),
        ("{nets}:not_a_model", "model: .* returned a int, expected a torch.nn.Module"),
        ("{nets}:nope", "model: .* has no 'nope'"),
        ("missing_dir/nets.py:tiny_net", "model: file 'missing_dir/nets.py' not found"),
        ("no_such_module_xyz:fn", "model: cannot import module 'no_such_module_xyz'"),
        ("{nets}:tiny_net", r"model: calling .* failed: .*unexpected keyword.*model_args"),
    ],
)
def test_bad_model_specs_name_the_argument(nets, spec, message):
    args = {"depth": 3} if spec == "{nets}:tiny_net" else None
    with pytest.raises(ValueError, match=message):
        load_model(spec.format(nets=nets), model_args=args)


def test_parse_model_args_and_shape():
    assert parse_model_args(["a=1", "b=[2, 3]", "c=(1, 2)", "d=name", "e=true", "f=None"]) == {
        "a": 1, "b": [2, 3], "c": (1, 2), "d": "name", "e": True, "f": None,
    }  # fmt: skip
    with pytest.raises(ValueError, match="model_args must be key=value"):
        parse_model_args(["novalue"])
    assert parse_shape("1,1, 64,32") == (1, 1, 64, 32)
    assert parse_shape("1x3x8") == (1, 3, 8)
    for bad in ("", "1,0,4", "a,b"):
        with pytest.raises(ValueError, match="example_shape"):
            parse_shape(bad)


# ---------------------------------------------------------------------------------- images
def test_find_images_folder_glob_and_errors(tmp_path):
    (tmp_path / "b.nii.gz").write_bytes(b"")
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "c.npy").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden.png").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"")
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.nii.gz", "c.npy"]
    assert [p.name for p in find_images(str(tmp_path / "**" / "*.png"))] == ["a.png", "d.png"]
    assert find_images(tmp_path / "a.png") == [tmp_path / "a.png"]
    with pytest.raises(ValueError, match="--images: .* does not exist"):
        find_images(tmp_path / "nope")
    with pytest.raises(ValueError, match="matches no image"):
        find_images(str(tmp_path / "*.nrrd"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        find_images(tmp_path / "empty")
    assert image_stem("x/case.nii.gz") == "case" and image_stem("CASE.PNG") == "CASE"


def test_pair_labels_reports_both_ways(tmp_path):
    images = [tmp_path / n for n in ("a.nii.gz", "b.png", "c.npy")]
    labels = tmp_path / "labels"
    labels.mkdir()
    for n in ("a_seg.nii.gz", "c_seg.png", "z_seg.png"):
        (labels / n).write_bytes(b"")
    pairing = pair_labels(images, labels, label_suffix="_seg")
    assert [(i.name, None if lab is None else lab.name) for i, lab in pairing.pairs] == [
        ("a.nii.gz", "a_seg.nii.gz"), ("b.png", None), ("c.npy", "c_seg.png"),
    ]  # fmt: skip
    assert [p.name for p in pairing.unpaired_images] == ["b.png"]
    assert [p.name for p in pairing.unpaired_labels] == ["z_seg.png"]
    assert "b.png" in pairing.describe() and "z_seg.png" in pairing.describe()
    with pytest.raises(ValueError, match="same name stem 'a'"):
        pair_labels([tmp_path / "a.png", tmp_path / "a.nii.gz"], labels)


def test_read_nifti_png_rgb_npy_npz(tmp_path):
    vol, _ = blob((7, 6, 5), seed=0)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    got = read_image(tmp_path / "v.nii.gz")
    assert got.shape == (1, 7, 6, 5) and np.allclose(got[0].numpy(), vol)

    gray = (np.arange(30).reshape(5, 6) * 7).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    got = read_image(tmp_path / "g.png")  # (H, W), as np.asarray(Image.open(...))
    assert got.shape == (1, 5, 6) and np.array_equal(got[0].numpy(), gray)
    rgb = np.stack([gray, gray // 2, gray // 3], axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    got = read_image(tmp_path / "c.png")
    assert got.shape == (3, 5, 6) and np.array_equal(got[2].numpy(), gray // 3)

    arr = np.random.default_rng(0).random((2, 4, 5)).astype(np.float32)  # channel-first as given
    np.save(tmp_path / "a.npy", arr)
    assert np.array_equal(read_image(tmp_path / "a.npy").numpy(), arr)
    np.savez(tmp_path / "one.npz", volume=arr)
    np.savez(tmp_path / "two.npz", image=arr, label=arr > 0.5)
    np.savez(tmp_path / "bad.npz", x=arr, y=arr)
    assert np.array_equal(read_image(tmp_path / "one.npz").numpy(), arr)
    assert np.array_equal(read_image(tmp_path / "two.npz").numpy(), arr)
    with pytest.raises(ValueError, match="needs one named 'image'"):
        read_image(tmp_path / "bad.npz")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png cannot be read by PILReader"):
        read_image(tmp_path / "broken.png")


def test_read_nrrd_with_and_without_space(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    vol = np.random.default_rng(1).random((6, 5, 4)).astype(np.float32)
    header = {"space": "left-posterior-superior", "space directions": np.diag([2.0, 1.0, 1.0]), "space origin": np.zeros(3)}
    nrrd.write(str(tmp_path / "s.nrrd"), vol, header)
    nrrd.write(str(tmp_path / "plain.nrrd"), vol)
    for name in ("s.nrrd", "plain.nrrd"):
        got = read_image(tmp_path / name)
        assert got.shape == (1, 6, 5, 4) and np.allclose(got[0].numpy(), vol), name


def test_nrrd_headers_are_checked_against_the_data(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    vol = np.arange(6 * 5, dtype=np.int16).reshape(6, 5)
    nrrd.write(str(tmp_path / "raw.nrrd"), vol, {"encoding": "raw"})
    whole = (tmp_path / "raw.nrrd").read_bytes()
    (tmp_path / "cut.nrrd").write_bytes(whole[:-10])
    with pytest.raises(ImageFileError, match=r"cut\.nrrd is truncated: its header promises sizes \(6, 5\) of int16, 60 bytes, but the file holds 50 bytes"):
        read_image(tmp_path / "cut.nrrd")
    nrrd.write(str(tmp_path / "d.nhdr"), vol, {"encoding": "raw"}, detached_header=True)
    assert np.array_equal(read_image(tmp_path / "d.nhdr")[0].numpy(), vol)
    (tmp_path / "d.raw").unlink()
    os.mkfifo(tmp_path / "d.raw")  # the detached data file is opened by the reader: checked too
    with pytest.raises(ImageFileError, match=r"d\.raw is a FIFO \(named pipe\), not a regular file"):
        read_image(tmp_path / "d.nhdr")
    with pytest.raises(ImageFileError, match=r"raw\.nrrd: its header promises sizes \(6, 5\) of int16, 60 bytes of voxel data, more than the limit of 59 bytes"):
        read_image(tmp_path / "raw.nrrd", max_bytes=59)
    (tmp_path / "endless.nrrd").write_bytes(b"NRRD0004\n" + b"#" * (2**20 + 10))
    with pytest.raises(ImageFileError, match=r"endless\.nrrd: the NRRD header is longer than 1 MiB"):
        read_image(tmp_path / "endless.nrrd")


def test_headers_of_other_formats_are_bounded(tmp_path):
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png", max_bytes=120).shape == (1, 5, 6)  # 5 x 6 x float32
    with pytest.raises(ImageFileError, match=r"g\.png: its header promises 6x5 pixels of 1 band\(s\), 120 bytes"):
        read_image(tmp_path / "g.png", max_bytes=119)
    arr = np.zeros((2, 4, 5), np.float32)
    np.savez(tmp_path / "two.npz", image=arr, label=arr)
    with pytest.raises(ImageFileError, match=r"two\.npz: its header promises shape \(2, 4, 5\) of float32, 160 bytes"):
        read_image(tmp_path / "two.npz", max_bytes=100)
    series = write_dicom_series(tmp_path / "series", np.zeros((6, 5, 2), np.uint16))
    one = series / "slice000.dcm"
    assert read_image(one, max_bytes=60).shape[-2:] == (5, 6)
    with pytest.raises(ImageFileError, match=r"slice000\.dcm: its header promises 1 frame\(s\) of 6x5, 60 bytes"):
        read_image(one, max_bytes=59)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(one.read_bytes()[:-30])
    with pytest.raises(ImageFileError, match=r"cut\.dcm is truncated"):
        read_image(cut)
    os.mkfifo(series / "slice002.dcm")  # the DICOM reader opens every file of a series folder
    with pytest.raises(ImageFileError, match=r"slice002\.dcm is a FIFO"):
        read_image(series)


def test_read_dicom_series_folder(tmp_path):
    vol = (np.arange(6 * 5 * 4).reshape(6, 5, 4) * 10).astype(np.uint16)  # rows, columns, slices
    series = write_dicom_series(tmp_path / "dicom" / "patient1", vol)
    assert find_images(tmp_path / "dicom") == [series]  # a sub-folder is one series
    assert find_images(series) == [series]  # a folder of one series is that series
    got = read_image(series)
    # MONAI's PydicomReader swaps rows and columns (x, y, z order, like NIfTI).
    assert got.shape == (1, 5, 6, 4)
    assert np.array_equal(got[0].numpy(), vol.transpose(1, 0, 2))
    assert np.allclose(got.meta["spacing"], [1.0, 1.0, 2.5])


# ---------------------------------------------------------------------------- preprocessing
def test_preprocess_config_values():
    image = torch.tensor([[[0.0, 50.0, 100.0, 200.0]]])  # (1, 1, 4): a 2D image 1x4
    pre = build_preprocess({"intensity": {"range": [0, 100], "to": [0, 2], "clip": True}, "size": [3, 2]})
    out = pre({"image": image, "label": torch.tensor([[[0.0, 1.0, 1.0, 0.0]]])})
    # Range [0, 100] -> [0, 2] clipped: 0, 1, 2, 2; then centred crop 4 -> 2 columns and pad 1 -> 3 rows.
    assert out["image"].shape == (1, 3, 2) and out["label"].shape == (1, 3, 2)
    assert torch.allclose(out["image"][0, 1], torch.tensor([1.0, 2.0]))
    assert float(out["image"][0, 0].abs().sum()) == 0.0
    assert torch.equal(out["label"][0, 1], torch.tensor([1.0, 1.0]))
    norm = build_preprocess({"intensity": {"normalize": True}})({"image": torch.tensor([[1.0, 3.0]])})
    assert torch.allclose(norm["image"], torch.tensor([[-1.0, 1.0]]), atol=1e-5)  # population std
    scaled = build_preprocess({"intensity": {"scale": [-1, 1]}})({"image": torch.tensor([[2.0, 4.0, 6.0]])})
    assert torch.allclose(scaled["image"], torch.tensor([[-1.0, 0.0, 1.0]]))


def test_preprocess_spacing_on_nifti(tmp_path):
    vol = np.zeros((4, 6, 5), np.float32)
    vol[1:3, 2:4, 1:4] = 1.0
    nib.save(nib.Nifti1Image(vol, np.diag([2.0, 1.0, 1.0, 1.0])), tmp_path / "v.nii.gz")
    nib.save(nib.Nifti1Image(vol.astype(np.uint8), np.diag([2.0, 1.0, 1.0, 1.0])), tmp_path / "l.nii.gz")
    pre = build_preprocess({"spacing": [1.0, 1.0, 1.0]})
    image, label = load_item(tmp_path / "v.nii.gz", tmp_path / "l.nii.gz", pre)
    assert image.shape == (1, 7, 6, 5) and label.shape == (1, 7, 6, 5)  # 4 voxels of 2 mm -> 7 of 1 mm
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0}  # nearest neighbour for the label


def test_preprocess_from_files_and_callables(tmp_path, nets):
    config = {"intensity": {"range": [0, 10]}}
    (tmp_path / "p.json").write_text(json.dumps(config))
    (tmp_path / "p.yaml").write_text("intensity:\n  range: [0, 10]\n")
    x = {"image": torch.tensor([[5.0, 10.0]])}
    for name in ("p.json", "p.yaml"):
        assert torch.allclose(load_preprocess(str(tmp_path / name))(x)["image"], torch.tensor([[0.5, 1.0]]))
    assert torch.equal(load_preprocess(f"{nets}:double_preprocess")(x)["image"], torch.tensor([[10.0, 20.0]]))
    assert load_preprocess(None) is None
    (tmp_path / "bad.json").write_text(json.dumps({"resample": 1}))
    with pytest.raises(ValueError, match=r"--preprocess: .*unknown key\(s\) \['resample'\]"):
        load_preprocess(str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match="exactly one of"):
        build_preprocess({"intensity": {"range": [0, 1], "scale": [0, 1]}})
    with pytest.raises(ValueError, match="--preprocess: file .* not found"):
        load_preprocess(str(tmp_path / "missing.yaml"))


def test_load_item_checks_label_grid(tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((1, 4, 4), np.float32))
    np.save(tmp_path / "l.npy", np.zeros((1, 4, 5), np.float32))
    with pytest.raises(ValueError, match="different spatial shapes"):
        load_item(tmp_path / "i.npy", tmp_path / "l.npy")
    image, label = load_item(tmp_path / "i.npy", None)
    assert label is None and type(image) is torch.Tensor and image.dtype == torch.float32


def test_the_former_images_module_names_the_same_objects():
    # segability.io.images was split into formats / finding / intake / reading / preprocess.
    import segability.io as io
    from segability.io import images

    assert images.__all__ and all(getattr(images, n) is getattr(io, n) for n in images.__all__)
