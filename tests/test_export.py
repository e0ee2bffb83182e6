"""Maps exported in the image's own space (``segability.io.export``, ``analyze --export-maps nifti``).

The hand checks use the factory file's ``tiny_net``: its output is ``10 * (x / scale - 0.5)`` at every
voxel (a threshold net), so the probability on the input's grid is known from the input alone. The
preprocessing resamples to 1 mm, which puts every input voxel centre on a node of the analysed grid:
linear interpolation there is exact, and nearest neighbour picks that node.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from data_factories import blob, make_png_folder, write_dicom_series, write_model_file
from segability.batch import analyze_files
from segability.cli.app import app
from segability.io import load_model, load_preprocess, read_image
from segability.io.export import Geometry, export_maps, export_run, file_geometry, resample_grid

# Rotation (axes 0 and 1 swapped, one flipped), anisotropic spacing (2, 1, 3 mm) and an offset.
AFFINE = np.array([[0.0, -1.0, 0.0, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.0, 3.0, 7.0], [0.0, 0.0, 0.0, 1.0]])
PREPROCESS = {"spacing": [1.0, 1.0, 1.0], "size": [20, 12, 24]}  # 2x and 3x finer, then padded


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> dict:
    """A NIfTI volume with AFFINE, analysed with PREPROCESS and exported."""
    root = tmp_path_factory.mktemp("vol")
    (root / "images").mkdir()
    image, label = blob((9, 6, 7), seed=3)
    path = root / "images" / "case.one.nii.gz"
    nib.save(nib.Nifti1Image(image, AFFINE), path)
    return {"root": root, "path": path, "image": image, "label": label}


def _analyse(nets: Path, images, out: Path, preprocess=None, keep=1, **kw):
    return analyze_files(f"{nets}:tiny_net", images, out=out, model_args={"spatial_dims": 3, **kw.pop("model_args", {})},
                         preprocess=preprocess, keep_maps=keep, report=False, layers=["1", "3", "5"], units=True, **kw)  # fmt: skip


def test_nifti_maps_carry_the_input_affine_and_the_model_prediction(nets, volume, tmp_path):
    summary = _analyse(nets, volume["root"] / "images", tmp_path / "run", PREPROCESS)
    assert summary.n_ok == 1
    done = export_run(tmp_path / "run", preprocess=PREPROCESS)
    case = tmp_path / "run" / "maps" / "case.one"
    assert done.folders == {"case.one.nii.gz": case} and not done.skipped
    reference = nib.load(volume["path"])
    files = sorted(case.rglob("*.nii.gz"))
    assert {p.name for p in files} >= {"prediction.nii.gz", "probability.nii.gz", "1.nii.gz", "3.nii.gz", "5.nii.gz"}
    assert any(p.parent.name == "units" for p in files)
    for p in files:
        img = nib.load(p)
        np.testing.assert_array_equal(img.affine, reference.affine)
        assert img.shape == reference.shape

    x = volume["image"].astype(np.float64)
    probability = np.asarray(nib.load(case / "probability.nii.gz").dataobj)
    np.testing.assert_allclose(probability, 1 / (1 + np.exp(-10 * (x - 0.5))), atol=1e-5)  # the net on the input itself
    prediction = np.asarray(nib.load(case / "prediction.nii.gz").dataobj)
    assert prediction.dtype == np.uint8
    np.testing.assert_array_equal(prediction, (x > 0.5).astype(np.uint8))

    # The same through the Python API: preprocess by hand, run the net, pick the node of each input voxel.
    pre = load_preprocess(PREPROCESS)({"image": read_image(volume["path"])})["image"]
    net = load_model(f"{nets}:tiny_net", model_args={"spatial_dims": 3})
    with torch.no_grad():
        analysed = (torch.sigmoid(net(pre.as_tensor()[None]))[0, 0] > 0.5).numpy()
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in x.shape], indexing="ij"), -1).reshape(-1, 3)
    nodes = (np.linalg.inv(pre.affine.numpy()) @ AFFINE @ np.c_[grid, np.ones(len(grid))].T)[:3].T
    assert np.allclose(nodes, np.round(nodes))  # every input voxel sits on an analysed node
    idx = tuple(np.round(nodes).astype(int).T)
    np.testing.assert_array_equal(prediction.reshape(-1), analysed[idx].astype(np.uint8))
    # A layer's map: the analysed map at those nodes, exactly.
    kept = np.load(tmp_path / "run" / "maps.npz")["0:layer:3"]
    np.testing.assert_array_equal(np.asarray(nib.load(case / "3.nii.gz").dataobj).reshape(-1), kept[idx])
    index = json.loads((case / "maps.json").read_text())
    assert index["image"] == "case.one.nii.gz" and index["files"]["3.nii.gz"] == {"kind": "layer", "layer": "3"}


def test_dicom_series_exports_the_geometry_monai_reads(nets, tmp_path):
    from monai.data import PydicomReader
    from monai.transforms import LoadImage

    vol = np.where(blob((10, 8, 5), seed=4)[1] > 0, 1000, 100).astype(np.uint16)  # (rows, cols, slices)
    series = write_dicom_series(tmp_path / "dicom" / "ct1", vol, spacing=(0.7, 0.9, 2.5))
    _analyse(nets, tmp_path / "dicom", tmp_path / "run", model_args={"scale": 1000.0})
    done = export_run(tmp_path / "run")
    out = nib.load(done.folders["ct1"] / "prediction.nii.gz")
    monai = LoadImage(reader=PydicomReader(), image_only=True)(str(series))
    np.testing.assert_allclose(out.affine, monai.affine.numpy(), atol=1e-6)
    # By hand from the tags: columns (0.9 mm) along x, rows (0.7 mm) along y, slices 2.5 mm; LPS -> RAS flips x, y.
    np.testing.assert_allclose(out.affine, np.diag([-0.9, -0.7, 2.5, 1.0]), atol=1e-6)
    assert out.shape == (8, 10, 5)  # (columns, rows, slices), as MONAI orders them
    np.testing.assert_array_equal(np.asarray(out.dataobj), (vol.transpose(1, 0, 2) > 500).astype(np.uint8))


def test_layer_and_class_names_give_safe_unique_files(tmp_path):
    rng = np.random.default_rng(0)
    maps = {"sub/../a b.nii.gz": {
        "prediction": rng.random((3, 4)), "layers": {"enc/0": np.ones((3, 4)), "enc.0": np.zeros((3, 4)), "../up": np.ones((3, 4)),
                                                     "prediction": np.ones((3, 4)), "enc_0": np.ones((3, 4))},
        "units": {"enc/0": {2: np.ones((3, 4)), 0: np.zeros((3, 4))}},
        "classes": {1: {"prediction": np.full((3, 4), 0.7), "layers": {"enc/0": np.ones((3, 4))}},
                    2: {"prediction": np.full((3, 4), 0.2), "layers": {"enc/0": np.zeros((3, 4))}}},
    }}  # fmt: skip
    done = export_maps(maps, tmp_path, {"sub/../a b.nii.gz": Geometry(np.eye(3), (3, 4), known=False)})
    case = done.folders["sub/../a b.nii.gz"]
    assert case.parent == tmp_path and case.name == "sub_.._a_b"
    names = sorted(p.relative_to(case).as_posix() for p in case.rglob("*") if p.is_file())
    assert all(p.resolve().is_relative_to(case.resolve()) for p in case.rglob("*"))
    index = json.loads((case / "maps.json").read_text())["files"]
    assert len(index) == len(names) - 1 == 6 + 3 + 2 * 3  # top: prediction, probability, 5 layers (one hashed), 2 units...
    by_layer = {(d.get("layer"), d.get("unit"), d.get("class")): f for f, d in index.items() if d["kind"] in ("layer", "unit")}
    assert by_layer[("enc/0", None, None)] == "enc_0.nii.gz" and by_layer[("enc.0", None, None)] == "enc.0.nii.gz"
    assert by_layer[("enc_0", None, None)].startswith("enc_0-")  # collides with enc/0 after sanitising
    assert by_layer[("prediction", None, None)].startswith("prediction-")  # never overwrites the prediction
    assert by_layer[("../up", None, None)] == "up.nii.gz"
    assert by_layer[("enc/0", 2, None)] == "units/enc_0_unit-2.nii.gz"
    assert by_layer[("enc/0", None, 2)] == "enc_0_class-2.nii.gz"
    assert np.asarray(nib.load(case / "prediction_class-1.nii.gz").dataobj).min() == 1
    assert np.asarray(nib.load(case / "prediction_class-2.nii.gz").dataobj).max() == 0
    assert done.unknown_geometry == ["sub/../a b.nii.gz"]
    assert nib.load(case / "prediction.nii.gz").shape == (3, 4)


def test_refuses_to_overwrite_and_replaces_only_its_own_files(tmp_path):
    geometry = {"a": Geometry(np.eye(4), (2, 2, 2))}
    export_maps({"a": {"prediction": np.zeros((2, 2, 2)), "layers": {"x": np.ones((2, 2, 2))}}}, tmp_path, geometry)
    user = tmp_path / "a" / "notes.nii.gz"
    user.write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="exist already"):
        export_maps({"a": {"prediction": np.ones((2, 2, 2))}}, tmp_path, geometry)
    assert np.asarray(nib.load(tmp_path / "a" / "prediction.nii.gz").dataobj).max() == 0  # nothing written
    export_maps({"a": {"prediction": np.ones((2, 2, 2))}}, tmp_path, geometry, overwrite=True)
    assert not (tmp_path / "a" / "x.nii.gz").exists()  # the earlier export's own file is gone
    assert user.read_bytes() == b"mine"
    assert np.asarray(nib.load(tmp_path / "a" / "prediction.nii.gz").dataobj).min() == 1


def test_resample_grid_against_a_hand_computed_linear_map():
    src = np.arange(12.0).reshape(3, 4)
    # Destination voxel j lies at source coordinates (0.5 * j0 + 0.25, j1): halfway values by hand.
    dst = np.array([[0.5, 0.0, 0.25], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = resample_grid(src, np.eye(3), dst, (4, 4), 1)
    expected = np.array([[(0.5 * j0 + 0.25) * 4 + j1 for j1 in range(4)] for j0 in range(4)])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    nearest = resample_grid(src, np.eye(3), np.array([[1.0, 0, 1], [0, -1.0, 3], [0, 0, 1]]), (2, 4), 0)
    np.testing.assert_array_equal(nearest, src[1:3, ::-1])  # shift and flip: exact


def test_png_has_no_geometry_and_a_2d_identity(tmp_path):
    images, _ = make_png_folder(tmp_path, n=1, corrupt=False, orphan=False)
    g = file_geometry(images / "case0.png")
    assert not g.known and g.shape == (32, 36) and np.array_equal(g.affine, np.eye(3))


def test_cli_export_maps(nets, volume, tmp_path):
    config = tmp_path / "pre.json"
    config.write_text(json.dumps(PREPROCESS))
    args = ["analyze", "--model", f"{nets}:tiny_net", "--model-arg", "spatial_dims=3", "--images", str(volume["root"] / "images"),
            "--out", str(tmp_path / "run"), "--preprocess", str(config), "--layers", "3", "--export-maps", "nifti",
            "--no-report", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "keeps the maps of the first 20 images" in result.output
    out = nib.load(tmp_path / "run" / "maps" / "case.one" / "prediction.nii.gz")
    np.testing.assert_array_equal(out.affine, AFFINE)
    np.testing.assert_array_equal(np.asarray(out.dataobj), (volume["image"] > 0.5).astype(np.uint8))
    again = CliRunner().invoke(app, [*args, "--force"])
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(app, [*args[:-4], "--export-maps", "dicom", "--force"])
    assert bad.exit_code == 2 and "--export-maps must be one of none, nifti" in bad.output
