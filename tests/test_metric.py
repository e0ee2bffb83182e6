"""SegmentationAbility: accumulation over batches against per-image SA computed independently."""

from __future__ import annotations

import math

import pytest
import torch

from segability import SegmentationAbility
from segability import prototypes as segability_prototypes


def dice(a: torch.Tensor, b: torch.Tensor, empty: str = "one") -> float:
    denom = float(a.sum() + b.sum())
    if denom == 0:
        return 1.0 if empty == "one" else math.nan
    return 2.0 * float((a * b).sum()) / denom


def independent_sa(direct_torch, feats, guide, reference, mask=None, empty="one"):
    """Per image: layer SA (B,) and unit SA (B, C), from the direct computation (conftest)."""
    _, _, dist = direct_torch(feats, guide, mask)
    layer_map = (dist[:, 1] < dist[:, 0]).double()
    layer = [dice(layer_map[i], reference[i, 0], empty) for i in range(feats.shape[0])]
    units = []
    for c in range(feats.shape[1]):
        _, _, d = direct_torch(feats[:, c : c + 1], guide, mask)
        unit_map = (d[:, 1] < d[:, 0]).double()
        units.append([dice(unit_map[i], reference[i, 0], empty) for i in range(feats.shape[0])])
    return torch.tensor(layer, dtype=torch.float64), torch.tensor(units, dtype=torch.float64).T


