"""The SA-profile estimator (issue 14): reverse SA, the profile, the fitted estimator and its file."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

import segability
from segability.core.metric import SegmentationAbility
from segability.errors import UsageError
from segability.estimation.estimator import FlagStatus, QualityEstimator, grouped_folds
from segability.estimation.profile import body_mask, sa_profile
from segability.estimation.reverse import ReferenceCache, image_prototypes, reverse_sa


# ------------------------------------------------------------------------------ reverse SA
def _pair(spatial: tuple[int, ...], seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (1, 3, *spatial)
    fa, fb = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    pa = torch.rand((1, 1, *spatial), generator=g, dtype=torch.float64)  # A's soft prediction
    lb = (torch.rand((1, 1, *spatial), generator=g) > 0.6).double()  # B's label
    fb = fb + 1.5 * lb  # B's target is separable along every channel
    fa = fa + 1.5 * (pa > 0.5)
    return fa, pa, fb, lb


@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 3)], ids=["2d", "3d"])
def test_reverse_sa_equals_protoseg_of_a_applied_to_b(spatial):
    fa, pa, fb, lb = _pair(spatial, 0)
    # Independent: ProtoSeg on A and B side by side, prototypes shaped by A's pixels only (the mask),
    # then the map's B half against B's label with sa_score.
    both = torch.cat([fa, fb], dim=-1)
    guide = torch.cat([pa, torch.zeros_like(pa)], dim=-1)
    mask = torch.cat([torch.ones_like(pa), torch.zeros_like(pa)], dim=-1)
    seg = segability.protoseg(both, guide, mask).argmax(1)[..., spatial[-1]:]
    expected = segability.sa_score(seg, lb[:, 0])

    cache = ReferenceCache(["conv"], {"conv": fb.float().numpy()}, {"conv": lb.to(torch.uint8).numpy()}, None, ["b"], "h")
    protos = image_prototypes(fa, pa)
    got = reverse_sa({"conv": protos}, cache)["conv"]
    torch.testing.assert_close(got, expected.double(), rtol=0, atol=1e-6)

    # the same through the stateful metric with fixed prototypes
    metric = SegmentationAbility()
    metric.update({"conv": fb}, guide=lb, references=lb, prototypes={"conv": protos})
    torch.testing.assert_close(got, metric.scores()["conv"].sa[:, 0].double(), rtol=0, atol=1e-6)


def test_reverse_sa_by_hand_and_undefined_prototypes():
    # references: features [0, 1, 2, 3], label [0, 0, 1, 1]; prototypes 0.0 / 2.5 -> map [0, 0, 1, 1]
    cache = ReferenceCache(["input"], {"input": np.array([[[0.0, 1.0, 2.0, 3.0]]], np.float32)},
                           {"input": np.array([[[0, 0, 1, 1]]], np.uint8)}, None, ["r"], "h")  # fmt: skip
    protos = torch.tensor([[[0.0], [2.5]], [[0.0], [0.9]], [[math.nan], [1.0]]])
    got = reverse_sa({"input": protos}, cache)["input"]
    # image 1: midpoint 0.45 -> map [0, 1, 1, 1] vs [0, 0, 1, 1]: Dice 4 / 5
    torch.testing.assert_close(got[:2], torch.tensor([1.0, 0.8], dtype=torch.float64))
    assert math.isnan(float(got[2]))


def test_reference_cache_round_trip_and_body(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))
    x = torch.rand(3, 1, 16, 16)
    y = (x > 0.5).float()
    cache = ReferenceCache.build(net, x, y, ["input", "0"], body_mask=body_mask)
    back = ReferenceCache.load(cache.save(tmp_path / "refs.npz"))
    assert back.layers == cache.layers and back.ids == cache.ids and back.model_hash == cache.model_hash
    for name in cache.layers:
        np.testing.assert_array_equal(back.features[name], cache.features[name])
        np.testing.assert_array_equal(back.labels[name], cache.labels[name])
    protos = {"0": image_prototypes(torch.rand(2, 4, 16, 16), torch.rand(2, 1, 16, 16))}
    a, b = reverse_sa(protos, cache, use_body=True), reverse_sa(protos, back, use_body=True)
    torch.testing.assert_close(a["0"], b["0"])


def test_sa_profile_reads_the_result_and_adds_the_masked_and_reverse_columns():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(2, 1, 1, channels=(4, 8), strides=(2,), num_res_units=0).eval()
    x = torch.rand(4, 1, 16, 16)
    res = segability.analyze(net, x, batch_size=4)
    refs = ReferenceCache.build(net, torch.rand(2, 1, 16, 16), (torch.rand(2, 1, 16, 16) > 0.5).float(),
                                sorted(res.layers["layer"].unique()), body_mask=body_mask)  # fmt: skip
    prof = sa_profile(net, x, res, references=refs, batch_size=3)
    hidden = [n for n in res.layers["layer"].unique() if n != "input"]
    for n in hidden:
        got = prof[f"sa_pred:{n}"].to_numpy()
        want = res.layers[res.layers["layer"] == n].set_index("image")["sa_pred"].reindex(prof["image"]).to_numpy()
        np.testing.assert_allclose(got, want, equal_nan=True)
        assert {f"sa_pred_body:{n}", f"reverse:{n}", f"reverse_body:{n}"} <= set(prof.columns)
    assert {"input_sa_pred", "input_sa_pred_body", "input_reverse", "input_reverse_body", "pred_fraction"} <= set(prof.columns)


# ------------------------------------------------------------------------------- estimator
def _synthetic(n_groups: int, per_group: int, seed: int, noise: float = 0.02):
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    x = rng.normal(size=(n, 4))
    dice = 0.55 + 0.12 * x[:, 0] - 0.06 * x[:, 1] + noise * rng.normal(size=n)
    prof = pd.DataFrame(x, columns=["sa_pred:a", "sa_pred:b", "input_sa_pred", "reverse:a"])
    prof.insert(0, "image", [f"i{k}" for k in range(n)])
    groups = np.repeat(np.arange(n_groups), per_group).astype(str)
    return prof, dice, groups


def test_estimator_recovers_a_linear_relation():
    prof, dice, groups = _synthetic(80, 3, 0, noise=0.01)
    est = QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",))
    slope = np.asarray(est.coef) / np.asarray(est.scale)  # back to the features' own units
    np.testing.assert_allclose(slope, [0.12, -0.06, 0.0, 0.0], atol=0.01)
    new, truth, _ = _synthetic(20, 3, 1, noise=0.0)
    assert np.abs(est.predict(new)["estimated_dice"] - truth).max() < 0.03


def test_grouped_folds_never_split_a_group():
    groups = np.repeat(np.arange(13), [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6, 7, 8]).astype(str)
    folds = grouped_folds(groups, 5)
    assert len(folds) == 5
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen.tolist()) == list(range(len(groups)))
    for tr, te in folds:
        assert set(groups[tr]).isdisjoint(groups[te])


def test_conformal_coverage_is_near_nominal():
    prof, dice, groups = _synthetic(150, 2, 2, noise=0.05)
    est = QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",), alpha=0.1)
    new, truth, _ = _synthetic(1000, 2, 3, noise=0.05)
    out = est.predict(new)
    inside = (truth >= out["lower"]) & (truth <= out["upper"]) | out["out_of_range"]
    assert 0.86 <= inside.mean() <= 0.95


def test_out_of_range_gets_the_shift_status_and_a_wide_unclipped_estimate():
    prof, dice, groups = _synthetic(60, 3, 4)
    est = QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",))
    far = prof.iloc[:2].copy()
    far.loc[:, "sa_pred:a"] = [40.0, 0.1]  # 40 sd out: the linear model says about 5.3
    out = est.gate(far, review_fraction=None, threshold=0.5)
    assert bool(out["out_of_range"].iloc[0]) and not bool(out["out_of_range"].iloc[1])
    assert out["status"].iloc[0] == FlagStatus.SHIFT.value and bool(out["flag"].iloc[0])
    assert (out["lower"].iloc[0], out["upper"].iloc[0]) == (0.0, 1.0)
    assert out["estimated_dice"].iloc[0] > 4.0  # as computed, not clipped to a confident 1.0
    assert out["reason"].iloc[0] == FlagStatus.SHIFT.message


def test_gate_by_review_budget_flags_the_least_trusted_with_a_reason():
    prof, dice, groups = _synthetic(60, 3, 5)
    est = QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",))
    out = est.gate(prof, review_fraction=0.2)
    k = math.ceil(0.2 * len(prof))
    assert out["flag"].sum() >= k
    flagged = out[out["flag"]]
    assert flagged["estimated_dice"].max() <= out.loc[~out["flag"], "estimated_dice"].min() + 1e-12 or flagged["out_of_range"].any()
    assert set(flagged["status"]) <= {s.value for s in FlagStatus} - {"ok"}
    assert (out.loc[~out["flag"], "status"] == "ok").all() and (out.loc[~out["flag"], "reason"] == "").all()


@pytest.mark.parametrize("kinds", [("ridge",), ("trees",)])
def test_save_load_round_trip_gives_identical_estimates(tmp_path, kinds):
    prof, dice, groups = _synthetic(40, 3, 6)
    est = QualityEstimator.fit(prof, dice, groups, model_hash="h" * 64, kinds=kinds)
    path = est.save(tmp_path / "estimator.json")
    if kinds == ("trees",):
        with pytest.raises(UsageError, match="trust_trees"):
            QualityEstimator.load(path)
        back = QualityEstimator.load(path, trust_trees=True)
    else:
        back = QualityEstimator.load(path)
    pd.testing.assert_frame_equal(est.predict(prof), back.predict(prof))


def test_refuses_another_models_fingerprint():
    prof, dice, groups = _synthetic(30, 3, 7)
    est = QualityEstimator.fit(prof, dice, groups, model_hash="a" * 64, kinds=("ridge",))
    est.predict(prof, model_hash="a" * 64)
    with pytest.raises(UsageError, match="fitted for model"):
        est.predict(prof, model_hash="b" * 64)


def test_isotonic_post_calibration_corrects_a_monotone_bias_and_round_trips():
    # Dice a monotone, non-linear function of one feature: a ridge model is biased at both ends, the
    # isotonic map on its out-of-fold estimates removes the bias; the map survives the JSON
    prof, _, groups = _synthetic(120, 3, 5)
    dice = 1.0 / (1.0 + np.exp(-3.0 * prof["sa_pred:a"].to_numpy()))
    plain = QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",))
    iso = QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",), post_calibration="isotonic")
    assert plain.post_map == [] and len(iso.post_map) == 2 and np.all(np.diff(iso.post_map[1]) >= 0)
    new, _, _ = _synthetic(40, 3, 6)
    truth = 1.0 / (1.0 + np.exp(-3.0 * new["sa_pred:a"].to_numpy()))
    est_plain, est_iso = plain.predict(new), iso.predict(new)
    inside = ~est_iso["out_of_range"].to_numpy()
    mae_plain = np.abs(est_plain["estimated_dice"] - truth)[inside].mean()
    mae_iso = np.abs(est_iso["estimated_dice"] - truth)[inside].mean()
    assert mae_iso < 0.6 * mae_plain
    # the mapped estimate is the ridge estimate through the knots (np.interp), by hand
    raw = ((new[plain.features].to_numpy() - plain.center) / plain.scale) @ np.asarray(iso.coef) + iso.intercept
    expected = np.clip(np.interp(raw, *iso.post_map), 0, 1)
    np.testing.assert_allclose(est_iso["estimated_dice"].to_numpy()[inside], expected[inside], atol=1e-12)
    again = QualityEstimator.from_dict(iso.to_dict())
    pd.testing.assert_frame_equal(again.predict(new), est_iso)
    with pytest.raises(UsageError, match="post_calibration"):
        QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",), post_calibration="spline")


def test_extra_feature_sets_join_the_cross_validated_choice():
    # Dice depends on sa_pred:a only; a set holding just it (plus a column the profile lacks) is a
    # candidate and has the lowest grouped-CV MAE of the ridge candidates
    prof, _, groups = _synthetic(60, 3, 7)
    dice = 0.5 + 0.1 * prof["sa_pred:a"].to_numpy()
    est = QualityEstimator.fit(prof, dice, groups, model_hash="h", kinds=("ridge",),
                               extra_sets={"just_a": ["sa_pred:a", "not_there"]})  # fmt: skip
    assert "ridge:just_a" in est.cv
    assert est.cv["ridge:just_a"]["mae"] <= min(v["mae"] for v in est.cv.values()) + 1e-12
    assert est.choice == "ridge:just_a" and np.count_nonzero(est.coef) == 1
