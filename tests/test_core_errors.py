"""Bad input: undefined prototypes (NaN + warning naming the image, or ValueError when strict) and
malformed tensors (ValueError naming the argument and the shapes)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import segability
from segability import SegmentationAbility, UndefinedPrototypeWarning
from segability.core.reduction import score_layer

FUNCS = ["prototypes", "protoseg", "protoseg_units"]


def batch(spatial=(6, 5), b: int = 3, c: int = 4, fspatial=None):
    gen = torch.Generator().manual_seed(0)
    f = torch.randn(b, c, *(fspatial or spatial), generator=gen)
    g = (torch.rand(b, 1, *spatial, generator=gen) > 0.5).float()
    g.view(b, -1)[:, 0], g.view(b, -1)[:, -1] = 0.0, 1.0
    return f, g


# ---------------------------------------------------------------- undefined prototypes
@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("missing", ["target", "background"])
def test_undefined_prototype_warns_and_gives_nan(fn: str, missing: str) -> None:
    f, g = batch(fspatial=(3, 3))
    g[1] = 0.0 if missing == "target" else 1.0
    with pytest.warns(UndefinedPrototypeWarning, match=r"image index\(es\) \[1\]"):
        out = getattr(segability, fn)(f, g)
    assert torch.isnan(out[1]).all()
    assert torch.isfinite(out[[0, 2]]).all()
    # The other images are exactly what they are on their own.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alone = getattr(segability, fn)(f[[0, 2]], g[[0, 2]])
    torch.testing.assert_close(out[[0, 2]], alone)


@pytest.mark.parametrize("fn", FUNCS)
def test_undefined_inside_mask_only(fn: str) -> None:
    # Image 0 and 2 have target pixels, but none inside their mask; the mask decides.
    f, g = batch()
    mask = torch.ones_like(g)
    mask[0] = 1.0 - g[0]
    mask[2] = 1.0 - g[2]
    with pytest.warns(UndefinedPrototypeWarning, match=r"\[0, 2\]"):
        out = getattr(segability, fn)(f, g, mask)
    assert torch.isnan(out[[0, 2]]).all() and torch.isfinite(out[1]).all()


def test_undefined_multiclass_class() -> None:
    f, _ = batch(b=2)
    g = torch.zeros(2, 3, 6, 5)
    g[:, 0, :2], g[:, 1, 2:4], g[:, 2, 4:] = 1.0, 1.0, 1.0
    g[1, 2] = 0.0  # class 2 absent from image 1
    g[1, 0, 4:] = 1.0
    with pytest.warns(UndefinedPrototypeWarning, match=r"\[1\]"):
        out = segability.protoseg(f, g)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("fn", FUNCS)
def test_strict_raises(fn: str) -> None:
    f, g = batch()
    g[2] = 1.0
    with pytest.raises(ValueError, match=r"\[2\].*strict=True"):
        getattr(segability, fn)(f, g, strict=True)
    f, g = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid batch neither raises nor warns
        getattr(segability, fn)(f, g, strict=True)


def test_undefined_sa_is_nan() -> None:
    f, g = batch()
    g[1] = 0.0
    ref = (torch.rand(3, 1, 6, 5) > 0.5).float()
    with pytest.warns(UndefinedPrototypeWarning):
        units = segability.protoseg_units(f, g)
    sa = segability.sa_score(units, ref.expand_as(units))
    assert math.isnan(sa[1]) and torch.isfinite(sa[[0, 2]]).all()
    layer, unit, undefined = score_layer(f, g, ref, units=True)
    assert undefined.tolist() == [False, True, False]
    assert torch.isnan(layer[1]).all() and torch.isnan(unit[1]).all()
    assert torch.isfinite(layer[[0, 2]]).all() and torch.isfinite(unit[[0, 2]]).all()
    metric = SegmentationAbility(units=True)
    metric.update({"x": f}, guide=g, references=ref)
    out = metric.scores()["x"].sa[:, 0]
    assert math.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


# -------------------------------------------------------------------- malformed inputs
def bad_value(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = value
    return t


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_features(fn: str, value: float) -> None:
    f, g = batch()
    with pytest.raises(ValueError, match=r"features \(3, 4, 6, 5\) contains NaN or Inf"):
        getattr(segability, fn)(bad_value(f, value), g)


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_guide(fn: str, value: float) -> None:
    f, g = batch()
    with pytest.raises(ValueError, match=r"guide \(3, 1, 6, 5\) contains NaN or Inf"):
        getattr(segability, fn)(f, bad_value(g, value))


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_guide_outside_unit_interval(fn: str, value: float) -> None:
    f, g = batch()
    with pytest.raises(ValueError, match=r"guide \(3, 1, 6, 5\) values must lie in \[0, 1\]"):
        getattr(segability, fn)(f, bad_value(g, value))


@pytest.mark.parametrize("fn", FUNCS)
def test_batch_mismatch(fn: str) -> None:
    f, g = batch()
    with pytest.raises(ValueError, match=r"guide and features must have the same batch size.*\(2, 1, 6, 5\).*\(3, 4, 6, 5\)"):
        getattr(segability, fn)(f, g[:2])


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize(
    "shape", [(2, 1, 6, 5), (3, 1, 6, 4), (3, 2, 6, 5), (3, 1, 6, 5, 1)], ids=["batch", "spatial", "channels", "ndim"]
)
def test_mask_shape_mismatch(fn: str, shape: tuple) -> None:
    f, g = batch()
    expected = r"mask must have shape \(3, 1, 6, 5\) \(guide is \(3, 1, 6, 5\)\), got \(" + ", ".join(map(str, shape))
    with pytest.raises(ValueError, match=expected):
        getattr(segability, fn)(f, g, torch.ones(shape))


@pytest.mark.parametrize("value", [math.nan, 2.0, -1.0])
def test_mask_values(value: float) -> None:
    f, g = batch()
    with pytest.raises(ValueError, match=r"mask \(3, 1, 6, 5\) values must be finite and lie in \[0, 1\]"):
        segability.protoseg(f, g, bad_value(torch.ones_like(g), value))


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("shape", [(3, 4), (3, 4, 2, 2, 2, 2), (4,)], ids=["0d", "4d", "1dim"])
def test_features_wrong_number_of_dims(fn: str, shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"features must have shape \(B, C, \*spatial\) with 1, 2 or 3 spatial dims, got shape \("):
        getattr(segability, fn)(torch.zeros(shape), torch.zeros(3, 1, 4))


@pytest.mark.parametrize("fn", FUNCS)
def test_guide_wrong_number_of_dims(fn: str) -> None:
    f, g = batch()
    with pytest.raises(ValueError, match=r"guide must have the same number of dimensions as features: guide \(3, 6, 5\), features \(3, 4, 6, 5\)"):
        getattr(segability, fn)(f, g[:, 0])


@pytest.mark.parametrize("fn", FUNCS)
def test_not_tensors_and_integer_features(fn: str) -> None:
    f, g = batch()
    with pytest.raises(ValueError, match="features must be a torch.Tensor"):
        getattr(segability, fn)(f.numpy(), g)
    with pytest.raises(ValueError, match="guide must be a torch.Tensor"):
        getattr(segability, fn)(f, g.numpy())
    with pytest.raises(ValueError, match="features must be a floating-point tensor"):
        getattr(segability, fn)(f.long(), g)


def test_units_need_one_channel_guide() -> None:
    f, _ = batch()
    with pytest.raises(ValueError, match=r"one-channel guide.*\(3, 2, 6, 5\)"):
        segability.protoseg_units(f, torch.full((3, 2, 6, 5), 0.5))
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        segability.protoseg_units(*batch(), chunk_size=0)


def test_sa_score_errors() -> None:
    s = torch.ones(2, 1, 4)
    with pytest.raises(ValueError, match=r"segmentation and reference must have the same shape, got \(2, 1, 4\) and \(2, 1, 5\)"):
        segability.sa_score(s, torch.ones(2, 1, 5))
    with pytest.raises(ValueError, match="segmentation must be binary"):
        segability.sa_score(s * 0.5, s)
    with pytest.raises(ValueError, match="reference must be binary"):
        segability.sa_score(s, s * 0.5)
    with pytest.raises(ValueError, match="reference contains NaN"):
        segability.sa_score(s, bad_value(s, math.nan))
    with pytest.raises(ValueError, match=r"segmentation \(2, 1, 4\) contains Inf"):
        segability.sa_score(bad_value(s, math.inf), s)
    with pytest.raises(ValueError, match="reference must be a torch.Tensor"):
        segability.sa_score(s, [1, 1])
    with pytest.raises(ValueError, match="segmentation must have a batch dimension"):
        segability.sa_score(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match='empty must be "one" or "nan"'):
        segability.sa_score(s, s, empty="zero")


def test_metric_errors() -> None:
    f, g = batch()
    metric = SegmentationAbility()
    with pytest.raises(ValueError, match=r"features\['conv'\] \(3, 4, 6, 5\) contains NaN"):
        metric.update({"conv": bad_value(f, math.nan)}, guide=g)
    with pytest.raises(ValueError, match=r"references must be \(B, R, \*spatial\) on the guide's grid \(3, 1, 6, 5\), got \(3, 1, 6, 4\)"):
        metric.update(f, guide=g, references=torch.ones(3, 1, 6, 4))
    with pytest.raises(ValueError, match=r"references \(3, 1, 6, 5\) must be binary"):
        metric.update(f, guide=g, references=torch.full_like(g, 0.3))
    with pytest.raises(ValueError, match=r"ids must give one id per image \(3\), got 2"):
        metric.update(f, guide=g, ids=["a", "b"])
    with pytest.raises(ValueError, match=r"prediction must index one of the 1 references, got 1"):
        metric.update(f, guide=g, prediction=1)
    with pytest.raises(ValueError, match=r"mask must have shape \(3, 1, 6, 5\).*got \(1, 1, 6, 5\)"):
        metric.update(f, guide=g, mask=torch.ones(1, 1, 6, 5))
    with pytest.raises(ValueError, match=r"mask \(3, 1, 6, 5\) values must be finite"):
        metric.update(f, guide=g, mask=torch.full_like(g, 3.0))
    with pytest.raises(ValueError, match=r"guide must have 1 channel\(s\), got shape \(3, 2, 6, 5\)"):
        metric.update(f, guide=torch.full((3, 2, 6, 5), 0.5))
    with pytest.raises(ValueError, match=r"guide and features must have the same batch size"):
        metric.update(f[:2], guide=g)
    assert metric.compute() == {"layers": {}, "units": {}}  # nothing was accumulated
