"""Embedded data: MNI152 lesion slices and cubes, image shifts, the on-disk cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from segability.datasets import (
    SHIFTS,
    LesionData,
    apply_shift,
    mni_lesions,
    mni_lesions_3d,
    mni_template,
    shifted_suite,
    slices,
    split_slabs,
    split_slices,
    volumes,
)
from segability.datasets import cache as cache_mod


@pytest.fixture(scope="module")
def train64() -> LesionData:
    return mni_lesions(40, "train", size=64, seed=0, cache_dir=False)


@pytest.fixture(scope="module")
def image2d(train64: LesionData) -> np.ndarray:
    return train64.images[int(np.argmax(train64.meta.lesion_pixels))]


@pytest.fixture(scope="module")
def image3d() -> np.ndarray:
    return mni_lesions_3d(1, size=24, seed=0, cache_dir=False).images[0]


# ------------------------------------------------------------------------------------- template
def test_template_comes_from_the_installed_nilearn_and_is_cached() -> None:
    t1, brain = mni_template()
    assert t1.shape == brain.shape == (197, 233, 189)
    assert mni_template()[0] is t1  # lru_cache: loaded once per process
    # White matter of the 2009a template is ~222 of 255; scaled by 0.8 / 255 -> ~0.70.
    wm = t1[brain > 0.99]
    assert 0.6 < float(np.median(wm)) < 0.75
    assert float(t1.min()) == 0.0 and 0.0 <= float(brain.min()) and float(brain.max()) <= 1.0
    assert not t1.flags.writeable


# ---------------------------------------------------------------------------------------- splits
def test_split_slices_are_disjoint_blocks_of_six_spanning_the_anatomy() -> None:
    parts = {s: set(split_slices(s).tolist()) for s in ("train", "val", "test")}
    assert not parts["train"] & parts["val"] and not parts["train"] & parts["test"]
    assert not parts["val"] & parts["test"]
    eligible = sorted(parts["train"] | parts["val"] | parts["test"])
    assert eligible == list(range(eligible[0], eligible[-1] + 1))  # contiguous range
    first = eligible[0]
    # Hand-assigned blocks: 0-2 train, 3 val, 4 test, 5 train, ...
    assert set(range(first, first + 18)) <= parts["train"]
    assert set(range(first + 18, first + 24)) <= parts["val"]
    assert set(range(first + 24, first + 30)) <= parts["test"]
    assert first + 30 in parts["train"]
    for s in ("val", "test"):  # each split reaches from the lower to the upper brain
        assert min(parts[s]) < first + 35 and max(parts[s]) > eligible[-1] - 35
    assert 0.55 < len(parts["train"]) / len(eligible) < 0.65


def test_generated_splits_never_share_a_source_slice() -> None:
    sets = {s: mni_lesions(30, s, size=32, seed=5, cache_dir=False) for s in ("train", "val", "test")}
    used = {s: set(d.meta["slice"]) for s, d in sets.items()}
    for s, d in sets.items():
        assert used[s] <= set(split_slices(s).tolist())
        assert (d.meta["split"] == s).all()
        assert all(i.startswith(f"{s}-z") for i in d.ids)
    assert not used["train"] & used["val"] and not used["train"] & used["test"] and not used["val"] & used["test"]
    # 30 images cycle through the 24 val slices: every one is used before any repeats.
    assert len(used["val"]) == 24


def test_3d_slabs_are_disjoint_and_cubes_stay_inside_them() -> None:
    slabs = {s: split_slabs(s) for s in ("train", "val", "test")}
    assert [len(slabs[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    voxels = {s: {z for a, b in v for z in range(a, b)} for s, v in slabs.items()}
    assert not voxels["train"] & voxels["val"] and not voxels["val"] & voxels["test"]
    assert not voxels["train"] & voxels["test"]
    for s in ("val", "test"):
        data = mni_lesions_3d(2, s, size=16, seed=1, cache_dir=False)
        (a, b), = slabs[s]
        assert (data.meta.z_min >= a).all() and (data.meta.z_max <= b - 1).all()


# ------------------------------------------------------------------------------------- 2D images
def test_same_seed_same_arrays_and_prefix_stability() -> None:
    a = mni_lesions(6, "val", size=48, seed=3, cache_dir=False)
    b = mni_lesions(6, "val", size=48, seed=3, cache_dir=False)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.ids == b.ids
    pd.testing.assert_frame_equal(a.meta, b.meta)
    head = mni_lesions(3, "val", size=48, seed=3, cache_dir=False)
    np.testing.assert_array_equal(head.images, a.images[:3])
    other = mni_lesions(6, "val", size=48, seed=4, cache_dir=False)
    assert not np.array_equal(other.images, a.images)


def test_shapes_dtypes_ranges_and_meta(train64: LesionData) -> None:
    d = train64
    assert d.images.shape == d.labels.shape == d.brain.shape == (40, 1, 64, 64)
    assert d.images.dtype == np.float32 and d.labels.dtype == np.uint8 and d.brain.dtype == np.uint8
    assert float(d.images.min()) >= 0.0 and float(d.images.max()) <= 1.0
    assert (d.images[:, :, 0, 0] == 0).all() and (d.images[:, :, -1, -1] == 0).all()  # background
    assert list(d.meta["id"]) == d.ids and len(set(d.ids)) == 40
    expected = {"id", "split", "slice", "n_lesions", "lesion_pixels", "polarity", "contrast", "halo"}
    assert expected <= set(d.meta.columns)
    np.testing.assert_array_equal(d.meta.lesion_pixels, d.labels.reshape(40, -1).sum(1))
    for k in range(40):  # n_lesions counts connected cores (8-connected)
        assert d.meta.n_lesions[k] == ndimage.label(d.labels[k, 0], structure=np.ones((3, 3)))[1]
    # Eligible slices hold >= 30% of the largest brain section, which fills ~54% of the window.
    brain_fraction = d.brain.reshape(40, -1).mean(1)
    assert (brain_fraction > 0.08).all() and (brain_fraction < 0.7).all()
    # White matter stays the brightest tissue: the brain's upper decile is ~0.7 (0.6..0.8 after gain).
    upper = [np.percentile(d.images[k, 0][d.brain[k, 0] > 0], 90) for k in range(40)]
    assert 0.5 < float(np.median(upper)) < 0.85


def test_lesions_lie_inside_the_brain_mask(train64: LesionData) -> None:
    assert (train64.labels <= train64.brain).all()
    d3 = mni_lesions_3d(3, size=20, seed=2, cache_dir=False)
    assert (d3.labels <= d3.brain).all()


def test_some_images_have_no_lesion_and_the_rest_one_to_three() -> None:
    d = mni_lesions(120, "train", size=32, seed=7, cache_dir=False)
    empty = d.meta.n_lesions == 0
    assert 0.05 < empty.mean() < 0.3  # drawn with p = 0.15
    assert ((d.meta.lesion_pixels == 0) == empty).all()
    assert ((d.meta.polarity == 0) == empty).all()
    assert set(d.meta.polarity[~empty]) == {-1, 1}
    assert d.meta.n_lesions.max() <= 3 and (d.meta.n_lesions[~empty] >= 1).all()


@pytest.mark.parametrize("index", range(12))
def test_label_is_exactly_where_the_lesion_changed_the_image(index: int) -> None:
    size, seed = 64, 11
    source = int(split_slices("train")[index % 5])
    full = slices._sample_2d("train", "axial", size, seed, index, source)
    clean = slices._sample_2d("train", "axial", size, seed, index, source, lesions=False)
    np.testing.assert_array_equal(full["brain"], clean["brain"])
    diff = full["image"] - clean["image"]
    label = full["label"]
    polarity = full["meta"]["polarity"]
    if not label.any():
        assert polarity == 0
        np.testing.assert_array_equal(diff, 0.0)  # same noise, same appearance: identical
        return
    assert np.sign(diff[label].mean()) == polarity
    # The core changes more than the surrounding brain (soft border and halo are fainter).
    ring = ndimage.binary_dilation(label, iterations=3) & ~label & full["brain"]
    if ring.any():
        assert np.abs(diff[label]).mean() > 1.5 * np.abs(diff[ring]).mean()
    # Far from every core only the Gaussian tails of a halo remain (contrast is >= 0.14).
    far = ~ndimage.binary_dilation(label, iterations=30)
    assert np.abs(diff[far]).max(initial=0.0) < 1e-3


def test_other_axes_and_argument_errors() -> None:
    cor = mni_lesions(2, "test", size=32, axis="coronal", cache_dir=False)
    assert cor.ids[0].startswith("test-y") and set(cor.meta.slice) <= set(split_slices("test", "coronal"))
    sag = mni_lesions(2, size=32, axis="sagittal", cache_dir=False)
    assert sag.ids[0].startswith("train-x") and sag.images.shape == (2, 1, 32, 32)
    with pytest.raises(ValueError, match="split must be one of"):
        mni_lesions(2, "training", cache_dir=False)
    with pytest.raises(ValueError, match="axis must be one of"):
        mni_lesions(2, axis="transverse", cache_dir=False)
    with pytest.raises(ValueError, match="n must be >= 1"):
        mni_lesions(0, cache_dir=False)
    with pytest.raises(ValueError, match="size must be in"):
        mni_lesions(1, size=8, cache_dir=False)
    with pytest.raises(ValueError, match="n must be an integer"):
        mni_lesions_3d(1.5, cache_dir=False)  # type: ignore[arg-type]


# -------------------------------------------------------------------------------------- 3D cubes
def test_3d_shapes_determinism_and_lesions() -> None:
    a = mni_lesions_3d(4, "train", size=24, seed=0, cache_dir=False)
    b = mni_lesions_3d(4, "train", size=24, seed=0, cache_dir=False)
    assert a.images.shape == a.labels.shape == a.brain.shape == (4, 1, 24, 24, 24)
    assert a.spatial_dims == 3
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    lesion = a.meta.lesion_pixels > 0
    assert lesion.any()
    for k in np.flatnonzero(lesion):
        img, lab = a.images[k, 0], a.labels[k, 0].astype(bool)
        clean = volumes._sample_3d("train", 24, 0, int(k), lesions=False)["image"]
        assert np.sign((img - clean)[lab].mean()) == a.meta.polarity[k]
        assert a.meta.n_lesions[k] == ndimage.label(lab, structure=np.ones((3, 3, 3)))[1]


# ----------------------------------------------------------------------------------- LesionData
def test_lesion_data_subset_concat_tensors(train64: LesionData) -> None:
    part = train64.subset([3, 1])
    assert part.ids == [train64.ids[3], train64.ids[1]]
    np.testing.assert_array_equal(part.images[0], train64.images[3])
    assert list(part.meta.id) == part.ids
    mask = np.zeros(len(train64), bool)
    mask[[0, 5]] = True
    assert train64.subset(mask).ids == [train64.ids[0], train64.ids[5]]
    assert train64.subset(slice(0, 2)).ids == train64.ids[:2]
    joined = LesionData.concat([part, train64.subset([7])])
    assert len(joined) == 3 and joined.ids[2] == train64.ids[7] and list(joined.meta.id) == joined.ids
    x, y = part.as_tensors()
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert torch.equal(y, torch.from_numpy(part.labels.astype(np.float32)))
    with pytest.raises(ValueError, match="ids must be unique"):
        LesionData.concat([part, part])
    with pytest.raises(ValueError, match="one image shape"):
        LesionData.concat([part, mni_lesions(1, size=32, cache_dir=False)])
    with pytest.raises(ValueError, match="labels has shape"):
        LesionData(part.images, part.labels[:1], part.brain, part.ids, part.meta)
    with pytest.raises(ValueError, match="indices must lie"):
        part.subset([2])


# ------------------------------------------------------------------------------------------ cache
def test_cache_round_trip_and_reuse(tmp_path, monkeypatch) -> None:
    first = mni_lesions(4, "val", size=32, seed=2, cache_dir=tmp_path)
    files = sorted(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("mni_lesions-")
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file and renamed

    def fail(*args, **kwargs):
        raise AssertionError("a cached set must not be generated again")

    monkeypatch.setattr(slices, "_sample_2d", fail)
    second = mni_lesions(4, "val", size=32, seed=2, cache_dir=tmp_path)
    for name in ("images", "labels", "brain"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
        assert getattr(first, name).dtype == getattr(second, name).dtype
    assert second.ids == first.ids
    pd.testing.assert_frame_equal(second.meta, first.meta)
    with pytest.raises(AssertionError, match="generated again"):  # another seed is a miss
        mni_lesions(4, "val", size=32, seed=3, cache_dir=tmp_path)


def test_cache_key_covers_every_parameter_and_env_folder(tmp_path, monkeypatch) -> None:
    base = {"n": 4, "split": "val", "size": 32, "seed": 2, "axis": "axial"}
    names = {cache_mod.cache_path(tmp_path, "mni_lesions", **base).name}
    for key, value in [("n", 5), ("split", "test"), ("size", 48), ("seed", 3), ("axis", "coronal")]:
        names.add(cache_mod.cache_path(tmp_path, "mni_lesions", **{**base, key: value}).name)
    names.add(cache_mod.cache_path(tmp_path, "mni_lesions_3d", **base).name)
    assert len(names) == 7
    monkeypatch.setattr(cache_mod, "FORMAT_VERSION", cache_mod.FORMAT_VERSION + 1)
    assert cache_mod.cache_path(tmp_path, "mni_lesions", **base).name not in names

    monkeypatch.setenv("SEGABILITY_CACHE", str(tmp_path / "env"))
    data = mni_lesions_3d(1, size=8, seed=0)
    stored = list((tmp_path / "env").glob("mni_lesions_3d-*.npz"))
    assert len(stored) == 1
    np.testing.assert_array_equal(LesionData.load(stored[0]).images, data.images)
    stored[0].write_bytes(b"not a zip")  # a damaged file is a miss and is rewritten
    again = mni_lesions_3d(1, size=8, seed=0)
    np.testing.assert_array_equal(again.images, data.images)
    np.testing.assert_array_equal(LesionData.load(stored[0]).labels, data.labels)


# ----------------------------------------------------------------------------------------- shifts
def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b) ** 2).mean())


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", SHIFTS)
def test_shift_identity_at_zero_and_monotone_distortion(name, dims, image2d, image3d) -> None:
    image = image2d if dims == 2 else image3d
    clean = apply_shift(image, name, 0.0, seed=4)
    np.testing.assert_array_equal(clean, image)
    assert clean is not image and clean.dtype == np.float32
    errors = []
    for severity in (0.25, 0.5, 0.75, 1.0):
        shifted = apply_shift(image, name, severity, seed=4)
        assert shifted.shape == image.shape and shifted.dtype == np.float32
        assert np.isfinite(shifted).all()
        errors.append(_mse(shifted, image))
    assert all(b > a for a, b in zip(errors, errors[1:], strict=False)), errors
    # Severity 1 is a strong change: RMS error above 5% of the brain's typical intensity.
    assert errors[-1] ** 0.5 > 0.035, errors
    np.testing.assert_array_equal(apply_shift(image, name, 0.6, seed=4), apply_shift(image, name, 0.6, seed=4))


def test_shift_values_against_hand_computations(image2d) -> None:
    x = image2d
    # Additive noise: the same pattern at every severity, std 0.2 * severity.
    n1 = apply_shift(x, "gaussian_noise", 1.0, seed=9) - x
    n_half = apply_shift(x, "gaussian_noise", 0.5, seed=9) - x
    np.testing.assert_allclose(n_half, 0.5 * n1, atol=1e-6)
    assert abs(float(n1.std()) - 0.2) < 0.01 and abs(float(n1.mean())) < 0.01
    # Rician: sqrt((x + a)^2 + b^2) >= 0, and at x = 0 its mean is sigma * sqrt(pi / 2).
    zero = np.zeros((1, 128, 128), np.float32)
    r = apply_shift(zero, "rician_noise", 0.5, seed=1)
    assert (r >= 0).all() and abs(float(r.mean()) - 0.075 * np.sqrt(np.pi / 2)) < 0.004
    # Contrast: mean + (x - mean) * (1 - 0.85 s), by hand on a tiny image.
    tiny = np.array([[[0.0, 1.0], [0.5, 0.5]]], np.float32)
    np.testing.assert_allclose(apply_shift(tiny, "contrast", 1.0), [[[0.425, 0.575], [0.5, 0.5]]], atol=1e-6)
    # Gamma: on an image spanning [0, 1], gamma 1 + 2 s.
    ramp = np.linspace(0, 1, 16, dtype=np.float32).reshape(1, 4, 4)
    np.testing.assert_allclose(apply_shift(ramp, "gamma", 0.5), ramp**2.0, atol=1e-5)
    # Bias field: a multiplicative exp(field) whose log scales linearly with the severity.
    positive = x + 0.1
    log1 = np.log(apply_shift(positive, "bias_field", 1.0, seed=2) / positive)
    log_half = np.log(apply_shift(positive, "bias_field", 0.5, seed=2) / positive)
    np.testing.assert_allclose(log_half, 0.5 * log1, atol=1e-4)
    assert float(log1.max() - log1.min()) > 0.5
    # Ghosting keeps a constant image (only the restored k-space centre is non-zero).
    flat = np.full((1, 32, 32), 0.4, np.float32)
    np.testing.assert_allclose(apply_shift(flat, "ghosting", 1.0, seed=3), flat, atol=1e-5)
    np.testing.assert_allclose(apply_shift(flat, "downsample", 1.0), flat, atol=1e-6)
    # Blur keeps the total intensity of an object away from the border.
    box = np.zeros((1, 64, 64), np.float32)
    box[:, 24:40, 24:40] = 1.0
    assert abs(float(apply_shift(box, "blur", 1.0).sum()) - 256.0) < 0.5


def test_ghosting_puts_a_copy_of_the_object_half_a_field_away() -> None:
    img = np.zeros((1, 64, 64), np.float32)
    img[:, 4:12, 28:36] = 1.0
    for seed in range(20):  # find a seed with period 2 along rows: the ghost is 32 rows down
        out = apply_shift(img, "ghosting", 1.0, seed=seed)
        if out[0, 36:44, 28:36].mean() > 0.3:
            assert out[0, 4:12, 28:36].mean() > 0.3  # the object is still there
            assert out[0, 36:44, 0:20].mean() < 0.05  # the ghost has the object's shape
            return
    pytest.fail("no seed gave a half-field ghost along rows")


def test_shift_errors() -> None:
    img = np.zeros((1, 8, 8), np.float32)
    with pytest.raises(ValueError, match="gaussian_noise, rician_noise, blur"):
        apply_shift(img, "jpeg", 0.5)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"severity must be in \[0, 1\]"):
            apply_shift(img, "blur", bad)
    with pytest.raises(ValueError, match="image must be"):
        apply_shift(np.zeros((8, 8)), "blur", 0.5)
    with pytest.raises(ValueError, match="shift name must be one of"):
        shifted_suite(mni_lesions(1, size=16, cache_dir=False), ["blur", "nope"])


def test_shifted_suite_layout() -> None:
    data = mni_lesions(2, "test", size=32, seed=1, cache_dir=False)
    suite = shifted_suite(data, shifts=("blur", "gaussian_noise"), severities=(0.0, 0.5, 1.0), seed=0)
    assert len(suite) == 12
    assert suite.ids[:3] == [f"{data.ids[0]}|blur@0.00", f"{data.ids[0]}|blur@0.50", f"{data.ids[0]}|blur@1.00"]
    assert suite.ids[3] == f"{data.ids[0]}|gaussian_noise@0.00"
    assert list(suite.meta["shift"][:6]) == ["blur"] * 3 + ["gaussian_noise"] * 3
    assert list(suite.meta.severity[:3]) == [0.0, 0.5, 1.0]
    assert list(suite.meta.source_id) == [data.ids[0]] * 6 + [data.ids[1]] * 6
    assert (suite.meta.lesion_pixels.to_numpy() == np.repeat(data.meta.lesion_pixels.to_numpy(), 6)).all()
    np.testing.assert_array_equal(suite.labels, np.repeat(data.labels, 6, axis=0))
    np.testing.assert_array_equal(suite.images[0], data.images[0])  # severity 0
    np.testing.assert_array_equal(suite.images[6 + 3], data.images[1])
    assert not np.array_equal(suite.images[2], data.images[0])
    full = shifted_suite(data.subset([0]))
    assert len(full) == len(SHIFTS) * 5 and set(full.meta["shift"]) == set(SHIFTS)
