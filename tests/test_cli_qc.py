"""`segability calibrate`, `qc` and `evaluate-qc` on folders of files, in-process (typer's CliRunner)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from data_factories import make_png_folder, write_model_file
from segability.analysis.results import QC, read_table
from segability.cli.app import app
from segability.estimation import GateStatus
from segability.estimation.qc import COMPARISON_COLUMNS, QC_COLUMNS

runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc")
    images, labels = make_png_folder(root, n=16, size=32, corrupt=False, orphan=False)
    model = write_model_file(root)
    return root, images, labels, f"{model}:tiny_net"


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def calibrated(files, tmp_path_factory):
    """One calibration of the module's model on its 16 labelled images: (calibration file, its run folder)."""
    _, images, labels, model = files
    cal = tmp_path_factory.mktemp("cal") / "calibration.json"
    res = _run("calibrate", "--model", model, "--images", images, "--labels", labels, "--out", cal, "--no-progress")
    assert res.exit_code == 0, res.output
    return cal, cal.with_name("calibration.run")


def test_calibrate_then_qc_flags_with_reasons(files, tmp_path):
    root, images, labels, model = files
    cal = tmp_path / "calibration.json"
    res = _run("calibrate", "--model", model, "--images", images, "--labels", labels, "--out", cal)
    assert res.exit_code == 0, res.output
    card = json.loads(cal.read_text())
    assert card["method"] in ("isotonic", "linear") and card["fingerprint"]["layers"]
    out = tmp_path / "qc"
    res = _run("qc", "--model", model, "--images", images, "--calibration", cal, "--out", out, "--threshold", "0.99", "--no-report")
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out / "qc.csv", keep_default_na=False)
    assert list(table.columns) == QC_COLUMNS
    assert len(table) == 16
    flagged = table[table["flag"].astype(str) == "True"]
    assert (flagged["reason"] != "").all()
    assert (out / "layers.parquet").exists()
    # the same command again does not overwrite without --force
    res = _run("qc", "--model", model, "--images", images, "--calibration", cal, "--out", out, "--no-report")
    assert res.exit_code == 2 and "--force" in res.output


def test_qc_refuses_a_calibration_of_another_model(files, tmp_path):
    root, images, labels, model = files
    cal = tmp_path / "calibration.json"
    assert _run("calibrate", "--model", model, "--images", images, "--labels", labels, "--out", cal).exit_code == 0
    other = model.replace(":tiny_net", ":pointwise_net")
    res = _run("qc", "--model", other, "--model-arg", "spatial_dims=2", "--images", images, "--calibration", cal, "--out", tmp_path / "o")
    assert res.exit_code == 2
    assert "fingerprint" in res.output.lower() or "another model" in res.output.lower()


def test_qc_without_calibration_says_what_to_do(files, tmp_path):
    _, images, _, model = files
    res = _run("qc", "--model", model, "--images", images, "--out", tmp_path / "o")
    assert res.exit_code == 2 and "segability calibrate" in res.output


def test_evaluate_qc_needs_labels(files, tmp_path):
    _, images, _, model = files
    res = _run("evaluate-qc", "--model", model, "--images", images, "--out", tmp_path / "e")
    assert res.exit_code == 2 and "--labels" in res.output


def test_evaluate_qc_writes_the_comparison(files, tmp_path):
    _, images, labels, model = files
    out = tmp_path / "e"
    res = _run("evaluate-qc", "--model", model, "--images", images, "--labels", labels, "--out", out, "--seeds", "0,1")
    assert res.exit_code == 0, res.output
    comparison = pd.read_csv(out / "qc_comparison.csv")
    assert list(comparison.columns[: len(COMPARISON_COLUMNS)]) == COMPARISON_COLUMNS
    assert comparison["method"].is_unique
    assert {"sa_all", "sa_input", "entropy", "tta_flip"} <= set(comparison["method"])
    scores = pd.read_csv(out / "qc_scores.csv")
    assert {"image", "dice", "sa_all", "entropy"} <= set(scores.columns) and len(scores) == 16


