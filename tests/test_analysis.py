"""analyze() against an independent NumPy computation on a hand-set model, plus its input rules.

``HandNet`` has fixed weights: ``feat`` gives the features ``[x, 1 - x]``, ``down`` a 2x2 stride-2
convolution of them (a side branch at half resolution), and ``head`` the logit ``8x - 4``. The
reference below recomputes every feature map with NumPy from those weights, resizes with its own
linear interpolation, and takes prototypes, nearest-prototype maps and Dice in float64, sharing no
code with segability.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pandas.testing as pdt
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from segability.analysis import analyze, load_result, model_probabilities, tokens_to_grid


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread, so that OpenMP does not oversubscribe a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

DOWN_W = np.array(
    [
        [[[0.5, -0.25], [1.0, 0.3]], [[-0.7, 0.2], [0.1, 0.9]]],
        [[[0.05, 0.4], [-0.6, 0.8]], [[0.3, -0.1], [0.45, -0.35]]],
    ]
)
DOWN_B = np.array([0.1, -0.2])
# 3-class head (logits 4 - 8x, 0.5x + 0.7, 8x - 4): class 0 wins for x < 0.388, class 2 for
# x > 0.627, class 1 in between. No logit is constant (a constant unit is an exact tie).
HEAD3_W = np.array([[-4.0, 4.0], [0.5, 0.0], [4.0, -4.0]])
HEAD3_B = np.array([0.0, 0.7, 0.0])


class HandNet(nn.Module):
    def __init__(self, classes: int = 1) -> None:
        super().__init__()
        self.feat = nn.Conv2d(1, 2, 1)
        self.down = nn.Conv2d(2, 2, 2, stride=2)
        self.head = nn.Conv2d(2, classes, 1)
        with torch.no_grad():
            self.feat.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.feat.bias.copy_(torch.tensor([0.0, 1.0]))
            self.down.weight.copy_(torch.from_numpy(DOWN_W))
            self.down.bias.copy_(torch.from_numpy(DOWN_B))
            if classes == 1:
                self.head.weight.copy_(torch.tensor([4.0, -4.0]).view(1, 2, 1, 1))
                self.head.bias.zero_()
            else:
                self.head.weight.copy_(torch.from_numpy(HEAD3_W).view(3, 2, 1, 1))
                self.head.bias.copy_(torch.from_numpy(HEAD3_B))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat(x)
        self.down(f)
        return self.head(f)


# ------------------------------------------------------------------------- NumPy reference
def np_resize(a: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """(C, *s) -> (C, *size): separable linear interpolation, align_corners=False."""
    for axis, n_out in enumerate(size, start=1):
        n_in = a.shape[axis]
        if n_in == n_out:
            continue
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
        i1 = np.minimum(i0 + 1, n_in - 1)
        lam = src - i0
        view = [1] * a.ndim
        view[axis] = n_out
        a = np.take(a, i0, axis) * (1 - lam).reshape(view) + np.take(a, i1, axis) * lam.reshape(view)
    return a


def np_features(x: np.ndarray, classes: int = 1) -> dict[str, np.ndarray]:
    """Each layer's output for one image x (1, H, W), computed from the hand-set weights."""
    f = np.stack([x[0], 1.0 - x[0]])
    h, w = f.shape[1:]
    blocks = f[:, : h // 2 * 2, : w // 2 * 2].reshape(2, h // 2, 2, w // 2, 2)  # c, i, a, j, b
    down = np.einsum("ocab,ciajb->oij", DOWN_W, blocks) + DOWN_B[:, None, None]
    if classes == 1:
        head = (4.0 * f[0] - 4.0 * f[1])[None]
    else:
        head = np.einsum("kc,chw->khw", HEAD3_W, f) + HEAD3_B[:, None, None]
    return {"input": x, "feat": f, "down": down, "head": head}


def np_output(x: np.ndarray, classes: int = 1, target: int = 1) -> tuple[np.ndarray, np.ndarray]:
    head = np_features(x, classes)["head"]
    if classes == 1:
        prob = 1.0 / (1.0 + np.exp(-head[0]))
        return prob, prob > 0.5
    soft = np.exp(head - head.max(0))
    soft /= soft.sum(0)
    return soft[target], soft.argmax(0) == target


def np_dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / float(total)


def np_segment(feats: np.ndarray, guide: np.ndarray) -> np.ndarray:
    """Nearest-prototype map of features (C, *S) with guide weights (*S) in [0, 1]."""
    u = feats.reshape(feats.shape[0], -1)
    g = guide.reshape(-1)
    p_t = u @ g / g.sum()
    p_b = u @ (1 - g) / (1 - g).sum()
    d_t = ((u - p_t[:, None]) ** 2).sum(0)
    d_b = ((u - p_b[:, None]) ** 2).sum(0)
    return (d_t < d_b).reshape(guide.shape)


def np_reference(
    images: np.ndarray, labels: np.ndarray | None, *, guide: str = "prediction", classes: int = 1, target: int = 1
) -> dict:
    """Expected layer rows, unit rows, images rows and layer maps of analyze() on HandNet."""
    layers, units, rows, maps = {}, {}, {}, {}
    for n, x in enumerate(images):
        prob, pred = np_output(x, classes, target)
        lab = None if labels is None else labels[n].astype(bool)
        g = lab.astype(float) if guide == "label" else prob
        per_layer = {}
        for name, feats in np_features(x, classes).items():
            up = np_resize(feats, x.shape[1:])
            seg = np_segment(up, g)
            maps[(str(n), name)] = seg
            sa = math.nan if lab is None else np_dice(seg, lab)
            layers[(str(n), name)] = (sa, np_dice(seg, pred))
            per_layer[name] = layers[(str(n), name)]
            for c in range(up.shape[0]):
                useg = np_segment(up[c : c + 1], g)
                units[(str(n), name, c)] = (math.nan if lab is None else np_dice(useg, lab), np_dice(useg, pred))
        hidden = [v for k, v in per_layer.items() if k != "input"]
        rows[str(n)] = {
            "dice": math.nan if lab is None else np_dice(pred, lab),
            "mean_sa": float(np.mean([v[0] for v in hidden])),
            "mean_sa_pred": float(np.mean([v[1] for v in hidden])),
            "input_sa": per_layer["input"][0],
            "input_sa_pred": per_layer["input"][1],
        }
    return {"layers": layers, "units": units, "images": rows, "maps": maps}


def make_data(n: int = 5, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(n, 1, size, size))
    y = (x[:, 0] + rng.normal(0.0, 0.25, size=(n, size, size)) > 0.5).astype(np.float64)
    return torch.from_numpy(x), torch.from_numpy(y)


def assert_matches_reference(res, ref: dict, *, with_units: bool = False) -> None:
    got = {(r.image, r.layer): (r.sa, r.sa_pred) for r in res.layers.itertuples()}
    assert set(got) == set(ref["layers"])
    for key, (sa, sa_pred) in ref["layers"].items():
        np.testing.assert_allclose(got[key], (sa, sa_pred), rtol=0, atol=1e-12, err_msg=str(key))
    for r in res.images.itertuples():
        exp = ref["images"][r.image]
        np.testing.assert_allclose(
            [r.dice, r.mean_sa, r.mean_sa_pred, r.input_sa, r.input_sa_pred],
            [exp["dice"], exp["mean_sa"], exp["mean_sa_pred"], exp["input_sa"], exp["input_sa_pred"]],
            rtol=0,
            atol=1e-12,
            err_msg=r.image,
        )
    if with_units:
        got_u = {(r.image, r.layer, r.unit): (r.sa, r.sa_pred) for r in res.units.itertuples()}
        assert set(got_u) == set(ref["units"])
        for key, value in ref["units"].items():
            np.testing.assert_allclose(got_u[key], value, rtol=0, atol=1e-12, err_msg=str(key))


# ---------------------------------------------------------------------------------- values
@pytest.mark.parametrize("low_memory", [True, False])
def test_scores_match_an_independent_numpy_computation(low_memory):
    x, y = make_data()
    res = analyze(HandNet(), x, y, units=True, low_memory=low_memory)
    ref = np_reference(x.numpy(), y.numpy())
    assert_matches_reference(res, ref, with_units=True)
    # the scores are not trivial: layers differ and none is perfect everywhere
    assert res.layers["sa_pred"].nunique() > 5 and (res.layers["sa"] < 1).any()
    first = res.layers[res.layers["image"] == "0"]
    assert first["layer"].tolist() == ["input", "feat", "down", "head"]
    assert first["depth"].tolist() == [0, 1, 2, 3]
    assert first["channels"].tolist() == [1, 2, 2, 1]
    assert first["shape"].tolist() == ["1x8x8", "2x8x8", "2x4x4", "1x8x8"]
    assert (res.layers["reason"] == "").all()
    assert res.settings["layers"] == ["input", "feat", "down", "head"]


def test_label_guide_uses_the_label_for_the_prototypes():
    x, y = make_data(seed=1)
    by_label = analyze(HandNet(), x, y, guide="label", units=True)
    by_pred = analyze(HandNet(), x, y, guide="prediction", units=True)
    assert_matches_reference(by_label, np_reference(x.numpy(), y.numpy(), guide="label"), with_units=True)
    assert not np.allclose(by_label.layers["sa"], by_pred.layers["sa"])


def test_without_labels_sa_is_nan_and_sa_pred_unchanged():
    x, y = make_data()
    res = analyze(HandNet(), x, units=True)
    ref = np_reference(x.numpy(), None)
    assert_matches_reference(res, ref, with_units=True)
    assert res.layers["sa"].isna().all() and res.images["dice"].isna().all()
    assert res.units["sa"].isna().all()
    labelled = analyze(HandNet(), x, y)
    np.testing.assert_array_equal(res.layers["sa_pred"], labelled.layers["sa_pred"])


@pytest.mark.parametrize("target", [0, 2])
def test_softmax_output_with_target(target):
    x, y = make_data(seed=2)
    labels = np.random.default_rng(3).integers(0, 3, size=y.shape)  # a 3-class label map
    res = analyze(HandNet(classes=3), x, torch.from_numpy(labels), target=target, units=True)
    ref = np_reference(x.numpy(), labels == target, classes=3, target=target)
    assert_matches_reference(res, ref, with_units=True)


def test_multiclass_label_map_with_target_and_one_hot_labels_agree():
    x, _ = make_data(seed=4)
    labels = torch.from_numpy(np.random.default_rng(5).integers(0, 3, size=(5, 8, 8)))
    res = analyze(HandNet(), x, labels, target=2)
    assert_matches_reference(res, np_reference(x.numpy(), (labels == 2).numpy()))
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2)
    res_oh = analyze(HandNet(), x, one_hot, target=2)
    pdt.assert_frame_equal(res.layers, res_oh.layers)
    pdt.assert_frame_equal(res.images, res_oh.images)
    with pytest.raises(ValueError, match="labels contain values .* pass target"):
        analyze(HandNet(), x, labels)  # a one-channel model needs 0/1 labels or a target


