"""`segability calibrate`, `qc` and `evaluate-qc` on folders of files, in-process (typer's CliRunner)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from data_factories import make_png_folder, write_model_file
from segability.cli.app import app
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
