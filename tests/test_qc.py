"""Label-free QC (`segability.qc`) and its evaluation against baselines (`segability.evaluate_qc`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import segability
from segability import analyze
from segability.analysis.results import QC, read_table, write_table
from segability.estimation import GateStatus, quality_gate
from segability.estimation.qc import COMPARISON_COLUMNS, QC_COLUMNS, fit_calibration


class SmoothThreshold(nn.Module):
    """A fixed 'segmentation network': smooth, then threshold at 0.5 — noise makes it fail."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.smooth = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        with torch.no_grad():
            self.smooth.weight.copy_(torch.stack([torch.full((1, 3, 3), 1 / 9) * s for s in (1.0, 0.5, -1.0, 2.0)]))
        self.drop = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(4, 1, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1) * 20)
            self.head.bias.fill_(-10.0)

    def forward(self, x):
        return self.head(self.drop(self.smooth(x)))


class DeepSupervision(SmoothThreshold):
    """The same network plus a deep-supervision head that only training calls: the analysis
    captures it (every convolution) and finds it never called in eval mode."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        features = self.drop(self.smooth(x))
        out = self.head(features)
        return (out, self.aux(features)) if self.training else out


def _blobs(n: int, noise: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    images, labels = [], []
    for i in range(n):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 8)
        lab = ((yy - cy) ** 2 + (xx - cx) ** 2 < r**2).astype(np.float32)
        images.append(lab * 0.8 + 0.1 + rng.normal(0, noise[i], lab.shape))
        labels.append(lab)
    return torch.tensor(np.array(images), dtype=torch.float32)[:, None], torch.tensor(np.array(labels))[:, None]


@pytest.fixture(scope="module")
def data():
    noise = np.linspace(0.0, 1.0, 48)
    x, y = _blobs(48, noise)
    return x, y, noise


def test_evaluate_qc_table_and_ranking(data):
    x, y, noise = data
    torch.manual_seed(0)
    model = SmoothThreshold(dropout=0.2)
    ev = segability.evaluate_qc(model, x, y, seeds=(0, 1), batch_size=16)
    assert list(ev.comparison.columns[: len(COMPARISON_COLUMNS)]) == COMPARISON_COLUMNS
    methods = set(ev.comparison["method"])
    assert {"sa_all", "sa_input", "sa_calibrated", "sa_all+input", "sa_combined", "entropy", "max_prob_foreground",
            "boundary_confidence", "tta_flip", "mc_dropout"} <= methods
    assert set(ev.per_seed["seed"]) == {0, 1}
    # More noise -> worse output: true Dice falls with noise, and the label-free SA follows it.
    scores = ev.scores.set_index("image")
    assert scores["dice"].corr(pd.Series(noise, index=scores.index), method="spearman") < -0.5
    row = ev.comparison.set_index("method").loc["sa_all"]
    assert row["spearman"] > 0.5
    assert 0 <= row["mae"] <= 0.3
    assert 0 <= row["aurc"] <= 1 and row["eaurc"] >= -1e-12


def test_evaluate_qc_needs_labels(data):
    x, _, _ = data
    with pytest.raises(ValueError, match="labels"):
        segability.evaluate_qc(SmoothThreshold(), x, None)


def test_qc_flags_with_reasons_and_refuses_a_foreign_calibration(data, tmp_path):
    x, y, _ = data
    model = SmoothThreshold()
    res = segability.analyze(model, x, y)
    cal = fit_calibration(model, res)
    cal.save(tmp_path / "calibration.json")
    loaded = segability.Calibration.load(tmp_path / "calibration.json")
    table, result = segability.qc(model, x, calibration=loaded, threshold=0.9)
    assert list(table.columns) == QC_COLUMNS
    assert result.images["dice"].isna().all()  # label-free run
    flagged = table[table["flag"]]
    assert len(flagged) > 0 and (flagged["reason"] != "").all()
    # Estimated Dice follows true Dice on these images.
    truth = res.images.set_index("image")["dice"]
    est = table.set_index("image")["estimated_dice"]
    assert est.corr(truth.loc[est.index], method="spearman") > 0.5
    other = SmoothThreshold()
    with torch.no_grad():
        other.head.bias.fill_(-9.0)
    with pytest.raises(ValueError, match="(?i)fingerprint|another model|different model"):
        segability.qc(other, x, calibration=loaded)


def test_empty_prediction_is_flagged_not_perfect():
    model = SmoothThreshold()
    x = torch.zeros(3, 1, 32, 32)  # nothing above threshold: empty predictions
    x[0, 0, 8:20, 8:20] = 0.9
    xs, ys = _blobs(24, np.linspace(0, 0.5, 24))
    cal = fit_calibration(model, segability.analyze(model, xs, ys))
    table, _ = segability.qc(model, x, calibration=cal)
    empty = table.iloc[1:]
    assert empty["flag"].all()
    assert (empty["status"] == GateStatus.EMPTY_PREDICTION).all()
    assert empty["reason"].str.contains("empty").all()
    assert empty["estimated_dice"].isna().all()


def test_calibration_combines_mean_and_input_sa_and_keeps_it_on_disk(data, tmp_path):
    x, y, _ = data
    model = SmoothThreshold()
    res = segability.analyze(model, x, y)
    plain = fit_calibration(model, res, score="mean_sa")
    assert plain.combination == {}
    combined = fit_calibration(model, res)
    assert set(combined.combination) == {"mean_sa_pred", "input_sa_pred"}
    # the weights are the least-squares fit of Dice on the two scores (with an intercept)
    im = res.images.dropna(subset=["mean_sa_pred", "input_sa_pred", "dice"])
    design = np.column_stack([im["mean_sa_pred"], im["input_sa_pred"], np.ones(len(im))])
    coef = np.linalg.lstsq(design, im["dice"], rcond=None)[0]
    assert combined.combination["mean_sa_pred"] == pytest.approx(coef[0])
    assert combined.combination["input_sa_pred"] == pytest.approx(coef[1])
    combined.save(tmp_path / "c.json")
    again = segability.Calibration.load(tmp_path / "c.json")
    assert again.combination == pytest.approx(combined.combination)
    gate_a, _ = segability.qc(model, x, calibration=combined)
    gate_b, _ = segability.qc(model, x, calibration=again)
    pd.testing.assert_frame_equal(gate_a, gate_b)
    with pytest.raises(ValueError, match="score"):
        fit_calibration(model, res, score="median")


def test_a_layer_never_called_in_eval_mode_changes_nothing(data):
    """Calibration and the gate skip a layer without any defined SA (here a deep-supervision head)
    and give the numbers of the same network without it."""
    x, y, _ = data
    plain, deep = SmoothThreshold(), DeepSupervision()
    deep.load_state_dict({**plain.state_dict(), **{k: v for k, v in deep.state_dict().items() if k.startswith("aux.")}})
    res_plain, res_deep = segability.analyze(plain, x, y), segability.analyze(deep, x, y)
    aux = res_deep.layers[res_deep.layers["layer"] == "aux"]
    assert (aux["status"] == "not_called").all() and aux["sa_pred"].isna().all()
    pd.testing.assert_frame_equal(res_deep.images, res_plain.images)  # mean_sa_pred skips the head
    cal_plain, cal_deep = fit_calibration(plain, res_plain), fit_calibration(deep, res_deep)
    assert cal_deep.layers == cal_plain.layers == ["smooth", "head"]
    assert cal_deep.parameters == pytest.approx(cal_plain.parameters)
    assert cal_deep.combination == pytest.approx(cal_plain.combination)
    assert (cal_deep.radius, cal_deep.n, cal_deep.input_sa_threshold) == pytest.approx(
        (cal_plain.radius, cal_plain.n, cal_plain.input_sa_threshold))
    # the gate, analysing every convolution again (the head included), gives the same table
    gate_plain, _ = segability.qc(plain, x, calibration=cal_plain, threshold=0.9, layers="auto")
    gate_deep, _ = segability.qc(deep, x, calibration=cal_deep, threshold=0.9, layers="auto")
    pd.testing.assert_frame_equal(gate_deep, gate_plain)
    # and the explicit rule: a calibration that names the head averages only the defined layers
    with_aux = fit_calibration(deep, res_deep, layers=["smooth", "head", "aux"])
    assert with_aux.parameters == pytest.approx(cal_plain.parameters)


def test_qc_csv_columns_and_status_against_a_hand_made_case(tmp_path):
    """qc.csv through the QC schema: the columns named by what they hold, one status per verdict."""
    cal = segability.Calibration("linear", {"slope": 1.0, "intercept": 0.0}, 0.05, 0.1, ["l1", "l2"],
                                 segability.estimation.fingerprint("h", ["l1", "l2"]), 100, input_sa_threshold=0.5)
    layers = pd.DataFrame({
        "image": ["good"] * 3 + ["hard"] * 3 + ["broken"] * 3 + ["empty"] * 3,
        "layer": ["input", "l1", "l2"] * 4,
        "sa_pred": [0.8, 0.9, 0.7, 0.2, 0.3, np.nan, 0.9, 0.5, 0.3, np.nan, np.nan, np.nan],
    })
    images = pd.DataFrame({"image": ["good", "hard", "broken", "empty"], "input_sa": np.nan,
                           "input_sa_pred": [0.8, 0.2, 0.9, np.nan], "status": ["ok", "ok", "ok", "empty_prediction"]})
    gate = quality_gate(images, cal, layers=layers, input_column="input_sa_pred")
    write_table(gate, tmp_path / "qc.csv", QC)
    back = read_table(tmp_path / "qc.csv", QC).set_index("image")
    assert list(back.reset_index().columns) == QC_COLUMNS
    assert back["status"].to_dict() == {"good": "ok", "hard": "low_input_sa", "broken": "model_fails",
                                        "empty": "empty_prediction"}
    assert back["flag"].to_dict() == {"good": False, "hard": True, "broken": True, "empty": True}
    # mean_sa_pred over the calibration's layers, the undefined l2 of "hard" skipped: 0.8, 0.3, 0.4
    assert back["mean_sa_pred"].to_dict() == pytest.approx({"good": 0.8, "hard": 0.3, "broken": 0.4, "empty": np.nan},
                                                           nan_ok=True)
    assert back["estimated_dice"]["broken"] == pytest.approx(0.4)
    assert back["input_sa_pred"]["hard"] == 0.2 and np.isnan(back["input_sa"]["hard"])
    assert back["input_sa_source"]["hard"] == "prediction"
    assert back["reason"]["broken"] == GateStatus.MODEL_FAILS.reason and back["reason"]["good"] == ""


# ------------------------------------------------------------------- the SA-profile estimator
def _profile_calibration(tmp_path):
    """A profile calibration of a small 2D UNet on 12 random labelled images (2 shifts, 1 severity)."""
    from monai.networks.nets import UNet

    from segability.estimation.qc import fit_profile_calibration

    torch.manual_seed(0)
    net = UNet(2, 1, 1, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    x = torch.rand(12, 1, 16, 16)
    y = (x > 0.6).float()
    ids = [f"i{k}" for k in range(12)]
    result = analyze(net, x, y, ids=ids, batch_size=12)
    items = [(i, x[k], y[k]) for k, i in enumerate(ids)]
    cal = fit_profile_calibration(net, items, result, shifts=("blur", "contrast"), severities=(1.0,), n_references=4)
    return net, x, ids, result, cal


def test_profile_calibration_round_trip_gate_and_failed_rows(tmp_path):
    from segability.errors import UsageError
    from segability.estimation.estimator import FlagStatus
    from segability.estimation.qc import (
        PROFILE_COLUMNS,
        ProfileCalibration,
        load_calibration,
        profile_gate,
        references_path,
    )

    net, x, ids, result, cal = _profile_calibration(tmp_path)
    assert cal.estimator.n == 12 * 3 and cal.estimator.n_groups == 12 and len(cal.references) == 4
    path = cal.save(tmp_path / "cal.json")
    back = load_calibration(path)
    assert isinstance(back, ProfileCalibration) and back.layers == cal.layers and back.shifts == ["blur", "contrast"]
    back.check_model(net)
    prof = back.profile(net, [(i, x[k]) for k, i in enumerate(ids)], result)
    pd.testing.assert_frame_equal(prof, cal.profile(net, [(i, x[k]) for k, i in enumerate(ids)], result))
    table = profile_gate(prof, back, result=result, review_fraction=0.25, failed={"gone.png": "OSError: truncated"})
    assert list(table.columns) == PROFILE_COLUMNS and len(table) == 13
    gated = table[table["image"] != "gone.png"]
    assert int(gated["flag"].sum()) == max(3, int(gated["out_of_range"].sum()))  # ceil(0.25 * 12) = 3
    assert set(gated["status"]) <= {s.value for s in FlagStatus}
    assert table.set_index("image").loc["gone.png", "status"] == "failed"
    # another model, and a reference cache changed after the fact, are refused
    other = torch.nn.Conv2d(1, 1, 1)
    with pytest.raises(UsageError, match="fitted for model"):
        back.check_model(other)
    refs = references_path(path)
    refs.write_bytes(refs.read_bytes() + b"\0")
    with pytest.raises(UsageError, match="changed"):
        load_calibration(path)


def test_shift_image_keeps_the_intensity_range():
    from segability.estimation.qc import shift_image

    x = torch.rand(1, 32, 32)
    for scale in (1.0, 1000.0):
        out = shift_image(x * scale, "contrast", 1.0)
        # contrast around the mean: the same relative change at any scale
        torch.testing.assert_close(out / scale, shift_image(x, "contrast", 1.0), rtol=1e-4, atol=1e-4)