def test_model_probabilities_of_every_output_kind():
    logits = torch.tensor([[[-2.0, 0.0, 3.0]]])
    prob, pred, k = model_probabilities(logits)
    torch.testing.assert_close(prob, torch.sigmoid(logits))
    assert pred.tolist() == [[[0.0, 0.0, 1.0]]] and k == 1
    three = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.0, 5.0]]])  # (1, 3, 2)
    prob, pred, k = model_probabilities((three, "aux"), target=2)
    torch.testing.assert_close(prob, torch.softmax(three, 1)[:, 2:3])
    assert pred.tolist() == [[[0.0, 1.0]]] and k == 3
    prob, pred, _ = model_probabilities({"seg": torch.softmax(three, 1)}, "probabilities", 1, "seg")
    assert pred.tolist() == [[[1.0, 0.0]]]
    with pytest.raises(ValueError, match="output_key"):
        model_probabilities({"seg": three})
    with pytest.raises(ValueError, match="not \\[0, 1\\]"):
        model_probabilities(three, "probabilities")
    with pytest.raises(ValueError, match="target must be a class index"):
        model_probabilities(three, target=3)


# ----------------------------------------------------------------------------- input forms
class DictDataset(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": self.y[i]}


def test_tensor_iterable_and_dataloader_give_identical_tables():
    x, y = make_data(n=7)
    runs = {
        "tensor": analyze(HandNet(), x, y, units=True, batch_size=3),
        "pairs": analyze(HandNet(), list(zip(x, y, strict=True)), units=True, batch_size=2),
        "two iterables": analyze(HandNet(), iter(list(x)), iter(list(y)), units=True, batch_size=4),
        "loader": analyze(HandNet(), DataLoader(TensorDataset(x, y), batch_size=2), units=True),
        "dict loader": analyze(HandNet(), DataLoader(DictDataset(x, y), batch_size=4), units=True),
        "one pass": analyze(HandNet(), x, y, units=True, batch_size=5, low_memory=False),
        "two passes": analyze(HandNet(), x, y, units=True, batch_size=5, low_memory=True),
        # a budget for some layers only: the rest is scored in the second pass
        "part kept": analyze(HandNet(), x, y, units=True, batch_size=5, memory_budget=x[:5].nbytes * 2),
    }
    base = runs.pop("tensor")
    assert_matches_reference(base, np_reference(x.numpy(), y.numpy()), with_units=True)
    for name, res in runs.items():
        for table in ("layers", "images", "units"):
            pdt.assert_frame_equal(getattr(res, table), getattr(base, table), check_exact=False, rtol=1e-12, obj=f"{name}: {table}")


def test_images_of_different_sizes_in_an_iterable():
    x8, y8 = make_data(n=2, size=8, seed=6)
    x12, y12 = make_data(n=2, size=12, seed=7)
    items = [(x8[0], y8[0]), (x12[0], y12[0]), (x8[1], y8[1]), (x12[1], y12[1])]
    res = analyze(HandNet(), items, batch_size=8)
    assert res.images["image"].tolist() == ["0", "1", "2", "3"]
    small = analyze(HandNet(), x8, y8)
    large = analyze(HandNet(), x12, y12)
    for image, (src, k) in {"0": (small, "0"), "1": (large, "0"), "2": (small, "1"), "3": (large, "1")}.items():
        got = res.layers[res.layers["image"] == image].drop(columns="image").reset_index(drop=True)
        exp = src.layers[src.layers["image"] == k].drop(columns="image").reset_index(drop=True)
        pdt.assert_frame_equal(got, exp)
    assert res.layers.loc[res.layers["image"] == "1", "shape"].tolist() == ["1x12x12", "2x12x12", "2x6x6", "1x12x12"]


class OddSizeFails(HandNet):
    """Fails like a U-Net whose skip connections do not line up, for widths not divisible by 4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 4:
            raise RuntimeError(f"Sizes of tensors must match, got width {x.shape[-1]}")
        return super().forward(x)


def test_a_size_the_model_fails_on_is_recorded_and_the_rest_goes_on():
    x8, y8 = make_data(n=2, size=8)
    odd = torch.rand(1, 10, 10, dtype=torch.float64)
    items = [(x8[0], y8[0]), (odd, torch.ones(10, 10)), (x8[1], y8[1])]
    with pytest.warns(UserWarning, match="1 of 3 images failed"):
        res = analyze(OddSizeFails(), items)
    ok = analyze(HandNet(), x8, y8)
    bad = res.layers[res.layers["image"] == "1"]
    assert bad["layer"].tolist() == ["input", "feat", "down", "head"]
    assert bad["sa"].isna().all() and bad["sa_pred"].isna().all()
    assert bad["reason"].str.contains("model failed: RuntimeError: Sizes of tensors must match").all()
    assert (bad["status"] == "failed").all()
    assert res.images.set_index("image").loc["1", "reason"].startswith("model failed")
    good = res.layers[res.layers["image"] != "1"].reset_index(drop=True)
    pdt.assert_frame_equal(good.replace({"image": {"2": "1"}}), ok.layers)


class NaNForNegative(HandNet):
    """Returns NaN for every image whose first pixel is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return torch.where((x[:, :1, :1, :1] < 0), torch.full_like(out, math.nan), out)


@pytest.mark.parametrize("low_memory", [True, False])
def test_nan_output_for_one_image_of_a_batch(low_memory):
    x, y = make_data(n=4)
    x[2, 0, 0, 0] = -1.0
    res = analyze(NaNForNegative(), x, y, units=True, low_memory=low_memory)
    bad_layers = res.layers[res.layers["image"] == "2"]
    assert bad_layers["sa"].isna().all() and bad_layers["sa_pred"].isna().all()
    assert (bad_layers["status"] == "output_not_finite").all()
    assert (bad_layers["reason"] == "model output contains NaN or Inf").all()
    assert res.units.loc[res.units["image"] == "2", ["sa", "sa_pred"]].isna().all().all()
    row = res.images.set_index("image").loc["2"]
    assert math.isnan(row["dice"]) and math.isnan(row["mean_sa_pred"]) and row["reason"] == "model output contains NaN or Inf"
    keep = [0, 1, 3]
    ref = np_reference(x[keep].numpy(), y[keep].numpy())
    others = res.layers[res.layers["image"] != "2"].replace({"image": {"3": "2"}})
    for r in others.itertuples():
        np.testing.assert_allclose((r.sa, r.sa_pred), ref["layers"][(r.image, r.layer)], atol=1e-12)
    assert (others["reason"] == "").all()


def test_empty_prediction_gives_nan_sa_pred_with_a_reason_never_one():
    x, y = make_data(n=3)
    x[1] = x[1] * 0.45  # every pixel < 0.5: the model predicts nothing
    res = analyze(HandNet(), x, y, units=True)
    rows = res.layers[res.layers["image"] == "1"]
    assert rows["sa_pred"].isna().all()
    assert (rows["status"] == "empty_prediction").all()
    assert (rows["reason"] == "empty prediction: SA against the prediction undefined").all()
    ref = np_reference(x[1:2].numpy(), y[1:2].numpy())
    np.testing.assert_allclose(rows["sa"], [ref["layers"][("0", n)][0] for n in rows["layer"]], atol=1e-12)
    assert res.units.loc[res.units["image"] == "1", "sa_pred"].isna().all()
    assert res.units.loc[res.units["image"] == "1", "sa"].notna().all()
    image = res.images.set_index("image").loc["1"]
    assert math.isnan(image["mean_sa_pred"]) and math.isnan(image["input_sa_pred"])
    assert image["status"] == "empty_prediction" and image["dice"] == 0.0
    assert (res.layers.loc[res.layers["image"] != "1", "reason"] == "").all()


def test_keep_maps_keeps_the_first_images_maps():
    x, y = make_data(n=5)
    res = analyze(HandNet(), x, y, keep_maps=2, units=True, batch_size=3)
    ref = np_reference(x.numpy(), y.numpy())
    assert list(res.maps) == ["0", "1"]
    for image in ("0", "1"):
        entry = res.maps[image]
        np.testing.assert_array_equal(entry["image"], x[int(image)].float().numpy())
        np.testing.assert_array_equal(entry["label"], y[int(image)].numpy().astype(np.uint8))
        prob, _ = np_output(x[int(image)].numpy())
        np.testing.assert_allclose(entry["prediction"], prob, rtol=1e-6)
        for layer in ("input", "feat", "down", "head"):
            np.testing.assert_array_equal(entry["layers"][layer], ref["maps"][(image, layer)].astype(np.uint8))
        # the best units (by sa, labels given) with their maps
        scores = {u: ref["units"][(image, "feat", u)][0] for u in (0, 1)}
        assert set(entry["units"]["feat"]) == set(scores)
        g = prob  # the guide is the prediction; the labels only rank the units
        feats = np_features(x[int(image)].numpy())["feat"]
        for unit, unit_map in entry["units"]["feat"].items():
            np.testing.assert_array_equal(unit_map, np_segment(feats[unit : unit + 1], g).astype(np.uint8))
    assert analyze(HandNet(), x, y).maps == {}


def test_save_and_load_round_trip(tmp_path):
    x, y = make_data(n=3)
    meta = pd.DataFrame({"image": ["0", "1", "2"], "group": ["a", "b", "a"]})
    res = analyze(HandNet(), x, y, units=True, keep_maps=2, metadata=meta, data="hand")
    folder = res.save(tmp_path / "run")
    assert {p.name for p in folder.iterdir()} == {"layers.parquet", "images.parquet", "units.parquet", "settings.json", "maps.npz"}
    back = load_result(folder)
    pdt.assert_frame_equal(back.layers, res.layers)
    pdt.assert_frame_equal(back.images, res.images)
    pdt.assert_frame_equal(back.units, res.units)
    assert back.settings == res.settings
    assert list(back.maps) == list(res.maps)
    for image, entry in res.maps.items():
        for key in ("image", "label", "prediction"):
            np.testing.assert_array_equal(back.maps[image][key], entry[key])
        assert back.maps[image]["layers"].keys() == entry["layers"].keys()
        for layer, arr in entry["layers"].items():
            np.testing.assert_array_equal(back.maps[image]["layers"][layer], arr)
        for layer, units in entry["units"].items():
            assert back.maps[image]["units"][layer].keys() == units.keys()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        res.save(folder)
    smaller = analyze(HandNet(), x[:1], y[:1])
    smaller.save(folder, overwrite=True)
    back = load_result(folder)
    pdt.assert_frame_equal(back.layers, smaller.layers)
    assert back.units is None and back.maps == {}  # stale files of the earlier run are gone
    with pytest.raises(FileNotFoundError, match="layers.parquet"):
        load_result(tmp_path / "nothing")


# ------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (torch.zeros(4, 8, 8), "different counts: 5 images, 4 labels"),
        (torch.zeros(5, 8, 7), "spatial shape \\(8, 8\\)"),
        (torch.zeros(5, 1, 1, 8, 8), "spatial shape"),
    ],
)
def test_labels_that_do_not_match_the_images(labels, message):
    x, _ = make_data()
    with pytest.raises(ValueError, match=message):
        analyze(HandNet(), x, labels)


