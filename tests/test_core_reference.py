"""The functional core against an independent float64 NumPy reference, MONAI and hand computations.

The reference below uses NumPy only: linear resizing with ``align_corners=False`` written from the
formula ``src = (dst + 0.5) * in / out - 0.5`` (clamped, separable per axis), full squared
distances to the prototypes, softmax, argmax and Dice.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, compute_dice

import segability
from segability.core import functional as core_functional
from segability.core import metric as core_metric
from segability.core import reduction as core_reduction
from segability.core import resize as core_resize
from segability.core.reduction import score_layer
from segability.core.resize import interpolation_matrix, resize, resize_adjoint


# ------------------------------------------------------------------------- NumPy reference
def np_interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of 1D linear resizing, align_corners=False."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for dst in range(n_out):
        src = max((dst + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        m[dst, i0] += 1.0 - lam
        m[dst, i1] += lam
    return m


def np_resize(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Resize x (C, *s) to (C, *size), one axis at a time."""
    for axis, n_out in enumerate(size):
        n_in = x.shape[1 + axis]
        if n_in != n_out:
            m = np_interpolation_matrix(n_in, n_out)
            x = np.moveaxis(np.tensordot(m, x, axes=([1], [1 + axis])), 0, 1 + axis)
    return x


def np_protoseg(f: np.ndarray, g: np.ndarray, m: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One image: f (C, *s), g (K, *S), m (1, *S) or None."""
    size = g.shape[1:]
    c = f.shape[0]
    u = np_resize(f, size).reshape(c, -1)  # (C, N)
    w = np.concatenate([1.0 - g, g]) if g.shape[0] == 1 else g
    if m is not None:
        w = w * m
    w = w.reshape(w.shape[0], -1)  # (K, N)
    protos = (w @ u.T) / w.sum(1, keepdims=True)  # (K, C)
    dist = ((u[None, :, :] - protos[:, :, None]) ** 2).sum(1)  # (K, N)
    z = -dist - (-dist).max(0, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(0, keepdims=True)
    out = {
        "protos": protos,
        "probs": probs.reshape(-1, *size),
        "map": probs.argmax(0).reshape(size),
        "dist": dist.reshape(-1, *size),
    }
    if protos.shape[0] == 2:
        d_b = (u - protos[0][:, None]) ** 2  # (C, N): every unit on its own
        d_t = (u - protos[1][:, None]) ** 2
        out["units"] = (d_t < d_b).reshape(c, *size)
        out["unit_margin"] = (d_b - d_t).reshape(c, *size)
    return out


def np_dice(a: np.ndarray, b: np.ndarray, empty: str = "one") -> float:
    a, b = a.astype(bool), b.astype(bool)
    denom = a.sum() + b.sum()
    if denom == 0:
        return 1.0 if empty == "one" else math.nan
    return 2.0 * (a & b).sum() / denom


# ------------------------------------------------------------------------------ test data
# (id, feature spatial size, guide spatial size): same size, 1/2, 1/4, odd ratios, and larger
# features (the resize then shrinks them).
CASES = [
    ("1d-same", (9,), (9,)),
    ("1d-half", (6,), (12,)),
    ("1d-odd", (5,), (13,)),
    ("1d-larger", (16,), (7,)),
    ("2d-same", (6, 5), (6, 5)),
    ("2d-quarter", (4, 3), (16, 12)),
    ("2d-odd", (5, 3), (13, 7)),
    ("2d-mixed", (8, 3), (5, 7)),
    ("3d-same", (4, 3, 5), (4, 3, 5)),
    ("3d-half", (3, 4, 2), (6, 8, 4)),
    ("3d-odd", (2, 3, 5), (5, 7, 13)),
]
CASE_IDS = [c[0] for c in CASES]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
B, C = 2, 4


def make_inputs(
    fsize: tuple[int, ...], gsize: tuple[int, ...], *, kind: str, masked: bool, k: int, seed: int,
    dtype: torch.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Features, guide and mask as float64 arrays already rounded to ``dtype``."""
    rng = np.random.default_rng(seed)
    d = len(gsize)
    # Smooth blobs at the guide's resolution, so maps have regions, plus noise.
    field = np.stack([np_resize(rng.normal(size=(1, *[3] * d)), gsize)[0] for _ in range(B * k)])
    field = field.reshape(B, k, *gsize) + 0.3 * rng.normal(size=(B, k, *gsize))
    if k == 1:
        g = (field > 0).astype(float) if kind == "hard" else 1.0 / (1.0 + np.exp(-3.0 * field))
        flat = g.reshape(B, -1)
        flat[:, 0], flat[:, -1] = 0.0, 1.0  # both classes present, also inside the mask
    else:
        if kind == "hard":
            g = np.eye(k)[field.argmax(1)]  # (B, *S, K)
            g = np.ascontiguousarray(np.moveaxis(g, -1, 1))
        else:
            e = np.exp(2.0 * field)
            g = e / e.sum(1, keepdims=True)
        flat = g.reshape(B, k, -1)
        for cls in range(k):  # every class present, also inside the mask
            flat[:, :, cls] = 0.0
            flat[:, cls, cls] = 1.0
    mask = None
    if masked:
        mask = (rng.random((B, 1, *gsize)) < 0.7).astype(float)
        mask.reshape(B, -1)[:, [0, 1, 2, -1]] = 1.0
    low = np.stack([np_resize(field[i, :1], fsize)[0] for i in range(B)])  # (B, *s)
    f = rng.normal(size=(B, C, *fsize))
    f[:, 0] += 2.0 * low
    f[:, 1] -= 1.5 * low
    rnd = (lambda a: torch.from_numpy(a).to(dtype).double().numpy()) if dtype == torch.float32 else (lambda a: a)
    return rnd(f), rnd(g), None if mask is None else rnd(mask)


def to_t(a: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def reference(f, g, m) -> list[dict[str, np.ndarray]]:
    return [np_protoseg(f[i], g[i], None if m is None else m[i]) for i in range(f.shape[0])]


def decisive(margins: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Pixels whose decision margin is beyond rounding; a pixel within it may go either way.

    In float64 the test data has no such pixel; in float32 a few do, and must stay few.
    """
    if dtype == torch.float64:
        assert np.abs(margins).min() > 1e-7, "test data has a near-tie; change the seed"
        return np.ones(margins.shape, bool)
    ok = np.abs(margins) > 2e-5  # float32 rounding of these margins is ~1e-6
    assert ok.mean() > 0.95
    return ok


def assert_maps_match(core: np.ndarray, ref: np.ndarray, ok: np.ndarray) -> np.ndarray:
    """Equal wherever decisive; returns the reference map with the core's choice at near-ties."""
    np.testing.assert_array_equal(core[ok], ref[ok])
    return np.where(ok, ref, core)


def top2_margin(dist: np.ndarray) -> np.ndarray:
    s = np.sort(dist, axis=0)
    return s[1] - s[0]


# -------------------------------------------------------------- the reference's own resize
@pytest.mark.parametrize("n_in,n_out", [(2, 4), (5, 13), (4, 16), (16, 7), (3, 3), (1, 5), (7, 2)])
def test_reference_matrix_matches_torch_convention(n_in: int, n_out: int) -> None:
    # The NumPy matrix follows the formula; torch's interpolate (and the core's matrix) must agree.
    m = np_interpolation_matrix(n_in, n_out)
    np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-15)
    np.testing.assert_allclose(interpolation_matrix(n_in, n_out).numpy(), m, atol=1e-15)
    x = np.random.default_rng(0).normal(size=(3, n_in))
    via_torch = torch.nn.functional.interpolate(
        torch.from_numpy(x)[None], size=n_out, mode="linear", align_corners=False
    )[0].numpy()
    np.testing.assert_allclose(np_resize(x, (n_out,)), via_torch, atol=1e-12)


def test_interpolation_matrix_by_hand() -> None:
    # 2 -> 4: src = (dst + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (weights clamp).
    expected = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    np.testing.assert_allclose(np_interpolation_matrix(2, 4), expected, atol=0)
    np.testing.assert_allclose(interpolation_matrix(2, 4).numpy(), expected, atol=1e-15)
    # 3 -> 2 (shrinking): src = (dst + 0.5) * 1.5 - 0.5 = 0.25, 1.75.
    expected = np.array([[0.75, 0.25, 0.0], [0.0, 0.25, 0.75]])
    np.testing.assert_allclose(interpolation_matrix(3, 2).numpy(), expected, atol=1e-15)


def test_interpolation_matrix_cache_is_not_shared() -> None:
    a = interpolation_matrix(3, 7)
    a.mul_(0.0)  # editing the returned matrix must not corrupt later resizes
    np.testing.assert_allclose(interpolation_matrix(3, 7).numpy(), np_interpolation_matrix(3, 7), atol=1e-15)


@pytest.mark.parametrize("name,fsize,gsize", CASES, ids=CASE_IDS)
def test_resize_and_adjoint(name: str, fsize: tuple, gsize: tuple) -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(size=(2, 3, *fsize))
    g = rng.normal(size=(2, 3, *gsize))
    up = resize(torch.from_numpy(f), gsize).numpy()
    np.testing.assert_allclose(up, np.stack([np_resize(x, gsize) for x in f]), atol=1e-12)
    adj = resize_adjoint(torch.from_numpy(g), fsize).numpy()
    assert adj.shape == f.shape
    # <U f, g> == <f, U^T g>, per batch element and channel
    lhs = (up * g).reshape(2, 3, -1).sum(-1)
    rhs = (f * adj).reshape(2, 3, -1).sum(-1)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ ProtoSeg vs reference
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name,fsize,gsize", CASES, ids=CASE_IDS)
def test_protoseg_matches_reference(name, fsize, gsize, masked, kind, dtype, direct_torch) -> None:
    seed = CASE_IDS.index(name) * 10 + masked * 2 + (kind == "soft")
    f, g, m = make_inputs(fsize, gsize, kind=kind, masked=masked, k=1, seed=seed, dtype=dtype)
    ref = reference(f, g, m)
    ft, gt, mt = to_t(f, dtype), to_t(g, dtype), to_t(m, dtype)
    tol = TOL[dtype]

    protos = segability.prototypes(ft, gt, mt)
    assert protos.dtype == dtype and protos.shape == (B, 2, C)
    np.testing.assert_allclose(protos.double().numpy(), np.stack([r["protos"] for r in ref]), rtol=tol, atol=tol)

    probs = segability.protoseg(ft, gt, mt)
    assert probs.dtype == dtype and probs.shape == (B, 2, *gsize)
    np.testing.assert_allclose(probs.double().numpy(), np.stack([r["probs"] for r in ref]), atol=tol)

    # The direct computation (every channel resized by F.interpolate) agrees to rounding.
    d_probs, d_protos, _ = direct_torch(ft, gt, mt)
    torch.testing.assert_close(probs, d_probs, atol=tol, rtol=0)
    torch.testing.assert_close(protos, d_protos, atol=tol, rtol=tol)

    binary = probs.argmax(1).numpy()
    ok = decisive(np.stack([r["dist"][0] - r["dist"][1] for r in ref]), dtype)
    ref_map = assert_maps_match(binary, np.stack([r["map"] for r in ref]), ok)

    label = g[:, 0] > 0.5
    sa = segability.sa_score(probs.argmax(1), torch.from_numpy(label))
    expected = [np_dice(ref_map[i], label[i]) for i in range(B)]
    np.testing.assert_allclose(sa.numpy(), expected, atol=1e-12)
    assert 0.0 < binary.mean() < 1.0  # not a trivial case: both classes appear


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["hard", "soft"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name,fsize,gsize", CASES, ids=CASE_IDS)
def test_multiclass_matches_reference(name, fsize, gsize, masked, kind, dtype, direct_torch) -> None:
    k = 3
    seed = 500 + CASE_IDS.index(name) * 10 + masked * 2 + (kind == "soft")
    f, g, m = make_inputs(fsize, gsize, kind=kind, masked=masked, k=k, seed=seed, dtype=dtype)
    ref = reference(f, g, m)
    ft, gt, mt = to_t(f, dtype), to_t(g, dtype), to_t(m, dtype)
    tol = TOL[dtype]

    protos = segability.prototypes(ft, gt, mt)
    assert protos.shape == (B, k, C)
    np.testing.assert_allclose(protos.double().numpy(), np.stack([r["protos"] for r in ref]), rtol=tol, atol=tol)
    probs = segability.protoseg(ft, gt, mt)
    assert probs.dtype == dtype and probs.shape == (B, k, *gsize)
    np.testing.assert_allclose(probs.double().numpy(), np.stack([r["probs"] for r in ref]), atol=tol)
    torch.testing.assert_close(probs, direct_torch(ft, gt, mt)[0], atol=tol, rtol=0)
    ok = decisive(np.stack([top2_margin(r["dist"]) for r in ref]), dtype)
    assert_maps_match(probs.argmax(1).numpy(), np.stack([r["map"] for r in ref]), ok)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name,fsize,gsize", CASES, ids=CASE_IDS)
def test_units_and_score_layer_match_reference(name, fsize, gsize, masked, dtype) -> None:
    seed = 900 + CASE_IDS.index(name) * 10 + masked
    f, g, m = make_inputs(fsize, gsize, kind="soft", masked=masked, k=1, seed=seed, dtype=dtype)
    ref = reference(f, g, m)
    ft, gt, mt = to_t(f, dtype), to_t(g, dtype), to_t(m, dtype)

    units = segability.protoseg_units(ft, gt, mt)
    assert units.dtype == dtype and units.shape == (B, C, *gsize)
    ok_units = decisive(np.stack([r["unit_margin"] for r in ref]), dtype)
    expected_units = assert_maps_match(units.numpy(), np.stack([r["units"] for r in ref]).astype(float), ok_units)
    for chunk in (1, 3):  # chunking channels changes nothing
        torch.testing.assert_close(segability.protoseg_units(ft, gt, mt, chunk_size=chunk), units, atol=0, rtol=0)
    probs = segability.protoseg(ft, gt, mt)
    ok = decisive(np.stack([r["dist"][0] - r["dist"][1] for r in ref]), dtype)
    layer_map = assert_maps_match(probs.argmax(1).numpy(), np.stack([r["map"] for r in ref]), ok)
    # score_layer decides by comparing logits, protoseg by argmax of probabilities: at a near-tie
    # the two may differ, so only decisive-everywhere data checks the layer SA exactly.
    layer_exact = bool(ok.all())

    # References: the binarised guide, a random mask, an empty mask, a full mask.
    rng = np.random.default_rng(seed)
    refs = np.stack(
        [g[:, 0] > 0.5, rng.random((B, *gsize)) < 0.4, np.zeros((B, *gsize), bool), np.ones((B, *gsize), bool)],
        axis=1,
    )
    for empty in ("one", "nan"):
        layer, unit, undefined = score_layer(
            ft, gt, torch.from_numpy(refs).to(dtype), mt, units=True, empty=empty, chunk_size=2
        )
        assert not undefined.any()
        exp_layer = np.array([[np_dice(layer_map[i], refs[i, j], empty) for j in range(4)] for i in range(B)])
        exp_unit = np.array(
            [[[np_dice(expected_units[i, c], refs[i, j], empty) for c in range(C)] for j in range(4)] for i in range(B)]
        )
        np.testing.assert_allclose(
            layer.double().numpy(), exp_layer, atol=1e-6 if layer_exact else 0.02, equal_nan=True
        )
        np.testing.assert_allclose(unit.double().numpy(), exp_unit, atol=1e-6, equal_nan=True)
        sa_units = segability.sa_score(
            torch.from_numpy(expected_units).flatten(0, 1), torch.from_numpy(np.repeat(refs[:, 1], C, axis=0)), empty=empty
        )
        np.testing.assert_allclose(sa_units.reshape(B, C).numpy(), exp_unit[:, 1], atol=1e-12)


@pytest.mark.parametrize("offset", [10.0, 100.0, 1000.0])
def test_float32_features_with_a_large_common_offset(offset: float) -> None:
    # Post-ReLU features often share a large offset. Distances do not see it; a computation that
    # expands ||u - p||^2 into 2 u.p - ||p||^2 without centring loses the class difference in
    # float32 (at offset 100 it flipped ~10% of the pixels before the fix).
    f, g, m = make_inputs((8, 8), (16, 16), kind="soft", masked=True, k=1, seed=21, dtype=torch.float64)
    f = np.concatenate([f] * 16, axis=1) + offset  # 64 channels
    f32 = torch.from_numpy(f).float()
    ref = reference(f32.double().numpy(), g, m)
    gt, mt = to_t(g, torch.float32), to_t(m, torch.float32)
    probs = segability.protoseg(f32, gt, mt)
    np.testing.assert_allclose(probs.double().numpy(), np.stack([r["probs"] for r in ref]), atol=2e-3)
    margins = np.stack([r["dist"][0] - r["dist"][1] for r in ref])
    ok = np.abs(margins) > 1e-2
    assert ok.mean() > 0.99
    np.testing.assert_array_equal(probs.argmax(1).numpy()[ok], np.stack([r["map"] for r in ref])[ok])
    layer, _, _ = score_layer(f32, gt, gt > 0.5, mt)
    label = g[:, 0] > 0.5
    expected = [np_dice(r["map"], label[i]) for i, r in enumerate(ref)]
    np.testing.assert_allclose(layer[:, 0].numpy(), expected, atol=0.01)


def test_integer_and_bool_guides_equal_float_guide() -> None:
    f, g, m = make_inputs((5, 4), (9, 8), kind="hard", masked=True, k=1, seed=3, dtype=torch.float64)
    ft, mt = to_t(f, torch.float64), to_t(m, torch.float64)
    expected = segability.protoseg(ft, to_t(g, torch.float64), mt)
    for gdtype in (torch.bool, torch.uint8, torch.int64):
        got = segability.protoseg(ft, torch.from_numpy(g).to(gdtype), mt.to(gdtype))
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


# --------------------------------------------------------------------- SA vs MONAI's Dice
@pytest.mark.parametrize("spatial", [(11,), (7, 6), (4, 5, 3)], ids=["1d", "2d", "3d"])
def test_sa_score_matches_monai(spatial: tuple[int, ...]) -> None:
    rng = np.random.default_rng(7)
    n = 6
    seg = rng.random((n, 1, *spatial)) < 0.4
    ref = rng.random((n, 1, *spatial)) < 0.3
    seg[0], ref[0] = False, False  # both empty: 1.0 under ignore_empty=False
    ref[1] = False  # empty reference, non-empty map: 0
    seg[2] = False  # empty map, non-empty reference: 0
    seg[3] = ref[3]  # identical: 1
    s, r = torch.from_numpy(seg).float(), torch.from_numpy(ref).float()
    ours = segability.sa_score(s, r)
    monai = compute_dice(s, r, include_background=True, ignore_empty=False)[:, 0]
    torch.testing.assert_close(ours, monai.to(ours.dtype), atol=1e-6, rtol=0)
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    metric(y_pred=s, y=r)
    torch.testing.assert_close(ours, metric.aggregate()[:, 0].to(ours.dtype), atol=1e-6, rtol=0)
    expected = [np_dice(seg[i], ref[i]) for i in range(n)]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)
    assert expected[:4] == [1.0, 0.0, 0.0, 1.0]
    nan = segability.sa_score(s, r, empty="nan")
    assert math.isnan(nan[0]) and torch.equal(nan[1:], ours[1:])


# ---------------------------------------------------------------------- by hand, written out
def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_hand_two_prototypes() -> None:
    # p_b = mean(0, 0) = 0, p_t = mean(2, 4) = 3; P(target) = sigmoid(d_b - d_t).
    f = torch.tensor([[[0.0, 0.0, 2.0, 4.0]]], dtype=torch.float64)
    g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]], dtype=torch.float64)
    torch.testing.assert_close(segability.prototypes(f, g), torch.tensor([[[0.0], [3.0]]], dtype=torch.float64))
    p_t = [sigmoid(0 - 9), sigmoid(0 - 9), sigmoid(4 - 1), sigmoid(16 - 1)]
    expected = torch.tensor([[[1 - p for p in p_t], p_t]], dtype=torch.float64)
    torch.testing.assert_close(segability.protoseg(f, g), expected, atol=1e-14, rtol=0)