def make_batch(b: int, spatial: tuple[int, ...], seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    guide = torch.rand(b, 1, *spatial, generator=gen, dtype=dtype)
    guide.view(b, -1)[:, 0], guide.view(b, -1)[:, -1] = 0.1, 0.9
    low = tuple(max(2, s // 2) for s in spatial)
    feats = {
        "low": torch.randn(b, 3, *low, generator=gen, dtype=dtype),
        "same": torch.randn(b, 2, *spatial, generator=gen, dtype=dtype) + 1.5 * guide,
    }
    reference = (torch.rand(b, 1, *spatial, generator=gen) < 0.5).to(dtype)
    mask = (torch.rand(b, 1, *spatial, generator=gen) < 0.8).to(dtype)
    mask.view(b, -1)[:, [0, -1]] = 1.0
    return feats, guide, reference, mask


@pytest.mark.parametrize("spatial", [(12,), (8, 6), (4, 6, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("with_reference", [False, True], ids=["guide", "reference"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_accumulates_mean_of_per_image_sa(direct_torch, spatial, with_reference, masked) -> None:
    metric = SegmentationAbility(units=True, chunk_size=2)
    layer_all, unit_all = {"low": [], "same": []}, {"low": [], "same": []}
    for step, b in enumerate([2, 3, 1]):
        feats, guide, reference, mask = make_batch(b, spatial, seed=step)
        m = mask if masked else None
        ids = [f"{step}-{i}" for i in range(b)]
        metric.update(feats, guide=guide, references=reference if with_reference else None, mask=m, ids=ids)
        ref = reference if with_reference else (guide > 0.5).double()
        for name, f in feats.items():
            layer, units = independent_sa(direct_torch, f, guide, ref, m)
            scores = metric.scores([name])[name]
            assert scores.ids[-b:] == ids
            torch.testing.assert_close(scores.sa[-b:, 0], layer, atol=1e-12, rtol=0)
            torch.testing.assert_close(scores.units[-b:, 0], units, atol=1e-12, rtol=0)
            layer_all[name].append(layer)
            unit_all[name].append(units)
    result = metric.compute()
    for name in ("low", "same"):
        layers = torch.cat(layer_all[name])
        assert layers.numel() == 6 and layers.std() > 0.01  # the images differ: the mean means something
        torch.testing.assert_close(result["layers"][name], layers.mean().reshape(1), atol=1e-12, rtol=0)
        torch.testing.assert_close(result["units"][name][0], torch.cat(unit_all[name]).mean(0), atol=1e-12, rtol=0)
    assert result["units"]["low"].shape == (1, 3) and result["units"]["same"].shape == (1, 2)


def test_one_tensor_float32_and_no_units(direct_torch) -> None:
    feats, guide, _, _ = make_batch(3, (9, 7), seed=5, dtype=torch.float32)
    metric = SegmentationAbility()
    metric.update(feats["low"], guide=guide)
    out = metric.scores()
    assert list(out) == ["features"] and out["features"].sa.dtype == torch.float32
    assert out["features"].units is None and out["features"].ids == ["0", "1", "2"]
    layer, _ = independent_sa(direct_torch, feats["low"].double(), guide.double(), (guide > 0.5).double())
    torch.testing.assert_close(out["features"].sa[:, 0].double(), layer, atol=1e-6, rtol=0)
    result = metric.compute()
    assert result["units"] == {}
    torch.testing.assert_close(result["layers"]["features"], layer.mean().reshape(1), atol=1e-6, rtol=0)


def test_undefined_images_are_left_out_of_the_mean(direct_torch) -> None:
    metric = SegmentationAbility(units=True)
    feats, guide, reference, _ = make_batch(3, (8, 6), seed=1)
    guide[1] = 0.0  # no target weight: image 1 is undefined
    metric.update(feats, guide=guide, references=reference)
    out = metric.scores()["same"]
    assert math.isnan(out.sa[1, 0]) and torch.isfinite(out.sa[[0, 2]]).all()
    assert [s.value for s in out.status] == ["ok", "undefined_prototypes", "ok"]
    layer, units = independent_sa(direct_torch, feats["same"][[0, 2]], guide[[0, 2]], reference[[0, 2]])
    result = metric.compute()
    torch.testing.assert_close(result["layers"]["same"], layer.mean().reshape(1), atol=1e-12, rtol=0)
    torch.testing.assert_close(result["units"]["same"][0], units.mean(0), atol=1e-12, rtol=0)
    # A layer that only ever saw undefined images has a NaN mean.
    only = SegmentationAbility(units=True)
    only.update({"x": feats["same"][1:2]}, guide=guide[1:2])
    assert math.isnan(only.compute()["layers"]["x"]) and torch.isnan(only.compute()["units"]["x"]).all()


def test_empty_rule() -> None:
    # Constant features: both prototypes are equal, every pixel is a tie -> background, the map is
    # empty. Against an empty reference the SA is 1 ("one") or undefined and ignored ("nan").
    feats = torch.ones(2, 2, 5, 5, dtype=torch.float64)
    feats[1] += torch.linspace(0, 1, 5, dtype=torch.float64)  # image 1: a real map
    guide = torch.zeros(2, 1, 5, 5, dtype=torch.float64)
    guide[..., 3:] = 1.0
    reference = torch.zeros_like(guide)
    reference[1] = guide[1]
    one = SegmentationAbility()
    one.update(feats, guide=guide, references=reference)
    assert one.scores()["features"].sa[:, 0].tolist() == [1.0, 1.0]
    nan = SegmentationAbility(empty="nan")
    nan.update(feats, guide=guide, references=reference)
    sa = nan.scores()["features"].sa[:, 0]
    assert math.isnan(sa[0]) and sa[1] == 1.0
    assert nan.compute()["layers"]["features"] == 1.0
    # Add an image of SA 0 (empty map, non-empty reference): means are (1 + 1 + 0) / 3 and 1 / 2.
    one.update(feats[:1], guide=guide[:1], references=guide[:1])
    nan.update(feats[:1], guide=guide[:1], references=guide[:1])
    assert one.compute()["layers"]["features"].item() == pytest.approx(2 / 3)
    assert nan.compute()["layers"]["features"].item() == pytest.approx(1 / 2)


def test_reset() -> None:
    feats, guide, _, _ = make_batch(2, (8, 6), seed=2)
    metric = SegmentationAbility(units=True)
    metric.update(feats, guide=guide)
    metric.reset()
    assert metric.compute() == {"layers": {}, "units": {}}
    assert metric.state_tensors() == {}
    other, _, _, _ = make_batch(2, (8, 6), seed=3)
    metric.update(other, guide=guide)
    fresh = SegmentationAbility(units=True)
    fresh.update(other, guide=guide)
    for kind in ("layers", "units"):
        for name, value in fresh.compute()[kind].items():
            torch.testing.assert_close(metric.compute()[kind][name], value, atol=0, rtol=0)


def test_state_tensors_round_trip_and_all_reduce() -> None:
    batches = [make_batch(b, (8, 6), seed=10 + b) for b in (2, 3)]
    batches[1][1][0] = 0.0  # one undefined image in the second batch
    whole = SegmentationAbility(units=True)
    parts = [SegmentationAbility(units=True), SegmentationAbility(units=True)]
    for part, (feats, guide, reference, _) in zip(parts, batches, strict=True):
        whole.update(feats, guide=guide, references=reference)
        part.update(feats, guide=guide, references=reference)

    state = whole.state_tensors()
    kinds = ("layer_sum", "layer_count", "unit_sum", "unit_count")
    assert set(state) == {f"{p}/{n}" for p in kinds for n in ("low", "same")}
    assert state["layer_count/same"].item() == 4.0  # 5 images, one undefined
    copy = SegmentationAbility(units=True)
    copy.update(batches[0][0], guide=batches[0][1])  # overwritten by the load
    copy.load_state_tensors(state)
    # all-reduce (sum) of the two processes' states equals the state of one process that saw all
    reduced = SegmentationAbility(units=True)
    s0, s1 = parts[0].state_tensors(), parts[1].state_tensors()
    reduced.load_state_tensors({k: s0[k] + s1[k] for k in s0})
    for metric in (copy, reduced):
        for kind in ("layers", "units"):
            for name, value in whole.compute()[kind].items():
                torch.testing.assert_close(metric.compute()[kind][name], value, atol=1e-12, rtol=0)


def test_counts_of_one_id_add_up_before_sa(direct_torch) -> None:
    """Two halves of one image under one id give the SA of the whole image, not a mean of halves."""
    feats, guide, reference, _ = make_batch(1, (8, 6), seed=7)
    f = feats["same"]
    protos = segability_prototypes(f, guide)
    halves = SegmentationAbility(units=True)
    for part in (slice(0, 4), slice(4, 8)):
        halves.update(
            {"same": f[:, :, part]}, guide=guide[:, :, part], references=reference[:, :, part],
            ids=["volume"], prototypes={"same": protos},
        )
    whole = SegmentationAbility(units=True)
    whole.update({"same": f}, guide=guide, references=reference, ids=["volume"])
    got, want = halves.scores()["same"], whole.scores()["same"]
    assert got.ids == ["volume"]
    torch.testing.assert_close(got.sa, want.sa, atol=1e-12, rtol=0)
    torch.testing.assert_close(got.units, want.units, atol=1e-12, rtol=0)
    layer, units = independent_sa(direct_torch, f, guide, reference)
    torch.testing.assert_close(got.sa[:, 0], layer, atol=1e-12, rtol=0)


def test_empty_prediction_and_output_status() -> None:
    feats, guide, reference, _ = make_batch(3, (8, 6), seed=8)
    pred = (guide > 0.5).double()
    pred[0] = 0.0  # image 0: nothing predicted
    refs = torch.cat([reference, pred], dim=1)
    metric = SegmentationAbility()
    metric.update(
        {"same": feats["same"]}, guide=guide, references=refs, prediction=1,
        output_finite=torch.tensor([True, True, False]),
    )
    out = metric.scores()["same"]
    assert [s.value for s in out.status] == ["empty_prediction", "ok", "output_not_finite"]
    assert torch.isfinite(out.sa[0, 0]) and math.isnan(out.sa[0, 1])  # SA vs label kept
    assert torch.isfinite(out.sa[1]).all() and torch.isnan(out.sa[2]).all()


def test_non_finite_features_are_marked_not_raised_without_validation() -> None:
    feats, guide, _, _ = make_batch(2, (8, 6), seed=9)
    f = feats["same"].clone()
    f[1, 0, 0, 0] = math.inf
    metric = SegmentationAbility()
    metric.update({"same": f}, guide=guide, validate=False)
    out = metric.scores()["same"]
    assert [s.value for s in out.status] == ["ok", "features_not_finite"]
    assert torch.isfinite(out.sa[0]).all() and torch.isnan(out.sa[1]).all()
