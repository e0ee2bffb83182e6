"""The embedded default: shipped reference model, reduced demo run, trainer."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from segability.analysis.results import QC, read_table
from segability.cli.app import app
from segability.demo import DemoConfig, decoder_start, layer_findings, run_demo
from segability.estimation.estimator import FlagStatus
from segability.models import file_sha256, load_reference_model, reference_card, reference_paths
from segability.train import TrainConfig, train_reference


def test_shipped_model_matches_its_card():
    weights, card_path = reference_paths()
    card = reference_card()
    assert weights.stat().st_size < 5 * 2**20  # a few MB at most
    assert card["sha256"] == file_sha256(weights)
    for key in ("command", "seed", "epochs", "validation_dice", "training_seconds", "segability"):
        assert key in card
    model = load_reference_model()
    assert not model.training
    out = model(torch.zeros(1, 1, 128, 128))
    assert out.shape == (1, 1, 128, 128)


def test_altered_checkpoint_is_refused(tmp_path, monkeypatch):
    weights, card = reference_paths()
    bad = tmp_path / "data"
    bad.mkdir()
    state = torch.load(weights, weights_only=True)
    first = next(iter(state))
    state[first] = state[first] + 1
    torch.save(state, bad / "reference_unet.pt")
    (bad / "reference_unet.json").write_text(card.read_text())
    monkeypatch.setattr("segability.models.reference_paths", lambda: (bad / "reference_unet.pt", bad / "reference_unet.json"))
    with pytest.raises(ValueError, match="sha256"):
        load_reference_model()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    summary = run_demo(out, config=DemoConfig.quick(), cache_dir=tmp_path_factory.mktemp("cache"))
    return out, summary


def test_reduced_demo_writes_a_complete_run_folder(demo_run):
    out, summary = demo_run
    for name in ("layers.parquet", "images.parquet", "units.parquet", "settings.json", "maps.npz", "qc.csv",
                 "findings.json", "timing.json", "report.html"):
        assert (out / name).exists(), name
    images = pd.read_parquet(out / "images.parquet")
    cfg = DemoConfig.quick()
    assert len(images) == cfg.n_test + cfg.n_shift * len(cfg.shifts) * len(cfg.severities)
    assert set(images["group"]) == {"clean", *cfg.shifts}
    layers = pd.read_parquet(out / "layers.parquet")
    assert layers["sa_pred"].dropna().between(0, 1).all()
    assert "input" in set(layers["layer"])
    findings = json.loads((out / "findings.json").read_text())["findings"]
    spearman = [f for f in findings if isinstance(f, dict) and "mean SA follows true Dice" in f["text"]]
    assert len(spearman) == 1 and spearman[0]["images"] == "all"
    per_layer = [f for f in findings if isinstance(f, dict) and f["images"] == {"group": ["clean"]}]
    assert per_layer, "the layer findings name the clean images they are computed on"
    # qc.csv follows the QC schema: every column named by what it holds, a status per verdict
    qc = read_table(out / "qc.csv", QC)
    assert list(qc.columns[: len(QC.base_names)]) == list(QC.base_names)
    assert {"mean_sa_pred", "input_sa_pred", "dice", "out_of_range"} <= set(qc.columns)
    assert set(qc["status"]) <= {s.value for s in FlagStatus}
    assert (qc["flag"] == (qc["status"] != FlagStatus.OK)).all()
    assert all(r == FlagStatus(st).message for st, r in zip(qc["status"], qc["reason"], strict=True))
    # the profile estimator gates the held-out half by a 20 % budget: ceil(0.2 n) least trusted,
    # or more when more images are out of range (always flagged, with the interval [0, 1])
    k = math.ceil(cfg.review_fraction * len(qc))
    assert int(qc["flag"].sum()) == max(k, int(qc["out_of_range"].sum())) and summary.flagged == int(qc["flag"].sum())
    assert ((qc.loc[qc["out_of_range"], "lower"] == 0) & (qc.loc[qc["out_of_range"], "upper"] == 1)).all()
    assert len(qc) < len(images) and summary.n_gate == len(qc)  # the other half calibrated the estimator
    gate_note = [f for f in findings if isinstance(f, str) and f.startswith("Quality gate")]
    assert len(gate_note) == 1 and f"flags {summary.flagged}" in gate_note[0] and "Spearman" in gate_note[0]
    timing = json.loads((out / "timing.json").read_text())
    assert timing["seconds"]["total"] > 0
    # the summary's correlation is the one measured on the saved table
    valid = images.dropna(subset=["mean_sa_pred", "dice"])
    assert summary.spearman == pytest.approx(valid["mean_sa_pred"].corr(valid["dice"], method="spearman"))


def test_demo_never_overwrites_without_force(demo_run, tmp_path):
    out, _ = demo_run
    with pytest.raises(FileExistsError, match="--force"):
        run_demo(out, config=DemoConfig.quick(), report=False)
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out), "--no-report"])
    assert res.exit_code == 2 and "--force" in res.output


def test_layer_findings_on_a_hand_made_table():
    rows = []
    for depth, (name, sa) in enumerate([("input", 0.3), ("enc1", 0.4), ("enc2", 0.5), ("enc3", 0.6), ("up1", 0.9), ("up2", 0.8)]):
        rows += [{"image": str(i), "layer": name, "depth": depth, "sa": sa + d, "sa_pred": sa} for i, d in enumerate((-0.01, 0.01))]
    table = pd.DataFrame(rows)
    assert decoder_start(table) == 4
    per, notes = layer_findings(table, 4)
    assert per.set_index("layer").loc["up1", "mean"] == pytest.approx(0.9)
    text = " ".join(notes)
    assert "rises" in text and "peaks in the decoder at layer up1" in text


def test_training_records_sa_per_layer_per_epoch(tmp_path):
    cfg = TrainConfig(epochs=2, steps_per_epoch=3, n_train=16, n_val=8, sa_images=4, batch_size=4, threads=1)
    result = train_reference(cfg, out_dir=tmp_path, cache_dir=tmp_path / "cache", command="test")
    hist = pd.read_csv(tmp_path / "history.csv")
    assert set(hist["epoch"]) == {1, 2}
    assert {"epoch", "layer", "sa", "sa_pred", "val_dice"} <= set(hist.columns)
    assert hist.groupby("epoch")["layer"].nunique().eq(hist["layer"].nunique()).all()
    card = json.loads((tmp_path / "reference_unet.json").read_text())
    assert card["sha256"] == file_sha256(tmp_path / "reference_unet.pt")
    assert card["epochs"] == 2 and card["command"] == "test"
    # the checkpoint loads into the reference architecture with weights_only=True
    load_reference_model(tmp_path / "reference_unet.pt")
    assert result.card["validation_dice"] == card["validation_dice"]