def test_hand_soft_guide_and_mask() -> None:
    # Mask drops the last pixel from the prototypes only.
    # p_t = (1*.25 + 2*.5 + 3*1) / (.25 + .5 + 1) = 17/7;  p_b = (1*.75 + 2*.5 + 3*0) / (.75 + .5) = 7/5
    f = torch.tensor([[[1.0, 2.0, 3.0, 10.0]]], dtype=torch.float64)
    g = torch.tensor([[[0.25, 0.5, 1.0, 1.0]]], dtype=torch.float64)
    m = torch.tensor([[[1.0, 1.0, 1.0, 0.0]]], dtype=torch.float64)
    pt, pb = 17 / 7, 7 / 5
    torch.testing.assert_close(segability.prototypes(f, g, m), torch.tensor([[[pb], [pt]]], dtype=torch.float64))
    p_t = [sigmoid((u - pb) ** 2 - (u - pt) ** 2) for u in (1.0, 2.0, 3.0, 10.0)]
    probs = segability.protoseg(f, g, m)
    torch.testing.assert_close(probs[0, 1], torch.tensor(p_t, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 4, dtype=torch.float64))
    # u = 2: d_b = 0.36 > d_t = (2 - 17/7)^2 = 0.18 -> target; the masked pixel still gets a class.
    assert probs.argmax(1).tolist() == [[0, 1, 1, 1]]
    # Without the mask the last pixel pulls p_t up: (4.25 + 10) / 2.75.
    assert segability.prototypes(f, g)[0, 1, 0].item() == pytest.approx(14.25 / 2.75, abs=1e-14)


