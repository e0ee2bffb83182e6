"""segability.estimation: layer selection, calibration, the quality gate and the evaluation metrics."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import roc_auc_score

from segability.analysis.results import QC, layer_means
from segability.estimation import (
    REASON_EMPTY,
    REASON_LOW_INPUT_SA,
    REASON_MODEL_FAILS,
    REASON_NO_INPUT_SA,
    Calibration,
    GateStatus,
    MetricUndefinedWarning,
    aurc,
    compare_methods,
    conformal_radius,
    decoder_layers,
    defined_layers,
    eaurc,
    failure_auroc,
    fingerprint,
    mean_sa,
    pearson,
    quality_gate,
    select_layers,
    spearman,
    state_dict_hash,
)
from segability.estimation.selection import layer_roles

FP = fingerprint("modelhash", ["l1", "l2"])


def layers_table(values: dict[str, dict[str, float]], depth: dict[str, int] | None = None) -> pd.DataFrame:
    """Build a layers table from {image: {layer: sa_pred}}."""
    rows = []
    for image, per_layer in values.items():
        for i, (layer, v) in enumerate(per_layer.items()):
            d = depth[layer] if depth else i
            rows.append({"image": image, "layer": layer, "depth": d, "channels": 4, "shape": "4x8x8",
                         "sa": math.nan, "sa_pred": v, "reason": ""})
    return pd.DataFrame(rows)


def linear_cal(radius: float = 0.1, input_threshold: float | None = 0.5) -> Calibration:
    return Calibration("linear", {"slope": 1.0, "intercept": 0.0}, radius, 0.1, ["l1", "l2"], FP, 100,
                       input_sa_threshold=input_threshold)


# ================================================================================= selection
def test_mean_sa_excludes_input_and_averages_by_hand():
    t = layers_table({"a": {"input": 0.1, "l1": 0.6, "l2": 0.8}, "b": {"input": 0.9, "l1": 0.2, "l2": 0.4}})
    m = mean_sa(t)
    assert m.index.tolist() == ["a", "b"]
    assert m["a"] == pytest.approx(0.7) and m["b"] == pytest.approx(0.3)
    m_in = mean_sa(t, ["input", "l1"])
    assert m_in["a"] == pytest.approx(0.35) and m_in["b"] == pytest.approx(0.55)
    assert mean_sa(t, ["l2"])["b"] == pytest.approx(0.4)


def test_mean_sa_skips_undefined_layers_as_the_result_folder_does():
    """One rule for mean_sa / mean_sa_pred: undefined layers are skipped; no defined layer gives NaN."""
    t = layers_table({"a": {"input": 0.5, "l1": math.nan, "l2": 0.9, "l3": 0.6},
                      "b": {"input": 0.4, "l1": math.nan, "l2": math.nan, "l3": math.nan}})
    t["sa"] = t["sa_pred"] - 0.1
    m = mean_sa(t)
    assert m["a"] == pytest.approx(0.75) and math.isnan(m["b"])
    assert mean_sa(t, ["l1", "l3"])["a"] == pytest.approx(0.6)
    # the same numbers as the result folder's definition of the names
    means = layer_means(t)
    pd.testing.assert_series_equal(mean_sa(t), means["mean_sa_pred"], check_names=False, check_index_type=False)
    pd.testing.assert_series_equal(mean_sa(t, column="sa"), means["mean_sa"], check_names=False, check_index_type=False)
    assert defined_layers(t) == ["l2", "l3"]


def test_mean_sa_unknown_layer_lists_close_matches():
    t = layers_table({"a": {"decoder1": 0.5, "decoder2": 0.6}})
    with pytest.raises(ValueError, match=r"decoder3.*close matches.*decoder"):
        mean_sa(t, ["decoder3"])
    with pytest.raises(ValueError, match="column"):
        mean_sa(t.drop(columns="sa_pred"))


def test_select_all_and_decoder_keyword_rule():
    names = ["input", "encoder1", "encoder2", "bottleneck", "decoder2", "up_layers.0", "upcat_1", "head"]
    t = layers_table({"a": {n: 0.5 for n in names}})
    assert select_layers(t) == names[1:]
    assert select_layers(t, how="all", k=2) == ["encoder1", "encoder2"]
    assert select_layers(t, how="decoder") == ["decoder2", "up_layers.0", "upcat_1"]


def test_decoder_rule_on_real_monai_unet_names():
    from monai.networks.nets import UNet

    net = UNet(2, 1, 1, (4, 8, 16), (2, 2), num_res_units=0)
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    # Forward order of this UNet: down0, down1, bottom, up1, up0.
    assert convs == ["model.0.conv", "model.1.submodule.0.conv", "model.1.submodule.1.submodule.conv",
                     "model.1.submodule.2.conv", "model.2.conv"]
    assert decoder_layers(convs) == ["model.1.submodule.2.conv", "model.2.conv"]
    assert layer_roles(["input", *convs]) == {
        "input": None,
        "model.0.conv": "encoder",
        "model.1.submodule.0.conv": "encoder",
        "model.1.submodule.1.submodule.conv": "bottleneck",
        "model.1.submodule.2.conv": "decoder",
        "model.2.conv": "decoder",
    }


def test_layer_roles_of_a_residual_monai_unet_follow_its_forward_order():
    """Every layer of a real MONAI UNet with residual units: encoder, then bottleneck, then decoder."""
    from monai.networks.nets import UNet

    net = UNet(2, 1, 1, (4, 8, 16, 32), (2, 2, 2), num_res_units=1)
    convs = [n for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    roles = list(layer_roles(convs).values())
    first_bottom, first_up = roles.index("bottleneck"), roles.index("decoder")
    assert roles == (
        ["encoder"] * first_bottom
        + ["bottleneck"] * (first_up - first_bottom)
        + ["decoder"] * (len(roles) - first_up)
    )
    assert first_bottom == 6 and first_up - first_bottom == 2  # 3 down blocks of 2 convs, 1 bottom
    assert decoder_layers(convs) == convs[first_up:]


def test_layer_roles_from_name_words():
    basic_unet = ["conv_0", "down_1", "down_4", "upcat_4", "upcat_1", "final_conv"]
    assert layer_roles(basic_unet) == {
        "conv_0": None,
        "down_1": "encoder",
        "down_4": "encoder",
        "upcat_4": "decoder",
        "upcat_1": "decoder",
        "final_conv": None,
    }
    assert layer_roles(["encoder.layers.2", "decoderBlock3", "UpSample1", "encoder.up", "mid.bottleneck"]) == {
        "encoder.layers.2": "encoder",
        "decoderBlock3": "decoder",
        "UpSample1": "decoder",
        "encoder.up": None,  # words of two paths: not told
        "mid.bottleneck": "bottleneck",
    }
    # words win over structure: one name with a word leaves MONAI-like names without a role
    assert layer_roles(["model.0.conv", "model.2.upsample"]) == {"model.0.conv": None, "model.2.upsample": "decoder"}
    # neither rule: no role; "update" and "decay" are not "up"/"dec"
    assert set(layer_roles(["block1", "update_gate", "decay.2", "model.head"]).values()) == {None}
    t = layers_table({"a": {"input": 0.1, "enc": 0.2, "dec": 0.3}}, depth={"input": 0, "dec": 1, "enc": 2})
    assert list(layer_roles(t).items()) == [("input", None), ("dec", "decoder"), ("enc", "encoder")]  # by depth
    with pytest.raises(ValueError, match="string"):
        layer_roles("model.0.conv")


def test_decoder_depth_fallback_second_half():
    t = layers_table({"a": {"input": 0.5, "b3": 0.1, "b1": 0.2, "b2": 0.3, "b4": 0.4, "b5": 0.5}},
                     depth={"input": 0, "b1": 1, "b2": 2, "b3": 3, "b4": 4, "b5": 5})
    assert decoder_layers(t) == ["b4", "b5"]  # forward order from depth, the middle b3 left out
    assert decoder_layers(["x1", "x2", "x3", "x4"]) == ["x3", "x4"]


def _calibration_set(n: int, seed: int) -> tuple[pd.DataFrame, pd.Series]:
    rng = np.random.default_rng(seed)
    dice = rng.uniform(0.2, 0.95, n)
    values = {}
    for i in range(n):
        values[f"im{i}"] = {
            "input": rng.uniform(),
            "good1": dice[i] + rng.normal(0, 0.08),
            "noise1": rng.uniform(),
            "good2": dice[i] + rng.normal(0, 0.08),
            "noise2": rng.uniform(),
            "anti": 1 - dice[i] + rng.normal(0, 0.05),
        }
    return layers_table(values), pd.Series(dice, index=[f"im{i}" for i in range(n)])


def test_select_calibrated_ranks_by_spearman_and_cross_validates_k():
    t, dice = _calibration_set(80, seed=0)
    top = select_layers(t, dice, how="calibrated", k=2)
    assert set(top) == {"good1", "good2"}
    assert select_layers(t, dice, how="calibrated", k=6)[-1] == "anti"
    # Two independent noisy copies of the Dice: their mean beats either; noise layers only hurt.
    assert set(select_layers(t, dice, how="calibrated")) == {"good1", "good2"}
    with pytest.raises(ValueError, match="dice"):
        select_layers(t, how="calibrated")
    with pytest.raises(ValueError, match="how"):
        select_layers(t, dice, how="best")  # type: ignore[arg-type]


# ================================================================================= calibration
def _linear_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    s = rng.uniform(0, 1, n)
    return s, np.clip(0.2 + 0.7 * s + rng.normal(0, 0.05, n), 0, 1)


def test_conformal_radius_rank():
    r = np.arange(1.0, 20.0)  # m = 19, rank ceil(20 * 0.9) = 18
    assert conformal_radius(r, 0.1) == 18.0
    assert conformal_radius(np.arange(1.0, 10.0), 0.05) == math.inf  # rank 10 > 9
    assert conformal_radius(np.array([3.0, 1.0, 2.0]), 0.5) == 2.0  # ceil(4 * 0.5) = 2


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_split_conformal_coverage_linear(alpha):
    rng = np.random.default_rng(123)
    cover, n_conf = [], None
    for seed in range(300):
        s, d = _linear_data(rng, 100)
        cal = Calibration.fit(s, d, method="linear", alpha=alpha, fingerprint=FP, layers=["l1", "l2"], seed=seed)
        n_conf = cal.n - cal.n_fit
        st_, dt = _linear_data(rng, 200)
        p = cal.predict(st_)
        cover.append(np.mean((dt >= p.lower) & (dt <= p.upper)))
    # Split conformal: 1 - alpha <= E[coverage] <= 1 - alpha + 1 / (m + 1); the mean over 300 draws
    # has a standard error of about 0.003.
    mean = float(np.mean(cover))
    assert 1 - alpha - 0.01 <= mean <= 1 - alpha + 1 / (n_conf + 1) + 0.01


def test_split_conformal_coverage_isotonic_nonlinear():
    rng = np.random.default_rng(7)
    cover = []
    for seed in range(100):
        s = rng.uniform(0, 1, 120)
        d = np.clip(s**3 + rng.normal(0, 0.05, 120), 0, 1)
        cal = Calibration.fit(s, d, method="isotonic", alpha=0.1, fingerprint=FP, layers=["l1", "l2"], seed=seed)
        st_ = rng.uniform(0, 1, 200)
        dt = np.clip(st_**3 + rng.normal(0, 0.05, 200), 0, 1)
        p = cal.predict(st_)
        cover.append(np.mean((dt >= p.lower) & (dt <= p.upper)))
    assert 0.88 <= float(np.mean(cover)) <= 0.9 + 1 / 61 + 0.015


def test_auto_picks_linear_for_linear_and_isotonic_for_nonlinear():
    linear_chosen = 0
    for seed in range(10):
        rng = np.random.default_rng(seed)
        s = rng.uniform(0, 1, 300)
        d = np.clip(0.1 + 0.8 * s + rng.normal(0, 0.05, 300), 0, 1)
        cal = Calibration.fit(s, d, fingerprint=FP, layers=["l1", "l2"], seed=seed)
        linear_chosen += cal.method == "linear"
        assert set(cal.cv_mae) == {"linear", "isotonic"} and cal.choice.startswith(cal.method)
    assert linear_chosen >= 9
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        s = rng.uniform(0, 1, 100)
        d = np.clip(np.where(s > 0.5, 0.9, 0.2) + rng.normal(0, 0.03, 100), 0, 1)
        cal = Calibration.fit(s, d, fingerprint=FP, layers=["l1", "l2"], seed=seed)
        assert cal.method == "isotonic", cal.choice
        assert cal.cv_mae["isotonic"] < cal.cv_mae["linear"]
        assert "isotonic" in cal.choice and "standard error" in cal.choice


def test_isotonic_predictions_equal_sklearn_and_stay_in_unit_interval():
    rng = np.random.default_rng(3)
    s = rng.uniform(0, 1, 80)
    d = np.clip(s**2 + rng.normal(0, 0.1, 80), 0, 1)
    cal = Calibration.fit(s, d, method="isotonic", fingerprint=FP, layers=["l1", "l2"], seed=5)
    order = np.random.default_rng(5).permutation(80)
    fit_idx = order[cal.n - cal.n_fit:]
    ref = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip").fit(s[fit_idx], d[fit_idx])
    grid = np.linspace(-0.5, 1.5, 101)
    np.testing.assert_allclose(cal.predict(grid).estimated_dice, ref.predict(grid), atol=1e-12)


def test_linear_fit_is_clipped_and_recovers_line():
    s = np.linspace(0, 1, 40)
    d = 0.1 + 0.8 * s
    cal = Calibration.fit(s, d, method="linear", fingerprint=FP, layers=["l1", "l2"])
    assert cal.parameters["slope"] == pytest.approx(0.8) and cal.parameters["intercept"] == pytest.approx(0.1)
    assert cal.radius == pytest.approx(0.0, abs=1e-12)
    p = cal.predict(pd.Series([0.5, 2.0, -1.0, math.nan], index=list("wxyz")))
    assert p.index.tolist() == list("wxyz")
    assert p.estimated_dice["w"] == pytest.approx(0.5)
    assert p.estimated_dice["x"] == 1.0 and p.estimated_dice["y"] == 0.0
    assert p.loc["z"].isna().all()


def test_json_round_trip_same_predictions(tmp_path):
    rng = np.random.default_rng(0)
    s, d = _linear_data(rng, 60)
    cal = Calibration.fit(s, d, method="isotonic", fingerprint=FP, layers=["l1", "l2"],
                          input_sa=rng.uniform(0.3, 0.9, 60), input_sa_quantile=0.2)
    path = tmp_path / "cal.json"
    cal.save(path)
    data = json.loads(path.read_text())
    assert data["method"] == "isotonic" and len(data["parameters"]["x"]) == len(data["parameters"]["y"])
    assert data["fingerprint"] == FP and data["version"] and data["n"] == 60
    back = Calibration.load(path)
    assert back == cal
    grid = np.linspace(-0.2, 1.2, 57)
    pd.testing.assert_frame_equal(back.predict(grid), cal.predict(grid))
    assert back.input_sa_threshold is not None and back.input_sa_threshold == cal.input_sa_threshold


def test_infinite_radius_round_trips(tmp_path):
    s = np.linspace(0, 1, 8)
    with pytest.warns(UserWarning, match="too few"):
        cal = Calibration.fit(s, s, method="linear", alpha=0.05, fingerprint=FP, layers=["l1", "l2"])
    assert cal.radius == math.inf
    cal.save(tmp_path / "c.json")
    back = Calibration.load(tmp_path / "c.json")
    assert back.radius == math.inf
    p = back.predict([0.5])
    assert (p.lower[0], p.upper[0]) == (0.0, 1.0)


def test_input_sa_threshold_is_the_quantile():
    rng = np.random.default_rng(1)
    s, d = _linear_data(rng, 40)
    inp = np.append(rng.uniform(size=40), math.nan)
    cal = Calibration.fit(s, d, fingerprint=FP, layers=["l1", "l2"], input_sa=inp, input_sa_quantile=0.1)
    assert cal.input_sa_threshold == pytest.approx(np.quantile(inp[:-1], 0.1))


def test_fingerprint_refusal():
    cal = linear_cal()
    cal.check_fingerprint(fingerprint("modelhash", ["l2", "l1"]))  # order does not matter
    with pytest.raises(ValueError, match=r"another model.*model differs"):
        cal.check_fingerprint(fingerprint("otherhash", ["l1", "l2"]))
    with pytest.raises(ValueError, match=r"layers differ.*only in the calibration: \['l2'\].*\['l3'\]"):
        cal.check_fingerprint(fingerprint("modelhash", ["l1", "l3"]))
    with pytest.raises(ValueError, match="fingerprint: its layers"):
        Calibration.fit(np.arange(10.0) / 10, np.arange(10.0) / 10, fingerprint=FP, layers=["l1"])


def test_state_dict_hash_sees_values_names_and_buffers():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    b = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert state_dict_hash(a) != state_dict_hash(b)
    b.load_state_dict(a.state_dict())
    h = state_dict_hash(a)
    assert h == state_dict_hash(b) == state_dict_hash(a.state_dict()) and len(h) == 64
    with torch.no_grad():
        b[1].running_mean += 1e-3  # a buffer, not a parameter
    assert state_dict_hash(b) != h
    renamed = {f"x.{k}": v for k, v in a.state_dict().items()}
    assert state_dict_hash(renamed) != h
    assert state_dict_hash(a.half()) != h


def test_fit_rejects_bad_input():
    s = np.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="same length"):
        Calibration.fit(s, s[:5], fingerprint=FP, layers=["l1", "l2"])
    with pytest.raises(ValueError, match=r"dice values must lie in \[0, 1\]"):
        Calibration.fit(s, s + 1, fingerprint=FP, layers=["l1", "l2"])
    with pytest.raises(ValueError, match="alpha"):
        Calibration.fit(s, s, alpha=1.5, fingerprint=FP, layers=["l1", "l2"])
    with pytest.raises(ValueError, match="at least 4"):
        Calibration.fit(s[:3], s[:3], fingerprint=FP, layers=["l1", "l2"])
    with pytest.raises(ValueError, match="method"):
        Calibration.fit(s, s, method="spline", fingerprint=FP, layers=["l1", "l2"])  # type: ignore[arg-type]


# ================================================================================= gate
def gate_images() -> pd.DataFrame:
    return pd.DataFrame({
        "image": ["ok", "hard", "fails", "empty", "border", "nolabel", "noinput"],
        "dice": [0.9, 0.4, 0.4, math.nan, 0.8, math.nan, 0.5],
        "mean_sa_pred": [0.9, 0.5, 0.5, math.nan, 0.8, 0.6, 0.5],
        "input_sa": [0.8, 0.3, 0.8, math.nan, 0.7, math.nan, math.nan],
        "input_sa_pred": [0.7, 0.9, 0.2, math.nan, 0.7, 0.3, math.nan],
        "status": ["ok", "ok", "ok", "empty_prediction", "ok", "ok", "ok"],
        "reason": ["", "", "", "empty prediction: SA against the prediction undefined", "", "", ""],
    })


def test_gate_reasons_on_hand_built_table():
    g = quality_gate(gate_images(), linear_cal(radius=0.1, input_threshold=0.5))
    assert g.columns.tolist() == [*QC.base_names, "mean_sa_pred", "input_sa_pred", "input_sa", "input_sa_source"]
    by = g.set_index("image")
    assert by.status.to_dict() == {"ok": "ok", "hard": "low_input_sa", "fails": "model_fails", "empty": "empty_prediction",
                                   "border": "ok", "nolabel": "low_input_sa", "noinput": "no_input_sa"}
    assert by.flag.to_dict() == {k: v != "ok" for k, v in by.status.items()}
    assert by.reason["ok"] == "" and by.reason["border"] == ""
    # input_sa (with the label) wins over input_sa_pred where it is known; each column holds its own quantity.
    assert by.reason["hard"] == REASON_LOW_INPUT_SA and by.input_sa["hard"] == 0.3 and by.input_sa_pred["hard"] == 0.9
    assert by.reason["fails"] == REASON_MODEL_FAILS and by.input_sa_source["fails"] == "label"
    assert by.reason["nolabel"] == REASON_LOW_INPUT_SA and by.input_sa_source["nolabel"] == "prediction"
    assert math.isnan(by.input_sa["nolabel"]) and by.input_sa_pred["nolabel"] == 0.3
    assert by.reason["noinput"] == REASON_NO_INPUT_SA
    assert by.estimated_dice["fails"] == pytest.approx(0.5)
    assert (by.lower["fails"], by.upper["fails"]) == pytest.approx((0.4, 0.6))
    assert all(by.reason[i] == GateStatus(by.status[i]).reason for i in by.index)  # prose from the status


def test_gate_decides_from_the_status_never_from_the_reason_text():
    images = gate_images()
    g = quality_gate(images, linear_cal()).set_index("image")
    assert bool(g.flag["empty"]) and g.reason["empty"] == REASON_EMPTY  # not repeated from the analysis
    assert g.loc["empty", ["estimated_dice", "lower", "upper"]].isna().all()
    # prose that looks like an empty prediction does not make one; the status does
    images.loc[0, "reason"] = "empty prediction: (a note written by hand)"
    assert quality_gate(images, linear_cal()).set_index("image").status["ok"] == "ok"
    # a failed image keeps its error as detail; an undefined score of an analysed image is sa_undefined
    images.loc[1, ["status", "reason", "mean_sa_pred"]] = ["failed", "RuntimeError: CUDA out of memory", math.nan]
    images.loc[2, ["status", "reason", "mean_sa_pred"]] = ["output_not_finite", "model output contains NaN or Inf", math.nan]
    g = quality_gate(images, linear_cal()).set_index("image")
    assert g.status["hard"] == GateStatus.FAILED and g.reason["hard"] == f"{GateStatus.FAILED.reason} (RuntimeError: CUDA out of memory)"
    assert g.status["fails"] == GateStatus.SA_UNDEFINED and "contains NaN" in g.reason["fails"]
    assert bool(g.flag["hard"]) and bool(g.flag["fails"])
    # without a status column every image counts as analysed: an undefined score is sa_undefined
    g = quality_gate(gate_images().drop(columns="status"), linear_cal()).set_index("image")
    assert g.status["empty"] == "sa_undefined" and bool(g.flag["empty"])


def test_gate_use_lower_and_label_free_input():
    images = gate_images()
    g = quality_gate(images, linear_cal(radius=0.1), use_lower=True).set_index("image")
    assert bool(g.flag["border"]) and not bool(g.flag["ok"])  # lower 0.7 < 0.75 <= lower 0.8
    assert g.reason["border"] == REASON_MODEL_FAILS
    # Label-free input SA reverses the two causes of "hard" and "fails".
    g2 = quality_gate(images, linear_cal(), input_column="input_sa_pred").set_index("image")
    assert g2.reason["hard"] == REASON_MODEL_FAILS and g2.reason["fails"] == REASON_LOW_INPUT_SA
    # An explicit threshold overrides the stored one.
    g3 = quality_gate(images, linear_cal(), input_sa_threshold=0.85).set_index("image")
    assert g3.reason["fails"] == REASON_LOW_INPUT_SA


def test_gate_recomputes_score_over_calibration_layers():
    t = layers_table({"a": {"input": 0.9, "l1": 0.9, "l2": 0.7, "l3": 0.0},
                      "b": {"input": 0.9, "l1": 0.3, "l2": 0.5, "l3": 1.0}})
    images = pd.DataFrame({"image": ["a", "b"], "mean_sa_pred": [0.0, 0.0], "input_sa_pred": [0.9, 0.9]})
    g = quality_gate(images, linear_cal(), layers=t).set_index("image")
    assert g.mean_sa_pred.to_dict() == pytest.approx({"a": 0.8, "b": 0.4})
    assert g.flag.tolist() == [False, True]


def test_gate_needs_an_input_threshold_and_valid_arguments():
    with pytest.raises(ValueError, match="input_sa_threshold"):
        quality_gate(gate_images(), linear_cal(input_threshold=None))
    with pytest.raises(ValueError, match="threshold"):
        quality_gate(gate_images(), linear_cal(), threshold=1.5)
    with pytest.raises(ValueError, match="mean_sa_pred"):
        quality_gate(gate_images().drop(columns="mean_sa_pred"), linear_cal())


# ================================================================================= evaluation
def test_aurc_hand_example_and_eaurc():
    risk = [0.1, 0.5, 0.2]
    # Best order 0.1, 0.2, 0.5: selective risks 0.1, 0.15, 0.8/3.
    assert aurc(risk, [0.9, 0.1, 0.5]) == pytest.approx((0.1 + 0.15 + 0.8 / 3) / 3)
    assert eaurc(risk, [0.9, 0.1, 0.5]) == pytest.approx(0.0, abs=1e-15)
    # Worst order 0.5, 0.2, 0.1: 0.5, 0.35, 0.8/3.
    assert aurc(risk, [0.1, 0.9, 0.5]) == pytest.approx((0.5 + 0.35 + 0.8 / 3) / 3)
    assert eaurc(risk, [0.1, 0.9, 0.5]) == pytest.approx(0.2)


def test_aurc_ties_are_the_mean_over_orders_and_nan_is_least_confident():
    risk = np.array([0.0, 1.0, 0.5])
    tied = aurc(risk, [1.0, 1.0, 0.0])
    orders = [aurc(risk, [2.0, 1.0, 0.0]), aurc(risk, [1.0, 2.0, 0.0])]
    assert tied == pytest.approx(np.mean(orders))
    assert aurc(risk, [0.3, math.nan, 0.5]) == pytest.approx(aurc(risk, [0.3, -5.0, 0.5]))
    assert aurc([0.1, math.nan, 0.2], [1.0, 2.0, 0.0]) == pytest.approx(aurc([0.1, 0.2], [1.0, 0.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 5)), min_size=1, max_size=30))
def test_eaurc_zero_for_perfect_ranking_and_nonnegative(pairs):
    risk = np.array([p[0] for p in pairs])
    conf = np.array([p[1] for p in pairs], dtype=float)
    assert eaurc(risk, -risk) == pytest.approx(0.0, abs=1e-12)
    assert eaurc(risk, conf) >= -1e-12
    # Any ranking lies between the best and the worst one.
    assert aurc(risk, conf) <= aurc(risk, risk) + 1e-12


def test_failure_auroc_equals_sklearn():
    rng = np.random.default_rng(0)
    dice = rng.uniform(0, 1, 200)
    score = np.round(dice + rng.normal(0, 0.3, 200), 1)  # rounding makes ties
    ref = roc_auc_score(dice < 0.75, -score)
    assert failure_auroc(dice, score) == pytest.approx(ref, abs=1e-12)
    assert failure_auroc(dice, score, threshold=0.5) == pytest.approx(roc_auc_score(dice < 0.5, -score), abs=1e-12)
    assert failure_auroc([0.9, 0.8, 0.3, 0.5], [0.7, 0.9, 0.2, 0.8]) == 0.75


def test_failure_auroc_single_class_is_nan_with_reason():
    with pytest.warns(MetricUndefinedWarning, match="no failure"):
        assert math.isnan(failure_auroc([0.9, 0.8], [0.1, 0.2]))
    with pytest.warns(MetricUndefinedWarning, match="only failures"):
        assert math.isnan(failure_auroc([0.1, 0.2], [0.1, 0.2]))


def test_correlations_match_scipy_and_drop_nan():
    from scipy import stats

    x = np.array([0.1, 0.4, 0.35, 0.8, math.nan, 0.6])
    y = np.array([0.2, 0.5, 0.1, 0.9, 0.3, 0.4])
    ok = ~np.isnan(x)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x[ok], y[ok])[0])
    assert pearson(x, y) == pytest.approx(np.corrcoef(x[ok], y[ok])[0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MetricUndefinedWarning):
            spearman([1, 1, 1], [1, 2, 3])


def test_compare_methods_values():
    rng = np.random.default_rng(0)
    n = 120
    dice = rng.uniform(0.1, 1.0, n)
    scores = pd.DataFrame({
        "dice": dice,
        "oracle": dice,  # already a Dice estimate, perfect
        "cubed": dice**3,  # perfect ranking, wrong scale: needs calibration
        "noise": rng.uniform(size=n),
        "entropy": -rng.uniform(size=n),  # not on the Dice scale
    })
    scores.loc[0, "noise"] = math.nan
    out = compare_methods(scores, methods=["oracle", "cubed", "noise", "entropy"],
                          calibrate={"oracle": False, "cubed": True, "noise": True}).set_index("method")
    assert out.loc["oracle", ["spearman", "pearson", "auroc"]].tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert out.loc["oracle", "mae"] == 0.0 and out.loc["oracle", "eaurc"] == pytest.approx(0.0, abs=1e-15)
    assert out.loc["cubed", "spearman"] == pytest.approx(1.0) and out.loc["cubed", "eaurc"] == pytest.approx(0.0, abs=1e-15)
    assert out.loc["cubed", "mae"] < 0.02  # cross-fitted isotonic/linear undoes the cube
    assert bool(out.loc["cubed", "calibrated"]) and not bool(out.loc["oracle", "calibrated"])
    assert abs(out.loc["noise", "spearman"]) < 0.25 and out.loc["noise", "eaurc"] > 0.02
    assert "1 image(s) without a score" in out.loc["noise", "note"]
    assert math.isnan(out.loc["entropy", "mae"]) and "not on the Dice scale" in out.loc["entropy", "note"]
    # Independent references for the ranking metrics.
    assert out.loc["entropy", "auroc"] == pytest.approx(roc_auc_score(dice < 0.75, -scores["entropy"]))
    assert out.loc["entropy", "aurc"] == pytest.approx(aurc(1 - dice, scores["entropy"]))
    assert out.loc["oracle", "aurc"] == pytest.approx(out.loc["cubed", "aurc"])
    with pytest.raises(ValueError, match="leave"):
        compare_methods(scores, methods=["entropy"], calibrate={"entropy": False})
    with pytest.raises(ValueError, match="no column"):
        compare_methods(scores, methods=["nope"])


def test_compare_methods_one_class_note():
    t = pd.DataFrame({"dice": [0.9, 0.95, 0.8, 0.85], "s": [0.1, 0.2, 0.3, 0.4]})
    row = compare_methods(t, methods=["s"], calibrate={"s": False}).iloc[0]
    assert math.isnan(row.auroc) and "no failure" in row.note
