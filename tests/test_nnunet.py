"""nnU-Net v2 results folders (segability.integrations.nnunet, ``analyze --nnunet``, ``layers --nnunet``).

On a genuine nnU-Net results folder that nnU-Net's own planner, preprocessor and trainer made
(:mod:`nnunet_fixture`, cached): the folder loads as nnU-Net's predictor loads it; the
segmentation segability exports equals nnU-Net's own prediction of the same file; every class in
one pass equals one binary run per class; a fold ensemble averages the folds' logits and names
each fold's layers; bad folders, folds, checkpoints and files are usage errors that say what to fix.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("nnunetv2")

import nnunet_fixture as fx  # noqa: E402
from segability.analysis.config import AnalysisConfig, Capture, Readout, Windows  # noqa: E402
from segability.analysis.windows import WindowRun  # noqa: E402
from segability.cli.app import app  # noqa: E402
from segability.errors import UsageError  # noqa: E402
from segability.integrations import nnunet as nn_  # noqa: E402

runner = CliRunner()
STAGES = ["encoder.stages.0", "encoder.stages.1", "encoder.stages.2", "encoder.stages.3",
          "decoder.stages.0", "decoder.stages.1", "decoder.stages.2"]  # fmt: skip


@pytest.fixture(scope="session")
def nnunet_root(request, tmp_path_factory) -> Path:
    """The fixture's folder, cached under pytest's cache (built once: about 1.5 min on 2 loaded cores)."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider: build for this session only
    return fx.cached(Path(cache.mkdir("nnunet")) if cache is not None else tmp_path_factory.mktemp("nnunet"))


@pytest.fixture(scope="session")
def results(nnunet_root) -> Path:
    return fx.results_folder(nnunet_root)


@pytest.fixture(scope="session")
def raw(nnunet_root) -> Path:
    return fx.raw_folder(nnunet_root)


@pytest.fixture(scope="session")
def fold0(results):
    """Fold 0 without test-time mirroring (the cheap model for the value checks)."""
    return nn_.load_nnunet(results, [0], mirroring=False)


@pytest.fixture(scope="session")
def cli_run(results, raw, tmp_path_factory) -> Path:
    """``segability analyze --nnunet`` on the two test cases, fold 0, nnU-Net's defaults (mirroring on);
    the first case's maps exported as NIfTI."""
    out = tmp_path_factory.mktemp("nnunet") / "run"
    res = runner.invoke(app, ["analyze", "--nnunet", str(results), "--fold", "0", "--images", str(raw / "imagesTs"),
                              "--labels", str(raw / "labelsTs"), "--out", str(out), "--no-progress", "--no-report",
                              "--keep-maps", "1", "--export-maps", "nifti"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


def _reference_predictor(results: Path, folds: tuple):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    p = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(results), folds, "checkpoint_final.pth")
    return p


def test_loads_as_nnunet_predictor_does(results):
    ref = _reference_predictor(results, None)  # nnU-Net's own loading, every fold it finds
    model = nn_.load_nnunet(results)
    assert model.folds == (0, 1) and model.trainer == "nnUNetTrainer" and model.configuration == "3d_fullres"
    assert type(model.network) is type(ref.network)
    assert model.predictor.allowed_mirroring_axes == ref.allowed_mirroring_axes
    assert len(model.predictor.list_of_parameters) == len(ref.list_of_parameters) == 2
    for ours, theirs in zip(model.predictor.list_of_parameters, ref.list_of_parameters, strict=True):
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.classes == {1: "gm", 2: "wm"} and model.channels == ["T1", "T2"] and model.patch_size == (32, 32, 32)
    out = model.network(torch.zeros(1, 2, *model.patch_size))  # deep supervision off: one tensor, not a list
    assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 32, 32, 32)
    assert nn_.default_layers(model.network) == STAGES


def test_prediction_equals_nnunet_predictor(cli_run, results, raw, tmp_path):
    import nibabel as nib

    ref = _reference_predictor(results, (0,))
    cases = nn_.find_cases(raw / "imagesTs", None, ["T1", "T2"], ".nii.gz")
    ref.predict_from_files_sequential([[str(f) for f in c.images] for c in cases], str(tmp_path), save_probabilities=False,
                                      overwrite=True)  # fmt: skip
    for c in cases:
        theirs = nib.load(tmp_path / f"{c.case}.nii.gz")
        ours = nib.load(cli_run / "predictions" / f"{c.case}.nii.gz")
        image = nib.load(c.images[0])
        assert ours.shape == image.shape == fx.TEST_SHAPE
        np.testing.assert_allclose(ours.affine, image.affine, atol=1e-4)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(theirs.dataobj))
        assert set(np.unique(np.asarray(ours.dataobj))) <= {0, 1, 2}


