"""segability.batch: sliding-window scores, folder runs (shards, errors, resume, force) and the Ray engine."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import segability
from data_factories import blob, make_nifti_folder, make_png_folder, write_model_file
from segability.analysis.results import ERRORS, read_table
from segability.batch import analyze_files, analyze_windows, safe_name
from segability.errors import UsageError
from segability.io import load_model

PNG_SCALE = {"intensity": {"range": [0, 255]}}  # PNG 0..255 -> 0..1, what the test nets expect


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> Path:
    return write_model_file(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> tuple[Path, Path]:
    return make_png_folder(tmp_path_factory.mktemp("png"), n=4)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, nets, pngs):
    """One uninterrupted local run on the PNG folder (units, two kept maps)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    summary = analyze_files(
        f"{nets}:tiny_net", pngs[0], pngs[1], out=out, preprocess=PNG_SCALE, units=True, keep_maps=2, report=False
    )
    return out, summary


def tables(run: Path) -> dict[str, pd.DataFrame]:
    """The result tables in a canonical row order, without the path columns."""
    res = segability.load_result(run)
    keys = {"layers": ["image", "depth"], "images": ["image"], "units": ["image", "layer", "unit"]}
    out = {}
    for name, frame in (("layers", res.layers), ("images", res.images), ("units", res.units)):
        if frame is not None:
            frame = frame.drop(columns=[c for c in ("file", "label_file") if c in frame.columns])
            out[name] = frame.sort_values(keys[name], kind="stable").reset_index(drop=True)
    return out


def assert_same_tables(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        pd.testing.assert_frame_equal(ta[name], tb[name], check_exact=False, atol=1e-6, rtol=0, obj=name)


# ---------------------------------------------------------------------------------- file names
@pytest.mark.parametrize(
    "image_id", ["../../x.nii.gz", "a/b/c.png", "..", "", "/etc/passwd", "x" * 300, "ñandú é.png", "C:\\temp\\y.png", "-rf"]
)
def test_safe_name_cannot_leave_the_shard_folder(tmp_path, image_id):
    name = safe_name(image_id)
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}-[0-9a-f]{12}", name), name
    assert (tmp_path / f"{name}.layers.parquet").resolve().parent == tmp_path.resolve()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80), st.text(max_size=80))
def test_safe_name_is_safe_and_tells_ids_apart(a, b):
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*-[0-9a-f]{12}", safe_name(a))
    assert (safe_name(a) == safe_name(b)) == (a == b)


def test_local_engine_never_imports_ray():
    """Ray is imported inside the Ray engine's functions only (engines.py), never at module level."""
    package = Path(segability.batch.__file__).parent
    found = {}
    for path in sorted(package.glob("*.py")):
        tree = ast.parse(path.read_text())
        owners = {}
        for func in ast.walk(tree):
            if isinstance(func, ast.FunctionDef):
                for node in ast.walk(func):
                    owners.setdefault(id(node), func.name)
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and (
                any(a.name.split(".")[0] == "ray" for a in n.names) or (getattr(n, "module", "") or "").split(".")[0] == "ray"
            ):
                found.setdefault(path.name, set()).add(owners.get(id(n)))
    assert found == {"engines.py": {"run_ray", "_ray_session", "_no_ray_progress_bars"}}


def test_modules_stay_small():
    package = Path(segability.batch.__file__).parent
    sizes = {p.name: len(p.read_text().splitlines()) for p in package.glob("*.py")}
    assert max(sizes.values()) <= 400, sizes


# ------------------------------------------------------------------------------- sliding windows
def _volume(shape, seed, zero_border=False):
    img, lab = blob(shape, seed=seed)
    if zero_border:
        img[..., :3] = 0.0  # a masked-out strip for mask="nonzero"
    return torch.from_numpy(img)[None], torch.from_numpy(lab)[None].float()


WINDOW_CASES = [
    # id, spatial dims, shape, roi, overlap, guide, mask, inplace
    ("3d", 3, (20, 18, 16), (8, 8, 8), 0.25, "prediction", None, False),
    ("2d-label-mask-inplace", 2, (30, 26), (12, 10), 0.5, "label", "nonzero", True),
]