def test_iterable_labels_of_other_count_or_shape():
    x, y = make_data(n=3)
    with pytest.raises(ValueError, match="different counts: no label for image 2"):
        analyze(HandNet(), list(x), list(y[:2]))
    with pytest.raises(ValueError, match="different counts: 2 images and more labels"):
        analyze(HandNet(), list(x[:2]), list(y))
    with pytest.raises(ValueError, match="labels\\[1\\] must have the images' spatial shape"):
        analyze(HandNet(), [(x[0], y[0]), (x[1], y[1, :7])])


@pytest.mark.parametrize("bad", [torch.full((5, 8, 8), 255.0), torch.full((5, 8, 8), 0.5)])
def test_non_binary_labels_for_a_binary_target(bad):
    x, y = make_data()
    labels = y.clone()
    labels[3] = bad[3]
    with pytest.raises(ValueError, match="labels contain values .* must be 0/1"):
        analyze(HandNet(), x, labels)


def test_one_hot_labels_must_be_binary_and_have_the_target_channel():
    x, y = make_data()
    one_hot = torch.stack([1 - y, y], dim=1)
    res = analyze(HandNet(), x, one_hot)
    pdt.assert_frame_equal(res.layers, analyze(HandNet(), x, y).layers)
    with pytest.raises(ValueError, match="one-hot labels .* only 0 and 1"):
        analyze(HandNet(), x, one_hot * 2)
    with pytest.raises(ValueError, match="target 2 is not a channel"):
        analyze(HandNet(), x, one_hot, target=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guide": "label"}, 'guide="label" needs labels'),
        ({"guide": "truth"}, "guide must be"),
        ({"output": "logits"}, "output must be"),
        ({"output": "probabilities"}, "not \\[0, 1\\]"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"target": -1}, "target must be an integer >= 0 or None, got -1"),
        ({"target": 1.7}, "target must be an integer >= 0 or None, got 1.7"),
        ({"keep_maps": "a"}, "keep_maps must be an integer >= 0, got 'a'"),
        ({"units": "yes"}, "units must be True or False"),
        ({"keep_maps": -1}, "keep_maps"),
        ({"layers": "feet"}, "'feat'"),
        ({"ids": ["a", "b", "a", "c", "d"]}, "image id 'a' appears twice"),
        ({"ids": ["a"]}, "one entry per image"),
        ({"mask": torch.ones(5, 8, 8)}, "mask must have shape \\(5, 1, 8, 8\\)"),
        ({"mask": lambda im: torch.ones(im.shape[0], 8, 8)}, "mask callable must return"),
        ({"reshape": lambda t: t.flatten(1)}, "reshape must return features"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    x, _ = make_data()
    with pytest.raises(ValueError, match=message):
        analyze(HandNet(), x, **kwargs)


def test_empty_input_and_non_module():
    with pytest.raises(ValueError, match="images is empty"):
        analyze(HandNet(), [])
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        analyze(lambda x: x, torch.zeros(1, 1, 8, 8))


def test_mask_shapes_the_prototypes():
    x, y = make_data(n=2)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, :5] = 1
    res = analyze(HandNet(), x, y, mask=mask)
    called = analyze(HandNet(), x, y, mask=lambda im: (torch.arange(8) < 5).expand(im.shape[0], 1, 8, 8).double())
    pdt.assert_frame_equal(res.layers, called.layers)
    # reference: prototypes from masked weights, every pixel classified
    for r in res.layers.itertuples():
        xi = x[int(r.image)].numpy()
        prob, pred = np_output(xi)
        feats = np_resize(np_features(xi)[r.layer], (8, 8))
        u = feats.reshape(feats.shape[0], -1)
        m = mask[int(r.image), 0].numpy().reshape(-1)
        g = prob.reshape(-1)
        p_t, p_b = u @ (g * m) / (g * m).sum(), u @ ((1 - g) * m) / ((1 - g) * m).sum()
        seg = (((u - p_t[:, None]) ** 2).sum(0) < ((u - p_b[:, None]) ** 2).sum(0)).reshape(8, 8)
        np.testing.assert_allclose(r.sa_pred, np_dice(seg, pred), atol=1e-12)