def test_cli_tables_name_the_networks_layers(cli_run, raw):
    import pandas as pd

    layers = pd.read_parquet(cli_run / "layers.parquet")
    images = pd.read_parquet(cli_run / "images.parquet")
    assert list(layers["layer"].drop_duplicates()) == ["input", *STAGES]
    assert set(layers["class"]) == {1, 2} and set(layers["class_name"]) == {"gm", "wm"}
    assert len(layers) == 2 * 2 * (1 + len(STAGES))  # cases x classes x layers
    assert sorted(images["image"].unique()) == ["test_000", "test_001"]
    assert set(images["label_file"]) == {str(raw / "labelsTs" / f"test_00{i}.nii.gz") for i in (0, 1)}
    settings = json.loads((cli_run / "settings.json").read_text())
    assert settings["nnunet"]["folds"] == [0] and settings["nnunet"]["mirroring"] is True
    assert settings["nnunet"]["patch_size"] == [32, 32, 32]


def test_every_class_equals_binary_runs(fold0, raw):
    case = nn_.find_cases(raw / "imagesTs", raw / "labelsTs", fold0.channels, fold0.file_ending)[0]
    multi, pre, logits = nn_.analyze_case(fold0, case)
    tiles = fold0.tiles(tuple(pre.data.shape[1:]))
    assert len(tiles) == 2  # 44 voxels along the first axis, patch 32: nnU-Net's two tiles
    for c in (1, 2):
        config = AnalysisConfig(readout=Readout(output="softmax", target=c), capture=Capture(layers=STAGES),
                                windows=Windows(roi_size=fold0.patch_size))  # fmt: skip
        single = WindowRun(fold0.network, config).run(pre.data, pre.label, case.case, logits=logits[None], tiles=tiles)
        rows = multi.layers[multi.layers["class"] == c].set_index("layer")
        want = single.layers.set_index("layer")
        np.testing.assert_allclose(rows.loc[want.index, "sa"], want["sa"], atol=1e-6)
        np.testing.assert_allclose(rows.loc[want.index, "sa_pred"], want["sa_pred"], atol=1e-6)
        # Dice of the prediction, by hand on nnU-Net's grid
        pred, lab = (logits.argmax(0) == c).double(), (pre.label[0] == c).double()
        dice = float(2 * (pred * lab).sum() / (pred.sum() + lab.sum()))
        got = multi.images.set_index("class").loc[c, "dice"]
        assert got == pytest.approx(dice, abs=1e-6)


def test_fold_ensemble_averages_logits_and_prefixes_layers(results, raw, fold0):
    both = nn_.load_nnunet(results, mirroring=False)
    fold1 = nn_.load_nnunet(results, [1], mirroring=False)
    case = nn_.find_cases(raw / "imagesTs", raw / "labelsTs", both.channels, both.file_ending)[1]
    res, pre, logits = nn_.analyze_case(both, case)
    mean = (fold0.predict_logits(pre.data) + fold1.predict_logits(pre.data)) / 2
    # nnU-Net stitches each fold's tiles in float16, then sums the folds in float32
    torch.testing.assert_close(logits, mean, atol=4e-3, rtol=1e-3)
    assert float((logits - mean).abs().mean()) < 5e-4
    names = list(res.layers["layer"].drop_duplicates())
    assert names == ["input", *[f"fold_0/{n}" for n in STAGES], *[f"fold_1/{n}" for n in STAGES]]
    # fold 1's rows are fold 1's network scored against the ensemble's guide
    config = AnalysisConfig(readout=Readout(output="softmax", classes=(1, 2)), capture=Capture(layers=STAGES),
                            windows=Windows(roi_size=both.patch_size))  # fmt: skip
    alone = WindowRun(both.load_fold(1), config).run(pre.data, pre.label, case.case, logits=logits[None],
                                                    tiles=both.tiles(tuple(pre.data.shape[1:])))  # fmt: skip
    got = res.layers[res.layers["layer"].str.startswith("fold_1/")].copy()
    got["layer"] = got["layer"].str.removeprefix("fold_1/")
    merged = got.merge(alone.layers, on=["layer", "class"], suffixes=("", "_alone"))
    assert len(merged) == 2 * len(STAGES)
    np.testing.assert_allclose(merged["sa"], merged["sa_alone"], atol=1e-6)
    # the means are over both folds' layers
    means = res.layers[res.layers["layer"] != "input"].groupby("class")["sa"].mean()
    np.testing.assert_allclose(res.images.set_index("class").loc[means.index, "mean_sa"], means, atol=1e-9)