def test_qc_records_an_unreadable_file_and_gates_the_others(files, calibrated, tmp_path):
    _, _, _, model = files
    cal, _ = calibrated
    images, _ = make_png_folder(tmp_path / "data", n=3, size=32, corrupt=True, orphan=False)
    out = tmp_path / "qc"
    res = _run("qc", "--model", model, "--images", images, "--calibration", cal, "--out", out, "--no-report", "--no-progress")
    assert res.exit_code == 1, res.output
    assert "broken.png" in res.output
    errors = pd.read_csv(out / "errors.csv")
    assert [p.rsplit("/", 1)[-1] for p in errors["file"]] == ["broken.png"]
    table = read_table(out / "qc.csv", QC).set_index("image")
    assert sorted(table.index) == ["broken.png", "case0.png", "case1.png", "case2.png"]
    assert table.loc["broken.png", "status"] == GateStatus.FAILED and bool(table.loc["broken.png", "flag"])
    assert table.loc["broken.png", "reason"].startswith(GateStatus.FAILED.reason)
    others = table.drop(index="broken.png")
    assert (others["status"] != GateStatus.FAILED).all() and np.isfinite(others["estimated_dice"]).all()
    assert set(pd.read_parquet(out / "images.parquet")["image"]) == {"case0.png", "case1.png", "case2.png"}