# ------------------------------------------------------------------- layer outputs and order
class Layouts(nn.Module):
    """The same features [x, 1 - x] as channels-first, channels-last, tokens and tokens + class token."""

    def __init__(self) -> None:
        super().__init__()
        self.net = HandNet()
        self.last = nn.Identity()
        self.tokens = nn.Identity()
        self.cls_tokens = nn.Identity()
        self.odd_tokens = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.feat(x)
        self.last(f.permute(0, 2, 3, 1))
        t = f.flatten(2).transpose(1, 2)
        self.tokens(t)
        self.cls_tokens(torch.cat([torch.zeros_like(t[:, :1]), t], dim=1))
        self.odd_tokens(t[:, :-3])
        return self.net.head(f)


def test_channels_last_and_token_outputs_are_put_on_the_grid():
    x, y = make_data(n=3)
    res = analyze(Layouts(), x, y, layers=["net.feat", "last", "tokens", "cls_tokens", "odd_tokens"])
    by = {layer: df.reset_index(drop=True) for layer, df in res.layers.groupby("layer")}
    for layer in ("last", "tokens", "cls_tokens"):
        pdt.assert_series_equal(by[layer]["sa"], by["net.feat"]["sa"], check_names=False)
        pdt.assert_series_equal(by[layer]["sa_pred"], by["net.feat"]["sa_pred"], check_names=False)
        assert (by[layer]["channels"] == 2).all() and (by[layer]["reason"] == "").all()
    assert by["last"]["shape"][0] == "8x8x2" and by["cls_tokens"]["shape"][0] == "65x2"
    assert by["odd_tokens"]["sa_pred"].isna().all()
    assert by["odd_tokens"]["reason"][0].startswith("skipped: token output (3, 61, 2) does not fit")
    assert by["odd_tokens"]["status"][0] == "not_features"
    # a reshape callable overrides the rules; returning None falls back to them
    def pad(t: torch.Tensor) -> torch.Tensor | None:
        if t.shape[1] != 61:
            return None
        return torch.cat([t, t[:, -3:]], dim=1).transpose(1, 2).reshape(t.shape[0], 2, 8, 8)

    padded = analyze(Layouts(), x, y, layers=["tokens", "odd_tokens"], reshape=pad)
    by_pad = {layer: df.reset_index(drop=True) for layer, df in padded.layers.groupby("layer")}
    cols = ["image", "channels", "shape", "sa", "sa_pred", "reason"]
    pdt.assert_frame_equal(by_pad["tokens"][cols], by["tokens"][cols])
    assert by_pad["odd_tokens"]["sa_pred"].notna().all() and (by_pad["odd_tokens"]["reason"] == "").all()