# ------------------------------------------------------------------------------ usage errors
def _copy(results: Path, tmp_path: Path, name: str | None = None) -> Path:
    dst = tmp_path / (name or results.name)
    shutil.copytree(results, dst)
    return dst


def _error(fn, *args, **kwargs) -> UsageError:
    with pytest.raises(UsageError) as info:
        fn(*args, **kwargs)
    return info.value


def test_missing_or_malformed_folder(results, tmp_path):
    e = _error(nn_.load_nnunet, tmp_path / "nope")
    assert e.argument == "nnunet" and "no such folder" in str(e)
    e = _error(nn_.load_nnunet, results.parent)  # the dataset folder above the results folder
    assert e.argument == "nnunet" and "<Trainer>__<Plans>__<configuration>" in str(e)
    bad = _copy(results, tmp_path)
    (bad / "plans.json").unlink()
    e = _error(nn_.load_nnunet, bad)
    assert e.argument == "nnunet" and "has no plans.json" in str(e)
    (bad / "plans.json").write_text((results / "plans.json").read_text())
    (bad / "dataset.json").write_text("{not json")
    e = _error(nn_.load_nnunet, bad)
    assert "dataset.json is not valid JSON" in str(e)


def test_unknown_fold_and_missing_checkpoint(results):
    e = _error(nn_.load_nnunet, results, [3])
    assert e.argument == "fold" and "no fold_3" in str(e) and "['0', '1']" in str(e)
    e = _error(nn_.load_nnunet, results, [0], "checkpoint_latest.pth")
    assert e.argument == "checkpoint" and "checkpoint_latest.pth does not exist" in str(e) and "checkpoint_final.pth" in str(e)
    e = _error(nn_.load_nnunet, results, None, "checkpoint_latest.pth")
    assert e.argument == "checkpoint" and "no fold" in str(e)


def test_checkpoint_of_another_configuration(results, tmp_path):
    plans = json.loads((results / "plans.json").read_text())
    assert "2d" in plans["configurations"]
    moved = _copy(results, tmp_path, "nnUNetTrainer__nnUNetPlans__2d")  # 3d_fullres checkpoints in a 2d folder
    e = _error(nn_.load_nnunet, moved, [0])
    assert e.argument == "checkpoint"
    assert "trained as nnUNetTrainer / 3d_fullres, but the folder is nnUNetTrainer / 2d" in str(e)


def test_missing_channel_file(raw, tmp_path):
    images = tmp_path / "imagesTs"
    shutil.copytree(raw / "imagesTs", images)
    (images / "test_001_0001.nii.gz").unlink()
    e = _error(nn_.find_cases, images, None, ["T1", "T2"], ".nii.gz")
    assert e.argument == "images" and "test_001 lacks test_001_0001.nii.gz" in str(e) and "2 channels" in str(e)