@pytest.mark.parametrize(("case", "dims", "shape", "roi", "overlap", "guide", "mask", "inplace"), WINDOW_CASES)
def test_windows_equal_whole_volume_for_pointwise_net(nets, case, dims, shape, roi, overlap, guide, mask, inplace):
    net = load_model(f"{nets}:pointwise_net", model_args={"spatial_dims": dims, "inplace": inplace})
    x, y = _volume(shape, seed=5, zero_border=mask is not None)
    kw = dict(units=True, guide=guide, mask=mask)
    win = analyze_windows(net, x, y, roi_size=roi, overlap=overlap, image_id="v", **kw)
    whole = segability.analyze(net, [x], [y], ids=["v"], **kw)
    cols = ["image", "layer", "depth", "channels", "sa", "sa_pred", "reason"]
    pd.testing.assert_frame_equal(win.layers[cols], whole.layers[cols], check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(win.images, whole.images, check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(win.units, whole.units, check_exact=False, atol=1e-6, rtol=0)
    # Not a trivial agreement: the units score differently from each other.
    assert win.units["sa"].nunique() > 3
    assert win.layers.loc[win.layers["layer"] == "1", "shape"].item() == "x".join(map(str, (6, *roi)))


def test_one_window_equals_whole_volume_for_any_net(nets):
    net = load_model(f"{nets}:tiny_net", model_args={"spatial_dims": 3})
    x, y = _volume((14, 12, 10), seed=2)
    win = analyze_windows(net, x, y, roi_size=(0, 12, -1), units=True, image_id="v")  # every axis whole
    whole = segability.analyze(net, [x], [y], ids=["v"], units=True)
    pd.testing.assert_frame_equal(win.layers, whole.layers, check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(win.units, whole.units, check_exact=False, atol=1e-6, rtol=0)


def test_windows_close_to_whole_volume_for_3x3_net(nets):
    """3x3x3 convolutions see across window borders: scores differ, within 0.01 here (measured ~0.002)."""
    net = load_model(f"{nets}:tiny_net", model_args={"spatial_dims": 3})
    x, y = _volume((20, 18, 16), seed=3)
    win = analyze_windows(net, x, y, roi_size=(10, 10, 10), overlap=0.5, image_id="v")
    whole = segability.analyze(net, [x], [y], ids=["v"])
    diff = (win.layers[["sa", "sa_pred"]] - whole.layers[["sa", "sa_pred"]]).abs().to_numpy()
    assert np.nanmax(diff) < 0.01


def test_window_arguments_are_checked(nets):
    net = load_model(f"{nets}:pointwise_net")
    x, _ = _volume((8, 8, 8), seed=0)
    with pytest.raises(ValueError, match="roi_size must give one window size per spatial dim"):
        analyze_windows(net, x, roi_size=(4, 4))
    with pytest.raises(ValueError, match=r"overlap must be a number in \[0, 1\)"):
        analyze_windows(net, x, roi_size=(4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match='guide="label" needs a label'):
        analyze_windows(net, x, roi_size=(4, 4, 4), guide="label")
    down = torch.nn.Sequential(torch.nn.Conv3d(1, 1, 2, stride=2))
    with pytest.raises(ValueError, match="not on the window's grid"):
        analyze_windows(down, x, roi_size=(4, 4, 4))


# ----------------------------------------------------------------------------------- folder runs
def test_local_run_matches_direct_analysis(reference_run, nets, pngs):
    out, summary = reference_run
    images, labels = pngs
    assert (summary.n_images, summary.n_ok, summary.n_failed) == (5, 4, 1)
    assert not hasattr(summary, "exit_code")  # the library does not speak CLI
    assert [Path(p).name for p in summary.unpaired_labels] == ["orphan.png"] and summary.unpaired_images == []
    errors = read_table(out / "errors.csv", ERRORS)
    assert list(errors.columns) == ["file", "stage", "error", "traceback"]
    assert [Path(f).name for f in errors["file"]] == ["broken.png"] and errors["stage"].item() == "read"
    assert "broken.png cannot be read by PILReader" in errors["error"].item()
    assert errors["traceback"].item().startswith("Traceback (most recent call last):")
    assert "broken.png cannot be read by PILReader" in errors["traceback"].item().splitlines()[-1]
    res = segability.load_result(out)
    for frame in (res.layers, res.images, res.units):
        assert "broken.png" not in set(frame["image"])  # the corrupt file is in errors.csv only
    assert list(res.images["image"]) == [f"case{i}.png" for i in range(4)]
    assert list(res.images["label_file"].map(lambda p: Path(p).name)) == [f"case{i}.png" for i in range(4)]

    # The same images read independently (PIL, / 255) and analysed in one call.
    names = [f"case{i}.png" for i in range(4)]
    xs = [torch.from_numpy(np.asarray(Image.open(images / n), dtype=np.float32) / 255.0)[None] for n in names]
    ys = [torch.from_numpy(np.asarray(Image.open(labels / n), dtype=np.float32))[None] for n in names]
    net = load_model(f"{nets}:tiny_net")
    direct = segability.analyze(net, xs, ys, ids=names, units=True, keep_maps=2)
    pd.testing.assert_frame_equal(res.layers, direct.layers, check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(res.images.drop(columns=["file", "label_file"]), direct.images, check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(res.units, direct.units, check_exact=False, atol=1e-6, rtol=0)
    # keep_maps=2 keeps the first two files in input order: broken.png (failed, nothing) and case0.png.
    assert list(res.maps) == ["case0.png"]
    for key in ("image", "label", "prediction"):
        assert np.allclose(res.maps["case0.png"][key], direct.maps["case0.png"][key], atol=1e-6, rtol=0)
    assert np.array_equal(res.maps["case0.png"]["layers"]["3"], direct.maps["case0.png"]["layers"]["3"])
    for key in ("model", "layers", "guide", "output", "target", "units", "spatial_dims", "version", "date", "data"):
        assert key in res.settings
    assert res.settings["layers"] == ["input", "1", "3", "5"] and res.settings["spatial_dims"] == 2
    assert res.settings["unpaired_labels"] == ["orphan.png"] and res.settings["n_failed"] == 1
    shards = sorted(p.name for p in (out / "shards").iterdir())
    assert sum(n.endswith(".images.parquet") for n in shards) == 4 and sum(n.endswith(".error.json") for n in shards) == 1


def test_resume_after_an_interrupted_run_gives_the_same_tables(reference_run, nets, pngs, tmp_path):
    out, _ = reference_run
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    # What a run killed after two images leaves: two images' shards, no merged tables, a stray temp file.
    for name in ("layers.parquet", "images.parquet", "units.parquet", "settings.json", "maps.npz", "errors.csv"):
        (partial / name).unlink()
    for shard in (partial / "shards").iterdir():
        if shard.name.startswith(("case2", "case3", "broken")):
            shard.unlink()
    (partial / "shards" / ".case2.png-0.images.parquet.123.tmp").write_bytes(b"half a file")
    summary = analyze_files(
        f"{nets}:tiny_net", pngs[0], pngs[1], out=partial, preprocess=PNG_SCALE, units=True, keep_maps=2,
        resume=True, report=False,
    )  # fmt: skip
    assert (summary.n_resumed, summary.n_ok, summary.n_failed) == (2, 4, 1)
    assert_same_tables(out, partial)
    assert not list((partial / "shards").glob("*.tmp"))
    assert list(segability.load_result(partial).maps) == ["case0.png"]


def test_existing_results_need_resume_or_force(reference_run, nets, pngs, tmp_path):
    out, _ = reference_run
    run = tmp_path / "again"
    shutil.copytree(out, run)
    kwargs = dict(preprocess=PNG_SCALE, report=False)
    with pytest.raises(FileExistsError, match="resume=True .* or force=True"):
        analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=run, **kwargs)
    with pytest.raises(UsageError, match="resume=True and force=True exclude each other") as info:
        analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=run, resume=True, force=True, **kwargs)
    assert info.value.argument == "resume"
    with pytest.raises(UsageError, match=r"resume: .* other inputs or settings \(units: True -> False\)"):
        analyze_files(f"{nets}:tiny_net", pngs[0], pngs[1], out=run, resume=True, units=False, keep_maps=2, **kwargs)
    (run / "keep.txt").write_text("a file of the user's: never deleted")
    summary = analyze_files(f"{nets}:tiny_net", pngs[0], None, out=run, force=True, **kwargs)
    assert summary.n_ok == 4 and (run / "keep.txt").exists()
    assert not (run / "units.parquet").exists() and not (run / "maps.npz").exists()  # nothing stale
    assert segability.load_result(run).layers["sa"].isna().all()  # no labels this time


def test_model_failure_is_recorded_and_the_run_goes_on(nets, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name, shape in (("small.npy", (1, 24, 24)), ("big.npy", (1, 48, 48)), ("small2.npy", (1, 30, 20))):
        np.save(folder / name, np.random.default_rng(0).random(shape).astype(np.float32))
    summary = analyze_files(f"{nets}:fails_on_big", folder, out=tmp_path / "run", model_args={"limit": 40}, report=False)
    assert (summary.n_ok, summary.n_failed) == (2, 1)
    err = summary.errors.set_index("file").loc[str(folder / "big.npy")]
    assert err["stage"] == "model"
    assert re.fullmatch(r"RuntimeError: input \(1, 1, 48, 48\) is too big for this model", err["error"])
    assert "in forward" in err["traceback"] and err["traceback"].rstrip().endswith("is too big for this model")
    assert sorted(segability.load_result(tmp_path / "run").images["image"]) == ["small.npy", "small2.npy"]


def test_windowed_folder_run_equals_whole_volume_run(nets, tmp_path):
    images, labels = make_nifti_folder(tmp_path / "nifti", n=2, shape=(20, 18, 16))
    common = dict(model_args={"spatial_dims": 3}, units=True, report=False)
    whole = analyze_files(f"{nets}:pointwise_net", images, labels, out=tmp_path / "whole", **common)
    win = analyze_files(f"{nets}:pointwise_net", images, labels, out=tmp_path / "win", roi_size=(8, 8, 8), **common)
    assert whole.n_failed == win.n_failed == 1 and "broken.nii.gz" in win.errors["file"].item()
    assert [Path(p).name for p in win.unpaired_labels] == ["orphan.nii.gz"]
    a, b = tables(tmp_path / "whole"), tables(tmp_path / "win")
    pd.testing.assert_frame_equal(a["layers"].drop(columns="shape"), b["layers"].drop(columns="shape"), check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(a["images"], b["images"], check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(a["units"], b["units"], check_exact=False, atol=1e-6, rtol=0)
    assert segability.load_result(tmp_path / "win").settings["roi_size"] == [8, 8, 8]


def test_bad_arguments_are_usage_errors(nets, pngs, tmp_path):
    cases = [
        (dict(workers=2), "workers", "workers: the local engine"),
        (dict(images=tmp_path / "none"), "images", "images: .* does not exist"),
        (dict(layers=["decoder"]), "layers", "no layer named 'decoder'"),
        (dict(guide="label"), "labels", "labels must be given with guide='label'"),
        (dict(target=-1), "target", "target must be an integer >= 0"),
        (dict(engine="spark"), "engine", 'engine must be "local" or "ray"'),
        (dict(gpus_per_worker=1.0), "gpus_per_worker", "gpus_per_worker needs engine='ray'"),
        (dict(mask="otsu"), "mask", "mask must be"),
        (dict(roi_size=(8, 8), overlap=1.0), "overlap", r"overlap must be a number in \[0, 1\)"),
        (dict(keep_maps=-1), "keep_maps", "keep_maps must be an integer >= 0"),
    ]
    for kwargs, argument, message in cases:
        given = {"images": pngs[0], **kwargs}
        with pytest.raises(UsageError, match=message) as info:
            analyze_files(f"{nets}:tiny_net", given.pop("images"), out=tmp_path / "a", **given)
        assert info.value.argument == argument, (kwargs, info.value)
    assert not (tmp_path / "a").exists()  # nothing written before the arguments are checked


# ------------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_gives_the_local_tables(ray_session, reference_run, nets, pngs, tmp_path):
    out, _ = reference_run
    import ray.data

    bars = ray.data.DataContext.get_current().enable_progress_bars
    summary = analyze_files(
        f"{nets}:tiny_net", pngs[0], pngs[1], out=tmp_path / "ray", preprocess=PNG_SCALE, units=True, keep_maps=2,
        engine="ray", workers=2, report=False,
    )  # fmt: skip
    assert (summary.n_ok, summary.n_failed) == (4, 1)
    assert ray_session.is_initialized()  # a session that was running is left alone
    assert ray_session.data.DataContext.get_current().enable_progress_bars is bars  # the global context as it was
    assert_same_tables(out, tmp_path / "ray")
    ray_errors, local_errors = read_table(tmp_path / "ray" / "errors.csv", ERRORS), read_table(out / "errors.csv", ERRORS)
    pd.testing.assert_frame_equal(ray_errors.drop(columns="traceback"), local_errors.drop(columns="traceback"))
    assert "PILReader" in ray_errors["traceback"].item()  # the worker's traceback crosses the Ray boundary
    assert segability.load_result(tmp_path / "ray").settings["engine"] == "ray"