def test_hand_low_resolution_features() -> None:
    # Features [0, 4] (2 samples) are resized to 4 samples: [0, 1, 3, 4]; channel 2 is constant.
    # Guide [0, 0, 1, 1]: p_b = (0.5, 2), p_t = (3.5, 2).
    f = torch.tensor([[[0.0, 4.0], [2.0, 2.0]]], dtype=torch.float64)
    g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]], dtype=torch.float64)
    expected_protos = torch.tensor([[[0.5, 2.0], [3.5, 2.0]]], dtype=torch.float64)
    torch.testing.assert_close(segability.prototypes(f, g), expected_protos)
    p_t = [sigmoid((u - 0.5) ** 2 - (u - 3.5) ** 2) for u in (0.0, 1.0, 3.0, 4.0)]  # -12, -6, 6, 12
    torch.testing.assert_close(
        segability.protoseg(f, g)[0, 1], torch.tensor(p_t, dtype=torch.float64), atol=1e-14, rtol=0
    )
    assert segability.protoseg_units(f, g).tolist() == [[[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]


def test_hand_three_classes() -> None:
    # Prototypes 0.5, 5.5, 10.5; P(k | u) = exp(-d_k) / sum_j exp(-d_j).
    f = torch.tensor([[[0.0, 1.0, 5.0, 6.0, 10.0, 11.0]]], dtype=torch.float64)
    labels = [0, 0, 1, 1, 2, 2]
    g = torch.zeros(1, 3, 6, dtype=torch.float64)
    g[0, labels, range(6)] = 1.0
    torch.testing.assert_close(
        segability.prototypes(f, g), torch.tensor([[[0.5], [5.5], [10.5]]], dtype=torch.float64)
    )
    probs = segability.protoseg(f, g)
    for x, u in enumerate([0.0, 1.0, 5.0, 6.0, 10.0, 11.0]):
        e = [math.exp(-((u - p) ** 2)) for p in (0.5, 5.5, 10.5)]
        expected = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
        torch.testing.assert_close(probs[0, :, x], expected, atol=1e-14, rtol=0)
    assert probs.argmax(1).tolist() == [labels]


def test_hand_units_and_sa() -> None:
    # Guide [0, 0, 1, 1]. Unit 0: p_b 0, p_t 3 -> [0, 0, 1, 1]. Unit 1: p_b 5, p_t 0 -> [0, 0, 1, 1].
    # Unit 2: p_b 2, p_t 1 -> target iff u < 1.5 -> [1, 0, 0, 1]; Dice vs [0, 0, 1, 1] = 2*1/(2+2).
    f = torch.tensor([[[0.0, 0.0, 2.0, 4.0], [5.0, 5.0, 0.0, 0.0], [1.0, 3.0, 2.0, 0.0]]])
    g = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    units = segability.protoseg_units(f, g)
    assert units.tolist() == [[[0, 0, 1, 1], [0, 0, 1, 1], [1, 0, 0, 1]]]
    _, unit_sa, _ = score_layer(f, g, g, units=True)
    torch.testing.assert_close(unit_sa, torch.tensor([[[1.0, 1.0, 0.5]]]))
    torch.testing.assert_close(segability.sa_score(units[0], g[0].expand(3, 4)), torch.tensor([1.0, 1.0, 0.5]))


def test_hand_sa_score() -> None:
    s = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    r = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 1]])
    # 2*1/3, both empty, empty reference, empty map, 2*2/6
    expected = torch.tensor([2 / 3, 1.0, 0.0, 0.0, 2 / 3])
    torch.testing.assert_close(segability.sa_score(s, r), expected)
    nan = segability.sa_score(s, r, empty="nan")
    assert math.isnan(nan[1]) and torch.allclose(nan[[0, 2, 3, 4]], expected[[0, 2, 3, 4]])
    # Pooled over channels and pixels of each image; bool, (B,) and float64 inputs.
    two = torch.tensor([[[1, 0], [1, 1]]], dtype=torch.bool)
    ref = torch.tensor([[[1, 1], [0, 1]]], dtype=torch.bool)
    torch.testing.assert_close(segability.sa_score(two, ref), torch.tensor([2 * 2 / 6]))
    torch.testing.assert_close(segability.sa_score(torch.tensor([1, 0]), torch.tensor([1, 1])), torch.tensor([1.0, 0.0]))
    assert segability.sa_score(s.double(), r).dtype == torch.float64
    # NaN in a segmentation (an undefined prototype) gives NaN for that image only.
    u = s.float()
    u[2] = math.nan
    out = segability.sa_score(u, r)
    assert math.isnan(out[2]) and torch.allclose(out[[0, 1, 3, 4]], expected[[0, 1, 3, 4]])