def test_calibrate_and_qc_take_layers_and_preprocess(files, calibrated, tmp_path):
    _, images, labels, model = files
    _, plain_run = calibrated
    pre = tmp_path / "pre.json"  # intensities to [0, 1] (the model thresholds at 0.5), a 24 x 24 crop
    pre.write_text(json.dumps({"intensity": {"scale": [0, 1]}, "size": [24, 24]}))
    cal = tmp_path / "cal.json"
    res = _run("calibrate", "--model", model, "--images", images, "--labels", labels, "--out", cal,
               "--layers", "1", "--layers", "5", "--preprocess", pre, "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads(cal.read_text())["layers"] == ["1", "5"]
    run = tmp_path / "cal.run"
    assert set(pd.read_parquet(run / "layers.parquet")["layer"]) == {"input", "1", "5"}
    # the preprocessing reached the model: a 24 x 24 input, and scaled intensities change its predictions
    layers = pd.read_parquet(run / "layers.parquet")
    assert set(layers.loc[layers["layer"] == "input", "shape"]) == {"1x24x24"}
    scaled = pd.read_parquet(run / "images.parquet").set_index("image")["dice"]
    plain = pd.read_parquet(plain_run / "images.parquet").set_index("image")["dice"]
    assert (scaled.loc[plain.index] > plain + 0.2).all()
    # qc analyses the calibration's layers by default, with the same preprocessing
    out = tmp_path / "qc"
    res = _run("qc", "--model", model, "--images", images, "--calibration", cal, "--out", out, "--preprocess", pre,
               "--no-report", "--no-progress")
    assert res.exit_code == 0, res.output
    assert set(pd.read_parquet(out / "layers.parquet")["layer"]) == {"input", "1", "5"}
    table = read_table(out / "qc.csv", QC)
    assert list(table.columns) == QC_COLUMNS
    images_table = pd.read_parquet(out / "images.parquet").set_index("image")
    np.testing.assert_allclose(table.set_index("image")["mean_sa_pred"], images_table.loc[table["image"], "mean_sa_pred"])
    # --layers that leave out a calibration layer: a usage error before anything runs
    res = _run("qc", "--model", model, "--images", images, "--calibration", cal, "--out", tmp_path / "q2", "--layers", "3")
    assert res.exit_code == 2 and "calibration" in res.output
    assert not (tmp_path / "q2" / "layers.parquet").exists()


def test_qc_and_calibrate_read_a_finished_run(files, calibrated, tmp_path):
    from segability.batch import analyze_files

    _, images, labels, model = files
    cal, _ = calibrated
    run = tmp_path / "run"
    analyze_files(model, images, labels, out=run, report=False)
    res = _run("qc", "--run", run, "--calibration", cal, "--no-report")
    assert res.exit_code == 0, res.output
    table = read_table(run / "qc.csv", QC)
    assert len(table) == 16 and set(table["status"]) <= {s.value for s in GateStatus}
    # the same gate as analysing the files again
    out = tmp_path / "again"
    assert _run("qc", "--model", model, "--images", images, "--calibration", cal, "--out", out, "--no-report",
                "--no-progress", "--layers", "*").exit_code == 0
    again = read_table(out / "qc.csv", QC)
    pd.testing.assert_frame_equal(table[["image", "estimated_dice", "status"]], again[["image", "estimated_dice", "status"]])
    # a finished run fixes what was analysed
    res = _run("qc", "--run", run, "--calibration", cal, "--layers", "1", "--force", "--no-report")
    assert res.exit_code == 2 and "--layers" in res.output
    refit = tmp_path / "refit.json"
    res = _run("calibrate", "--run", run, "--out", refit)
    assert res.exit_code == 0, res.output
    assert json.loads(refit.read_text())["parameters"] == json.loads(cal.read_text())["parameters"]


# ------------------------------------------------------------------- the SA-profile estimator
@pytest.fixture(scope="module")
def profile_calibrated(files, tmp_path_factory):
    """A profile calibration of the module's model: its 16 labelled images plus 2 shifts at 1 severity."""
    _, images, labels, model = files
    cal = tmp_path_factory.mktemp("profile") / "calibration.json"
    res = _run("calibrate", "--model", model, "--images", images, "--labels", labels, "--out", cal, "--estimator", "profile",
               "--shifts", "blur,contrast", "--severities", "1.0", "--references", "8", "--no-progress")
    assert res.exit_code == 0, res.output
    return cal


def test_profile_calibration_file_records_features_model_references_and_version(files, profile_calibrated):
    import segability
    from segability.estimation.calibration import state_dict_hash
    from segability.estimation.qc import PROFILE_FORMAT, ProfileCalibration, references_path
    from segability.io import load_model

    card = json.loads(profile_calibrated.read_text())
    assert card["format"] == PROFILE_FORMAT
    assert card["shifts"] == ["blur", "contrast"] and card["severities"] == [1.0]
    est = card["estimator"]
    assert est["features"] and est["kind"] == "ridge" and len(est["coef"]) == len(est["features"])
    assert est["n"] == 16 * 3 and est["n_groups"] == 16  # every image and its two shifted versions
    assert card["version"] == est["version"] == segability.__version__
    refs = references_path(profile_calibrated)
    assert card["references"]["file"] == refs.name and refs.is_file() and card["references"]["images"] == 8
    cal = ProfileCalibration.load(profile_calibrated)
    assert cal.references is not None and cal.references.model_hash == cal.model_hash == card["model_hash"]
    assert card["model_hash"] == state_dict_hash(load_model(files[3], None, device="cpu"))


def test_profile_qc_flags_the_review_budget_with_reasons(files, profile_calibrated, tmp_path):
    from segability.estimation.estimator import FlagStatus

    _, images, _, model = files
    out = tmp_path / "qc"
    res = _run("qc", "--model", model, "--images", images, "--calibration", profile_calibrated, "--out", out,
               "--review-fraction", "0.25", "--no-report", "--no-progress")
    assert res.exit_code == 0, res.output
    table = read_table(out / "qc.csv", QC)
    assert list(table.columns[: len(QC.base_names)]) == list(QC.base_names) and len(table) == 16
    # ceil(0.25 * 16) = 4 least trusted; out-of-range images are flagged in any case (and come first)
    assert int(table["flag"].sum()) == max(math.ceil(0.25 * 16), int(table["out_of_range"].sum()))
    assert set(table["status"]) <= {s.value for s in FlagStatus}
    flagged, kept = table[table["flag"]], table[~table["flag"]]
    assert (flagged["status"] != FlagStatus.OK.value).all() and (kept["status"] == FlagStatus.OK.value).all()
    assert all(r == FlagStatus(s).message for s, r in zip(table["status"], table["reason"], strict=True))
    # the least trusted are flagged: no kept image has a lower bound below a flagged in-range one
    in_range = flagged[~flagged["out_of_range"]]
    if len(in_range) and len(kept):
        assert in_range["lower"].max() <= kept["lower"].min() + 1e-12
    inside = table[~table["out_of_range"]]
    assert ((inside["lower"] <= inside["estimated_dice"]) & (inside["estimated_dice"] <= inside["upper"])).all()
    outside = table[table["out_of_range"]]
    assert (outside["lower"] == 0).all() and (outside["upper"] == 1).all()
    # by threshold instead: every image below it, no budget
    out2 = tmp_path / "qc2"
    cut = float(table["estimated_dice"].median())
    res = _run("qc", "--model", model, "--images", images, "--calibration", profile_calibrated, "--out", out2,
               "--threshold", cut, "--no-report", "--no-progress")
    assert res.exit_code == 0, res.output
    by_cut = read_table(out2 / "qc.csv", QC)
    assert (by_cut["flag"] == ((by_cut["estimated_dice"] < cut) | by_cut["out_of_range"])).all()


def test_profile_qc_reads_a_finished_run_and_records_failed_files(files, profile_calibrated, tmp_path):
    _, _, _, model = files
    images, _ = make_png_folder(tmp_path / "data", n=4, size=32, corrupt=True, orphan=False)
    out = tmp_path / "qc"
    res = _run("qc", "--model", model, "--images", images, "--calibration", profile_calibrated, "--out", out, "--no-report",
               "--no-progress")
    assert res.exit_code == 1, res.output
    table = read_table(out / "qc.csv", QC).set_index("image")
    assert table.loc["broken.png", "status"] == GateStatus.FAILED and bool(table.loc["broken.png", "flag"])
    others = table.drop(index="broken.png")
    assert len(others) == 4 and np.isfinite(others["estimated_dice"]).all()
    assert int(others["flag"].sum()) >= math.ceil(0.2 * 4)  # the default budget, on the gated images only


def test_profile_calibration_of_another_model_is_refused(files, profile_calibrated, tmp_path):
    _, images, _, model = files
    other = model.replace(":tiny_net", ":pointwise_net")
    res = _run("qc", "--model", other, "--model-arg", "spatial_dims=2", "--images", images, "--calibration", profile_calibrated,
               "--out", tmp_path / "o", "--no-report")
    assert res.exit_code == 2 and "fitted for model" in res.output
    assert not (tmp_path / "o" / "qc.csv").exists()


def test_profile_options_are_checked(files, calibrated, profile_calibrated, tmp_path):
    from segability.cli.qc import PROFILE_SEVERITIES, PROFILE_SHIFTS
    from segability.estimation.qc import DEFAULT_SEVERITIES, DEFAULT_SHIFTS

    assert PROFILE_SHIFTS == ",".join(DEFAULT_SHIFTS)
    assert [float(s) for s in PROFILE_SEVERITIES.split(",")] == list(DEFAULT_SEVERITIES)
    _, images, labels, model = files
    mean_sa, _ = calibrated
    res = _run("qc", "--model", model, "--images", images, "--calibration", mean_sa, "--out", tmp_path / "a", "--review-fraction", "0.2")
    assert res.exit_code == 2 and "profile calibration" in res.output
    res = _run("qc", "--model", model, "--images", images, "--calibration", profile_calibrated, "--out", tmp_path / "b", "--use-lower")
    assert res.exit_code == 2 and "--use-lower" in res.output
    res = _run("calibrate", "--model", model, "--images", images, "--labels", labels, "--out", tmp_path / "c.json",
               "--estimator", "profile", "--shifts", "sunburn")
    assert res.exit_code == 2 and "sunburn" in res.output