def test_tokens_to_grid_values():
    tokens = torch.arange(2 * 4 * 3).reshape(2, 4, 3).float()  # 4 tokens = 2x2 patches of 8x8
    grid = tokens_to_grid(tokens, (8, 8))
    assert grid.shape == (2, 3, 2, 2)
    assert grid[1, 2, 1, 0] == tokens[1, 2, 2]  # token 2 is row 1, column 0
    with_cls = tokens_to_grid(torch.cat([tokens[:, :1] * 0 - 1, tokens], 1), (8, 8))
    torch.testing.assert_close(with_cls, grid)
    assert tokens_to_grid(torch.zeros(1, 6, 3), (8, 8)) is None  # neither 2x2 (+1) nor 4x4 (+1)


class InPlace(nn.Module):
    """conv -> ReLU(inplace=True): the recorded conv output must be the one before the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.net = HandNet()
        self.shift = nn.Conv2d(2, 2, 1)
        with torch.no_grad():
            self.shift.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
            self.shift.bias.copy_(torch.tensor([-0.5, -0.5]))
        self.relu = nn.ReLU(inplace=True)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.feat(x)
        self.relu(self.shift(f))
        return self.net.head(f)


@pytest.mark.parametrize("low_memory", [True, False])
def test_output_changed_in_place_after_the_layer_is_scored_as_the_layer_gave_it(low_memory):
    x, y = make_data(n=3)
    res = analyze(InPlace(), x, y, layers=["shift"], low_memory=low_memory)
    for r in res.layers[res.layers["layer"] == "shift"].itertuples():
        xi = x[int(r.image)].numpy()
        prob, pred = np_output(xi)
        before_relu = np_features(xi)["feat"] - 0.5  # (after it, it would be max(., 0))
        seg = np_segment(before_relu, prob)
        np.testing.assert_allclose((r.sa, r.sa_pred), (np_dice(seg, y[int(r.image)].numpy().astype(bool)), np_dice(seg, pred)), atol=1e-12)
        assert r.reason == ""


class Reversed(HandNet):
    """Defines a conv after the head that runs first: depth follows the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Conv2d(1, 1, 1)
        self.unused = nn.Conv2d(1, 1, 1)
        with torch.no_grad():
            self.pre.weight.fill_(1.0)
            self.pre.bias.zero_()
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.pre(x))