# ------------------------------------------------------------------------- dtype and device
FUNCS = {
    "prototypes": lambda f, g: segability.prototypes(f, g),
    "protoseg": lambda f, g: segability.protoseg(f, g),
    "protoseg_units": lambda f, g: segability.protoseg_units(f, g),
    "sa_score": lambda f, g: segability.sa_score(segability.protoseg(f, g).argmax(1).to(f.dtype), g[:, 0]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("fn", list(FUNCS), ids=list(FUNCS))
def test_dtype_preserved_on_cpu(fn: str, dtype: torch.dtype) -> None:
    f = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    g = (torch.rand(2, 1, 8, 10, generator=torch.Generator().manual_seed(1)) > 0.5).to(dtype)
    out = FUNCS[fn](f, g)
    assert out.dtype == dtype and out.device == f.device
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_cuda_device_dtype_and_values(dtype: torch.dtype) -> None:
    f, g, m = make_inputs((5, 4, 3), (9, 8, 7), kind="soft", masked=True, k=1, seed=11, dtype=dtype)
    cpu = [to_t(a, dtype) for a in (f, g, m)]
    gpu = [t.cuda() for t in cpu]
    tol = TOL[dtype] * 10
    for fn in ("prototypes", "protoseg", "protoseg_units"):
        want = getattr(segability, fn)(*cpu)
        got = getattr(segability, fn)(*gpu)
        assert got.is_cuda and got.dtype == dtype
        torch.testing.assert_close(got.cpu(), want, atol=tol, rtol=tol)
    seg = segability.protoseg(*gpu).argmax(1).to(dtype)
    sa = segability.sa_score(seg, (gpu[1][:, 0] > 0.5).to(dtype))
    assert sa.is_cuda and sa.dtype == dtype
    metric = segability.SegmentationAbility(units=True)
    metric.update({"x": gpu[0]}, guide=gpu[1], mask=gpu[2])
    out = metric.scores()["x"].sa[:, 0]
    assert out.is_cuda
    torch.testing.assert_close(out, sa, atol=1e-6, rtol=0)
    # Guide and mask on the CPU are moved to the features' device.
    assert segability.protoseg(gpu[0], cpu[1], cpu[2]).is_cuda


# --------------------------------------------------------------------------------- doctests
@pytest.mark.parametrize("module", [core_resize, core_functional, core_metric, core_reduction], ids=lambda m: m.__name__)
def test_doctests(module) -> None:
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0
    assert result.attempted > 0