def test_without_nnunetv2_the_error_says_how_to_install(results, monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # import nnunetv2 -> ImportError
    e = _error(nn_.load_nnunet, results)
    assert e.argument == "nnunet" and "pip install --no-deps nnunetv2==2.8.1 dynamic-network-architectures==0.4.4" in str(e)


def test_trainer_found_when_a_trainer_module_needs_timm():
    # nnU-Net's own search imports every trainer module in turn; its Primus trainers need timm,
    # which a CPU-torch install leaves out. The shipped short-schedule trainer is still found.
    assert nn_._trainer_class("nnUNetTrainer_1epoch").__name__ == "nnUNetTrainer_1epoch"


def test_cli_usage_errors_name_the_flag(results, raw, tmp_path):
    base = ["analyze", "--nnunet", str(results), "--images", str(raw / "imagesTs"), "--out", str(tmp_path / "r"), "--no-progress"]
    res = runner.invoke(app, [*base, "--fold", "7"])
    assert res.exit_code == 2 and "--fold" in res.output and "fold_7" in res.output
    res = runner.invoke(app, [*base, "--roi-size", "16,16,16"])
    assert res.exit_code == 2 and "--roi-size" in res.output
    res = runner.invoke(app, [*base, "--model", "x.py:f"])
    assert res.exit_code == 2 and "--nnunet" in res.output


def test_cli_layers_lists_the_networks_modules(results):
    res = runner.invoke(app, ["layers", "--nnunet", str(results), "--fold", "0"])
    assert res.exit_code == 0, res.output
    for name in ("encoder.stages.0", "decoder.stages.2", "decoder.seg_layers.2"):
        assert name in res.output


def test_qc_commands_route_nnunet(results, raw, tmp_path):
    base = ["--nnunet", str(results), "--fold", "0", "--images", str(raw / "imagesTs"), "--labels", str(raw / "labelsTs"),
            "--no-progress"]  # fmt: skip
    # the gate (and evaluate-qc's comparison) estimates one class's Dice: two foreground labels need --target
    res = runner.invoke(app, ["calibrate", *base, "--out", str(tmp_path / "cal.json")])
    assert res.exit_code == 2 and "--target" in res.output and "'gm'" in res.output
    res = runner.invoke(app, ["evaluate-qc", *base, "--out", str(tmp_path / "ev")])
    assert res.exit_code == 2 and "--target" in res.output


def test_exported_maps_overlay_the_input(cli_run, raw):
    import nibabel as nib

    image = nib.load(raw / "imagesTs" / "test_000_0000.nii.gz")
    folder = cli_run / "maps" / "test_000"
    index = json.loads((folder / "maps.json").read_text())
    layer_files = {f for f, d in index["files"].items() if d["kind"] == "layer"}
    assert {f"{n}_class-{c}.nii.gz" for n in STAGES for c in (1, 2)} <= layer_files
    for name in index["files"]:
        m = nib.load(folder / name)
        assert m.shape == image.shape
        np.testing.assert_allclose(m.affine, image.affine, atol=1e-4)
    assert not (cli_run / "maps" / "test_001").exists()  # --keep-maps 1


def test_geometry_is_nnunets_way_back(fold0, raw, tmp_path):
    """Maps go back to the input grid as nnU-Net's own export takes its segmentation back, also
    through nnU-Net's crop to the non-zero region (a zero border added here)."""
    import nibabel as nib

    src = nn_.find_cases(raw / "imagesTs", None, fold0.channels, fold0.file_ending)[0]
    for k, f in enumerate(src.images):
        img = nib.load(f)
        a = np.asarray(img.dataobj).copy()
        a[:5], a[:, -3:], a[..., :2] = 0, 0, 0  # zero in every channel: nnU-Net crops it away
        nib.save(nib.Nifti1Image(a, img.affine), tmp_path / f"border_{k:04d}.nii.gz")
    case = nn_.find_cases(tmp_path, None, fold0.channels, fold0.file_ending)[0]
    pre = fold0.preprocess(case)
    assert tuple(pre.data.shape[1:]) == (fx.TEST_SHAPE[2] - 2, fx.TEST_SHAPE[1] - 3, fx.TEST_SHAPE[0] - 5)  # z, y, x
    logits = fold0.predict_logits(pre.data)
    theirs = fold0.segmentation(logits, pre.properties)  # nnU-Net's export (its reader's axis order)
    geo = fold0.geometry(case, pre.properties)
    assert geo.shape == nib.load(case.images[0]).shape
    for c in (1, 2):
        ours = geo.original((logits.argmax(0) == c).numpy().astype(np.uint8), 0)
        np.testing.assert_array_equal(ours, (theirs == c).transpose(2, 1, 0).astype(np.uint8))
        assert ours[:5].sum() == 0 and ours[5:].sum() > 0


def test_unreadable_checkpoint(results, tmp_path):
    bad = _copy(results, tmp_path)
    (bad / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    e = _error(nn_.load_nnunet, bad, [0])
    assert e.argument == "checkpoint" and "checkpoint_final.pth" in str(e)


def test_baselines_see_nnunets_prediction(fold0, raw):
    """evaluate-qc's baselines call the model on an image: NnUNetInference is nnU-Net's prediction."""
    from segability.estimation.qc import stream_baseline_scores

    case = nn_.case_of_file(fold0, raw / "imagesTs" / "test_000_0000.nii.gz")
    assert [f.name for f in case.images] == ["test_000_0000.nii.gz", "test_000_0001.nii.gz"]
    pre = fold0.preprocess(case)
    net = nn_.NnUNetInference(fold0)
    torch.testing.assert_close(net(pre.data[None])[0], fold0.predict_logits(pre.data))
    table = stream_baseline_scores(net, [("test_000", pre.data)], output="softmax", target=2, tta=False)
    # the entropy baseline of nnU-Net's softmax, by hand: minus the mean binary entropy of class 2's probability
    p = torch.softmax(fold0.predict_logits(pre.data).double(), 0)[2].clamp(1e-12, 1 - 1e-12)
    by_hand = float((p * p.log() + (1 - p) * (1 - p).log()).mean())
    assert table["image"].tolist() == ["test_000"]
    assert table["entropy"].iloc[0] == pytest.approx(by_hand, abs=1e-4)