def test_depth_and_rows_follow_the_forward_order():
    x, y = make_data(n=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = analyze(Reversed(), x, y)
    first = res.layers[res.layers["image"] == "0"]
    assert first["layer"].tolist() == ["input", "pre", "feat", "down", "head", "unused"]
    assert first["depth"].tolist() == [0, 1, 2, 3, 4, 5]
    unused = first[first["layer"] == "unused"].iloc[0]
    assert math.isnan(unused["sa_pred"]) and unused["status"] == "not_called"
    # pre is the identity: its scores equal the input's
    np.testing.assert_allclose(first.set_index("layer").loc["pre", ["sa", "sa_pred"]].to_numpy(float), first.set_index("layer").loc["input", ["sa", "sa_pred"]].to_numpy(float))


class Twice(HandNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat(x)
        self.down(f)
        self.down(f.flip(-1))  # the last call is the one scored
        return self.head(f)


def test_a_layer_called_twice_scores_its_last_call_and_warns():
    x, y = make_data(n=2)
    with pytest.warns(UserWarning, match="called more than once .*'down'"):
        res = analyze(Twice(), x, y, layers=["down"])
    for r in res.layers[res.layers["layer"] == "down"].itertuples():
        xi = x[int(r.image)].numpy()
        prob, pred = np_output(xi)
        flipped = np_features(xi[:, :, ::-1].copy())["down"]
        seg = np_segment(np_resize(flipped, (8, 8)), prob)
        np.testing.assert_allclose(r.sa_pred, np_dice(seg, pred), atol=1e-12)


# ----------------------------------------------------------------------- 1D and 3D values
class HandNetND(nn.Module):
    """``feat`` = [x, 1 - x], ``pool`` a 2-average pooling of it (half resolution), ``head`` 8x - 4."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
        self.feat = conv(1, 2, 1)
        self.pool = {1: nn.AvgPool1d, 3: nn.AvgPool3d}[dims](2)
        self.head = conv(2, 1, 1)
        with torch.no_grad():
            self.feat.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, *[1] * dims))
            self.feat.bias.copy_(torch.tensor([0.0, 1.0]))
            self.head.weight.copy_(torch.tensor([4.0, -4.0]).view(1, 2, *[1] * dims))
            self.head.bias.zero_()
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat(x)
        self.pool(f)
        return self.head(f)


def np_pool(f: np.ndarray) -> np.ndarray:
    """(C, *S) -> (C, *S // 2): the mean of every 2 x ... x 2 block."""
    spatial = [s // 2 for s in f.shape[1:]]
    f = f[(slice(None), *[slice(0, 2 * s) for s in spatial])]
    shape = [f.shape[0]] + [v for s in spatial for v in (s, 2)]
    return f.reshape(shape).mean(axis=tuple(range(2, 2 + 2 * len(spatial), 2)))


@pytest.mark.parametrize("dims,size", [(1, (24,)), (3, (6, 8, 4))], ids=["1d", "3d"])
def test_1d_and_3d_scores_match_an_independent_numpy_computation(dims, size):
    rng = np.random.default_rng(dims)
    x = rng.uniform(0.0, 1.0, size=(3, 1, *size))
    y = (x[:, 0] + rng.normal(0.0, 0.25, size=(3, *size)) > 0.5).astype(np.float64)
    res = analyze(HandNetND(dims), torch.from_numpy(x), torch.from_numpy(y), layers=["feat", "pool", "head"], units=True)
    checked = 0
    for n in range(3):
        f = np.stack([x[n, 0], 1.0 - x[n, 0]])
        head = 4.0 * f[0] - 4.0 * f[1]
        prob = 1.0 / (1.0 + np.exp(-head))
        pred, lab = prob > 0.5, y[n].astype(bool)
        for name, feats in {"input": x[n], "feat": f, "pool": np_pool(f), "head": head[None]}.items():
            up = np_resize(feats, size)
            seg = np_segment(up, prob)
            row = res.layers[(res.layers["image"] == str(n)) & (res.layers["layer"] == name)].iloc[0]
            np.testing.assert_allclose([row.sa, row.sa_pred], [np_dice(seg, lab), np_dice(seg, pred)], rtol=0, atol=1e-12)
            for c in range(up.shape[0]):
                useg = np_segment(up[c : c + 1], prob)
                unit = res.units[(res.units["image"] == str(n)) & (res.units["layer"] == name) & (res.units["unit"] == c)]
                np.testing.assert_allclose(unit[["sa", "sa_pred"]].to_numpy()[0], [np_dice(useg, lab), np_dice(useg, pred)],
                                           rtol=0, atol=1e-12)  # fmt: skip
                checked += 1
    assert checked == 3 * (1 + 2 + 2 + 1)  # every unit of every layer of every image
    pooled = res.layers[res.layers["layer"] == "pool"]
    assert pooled["shape"].iloc[0] == "2x" + "x".join(str(s // 2) for s in size) and (pooled["status"] == "ok").all()
    assert res.layers["sa"].nunique() > 3  # the scores are not trivial
