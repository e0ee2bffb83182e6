"""Every class at once: one pass, one-vs-rest prototypes per class, equal to per-class runs.

Also the sliding-window path's new parts: padding a volume smaller than the window, a caller's own
output and windows (tiles), kept layer outputs between the steps, and maps of a windowed volume.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import segability
from segability.analysis import analyze_windows
from segability.analysis.readout import class_probabilities
from segability.errors import UsageError

CLASS_COLUMNS = ["class", "class_name"]


class ThreeClassNet(nn.Module):
    """A small 3-class net: conv -> ReLU -> conv(3) logits (2D or 3D)."""

    def __init__(self, dims: int = 2, seed: int = 0, kernel: int = 3):
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.feat = conv(1, 6, kernel, padding=kernel // 2)
        self.act = nn.ReLU()
        self.head = conv(6, 3, 1)

    def forward(self, x):
        return self.head(self.act(self.feat(x)))


def _images(n=4, size=(24, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, *size), generator=g)
    y = torch.randint(0, 3, (n, *size), generator=g)
    x = x + y.unsqueeze(1).float()  # make the classes visible in the intensities
    return x, y


def _drop_class(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=CLASS_COLUMNS).reset_index(drop=True)


def test_class_probabilities_by_hand():
    logits = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1, 1)
    e = np.exp([0.0, 1.0, 2.0])
    prob, pred, k = class_probabilities(logits, "softmax", (2, 1))
    assert k == 3
    np.testing.assert_allclose(prob.flatten().numpy(), [e[2] / e.sum(), e[1] / e.sum()], rtol=1e-6)
    assert pred.flatten().tolist() == [1.0, 0.0]  # argmax is class 2
    prob, pred, _ = class_probabilities(logits, "sigmoid", (0, 2))  # a multi-label reading
    np.testing.assert_allclose(prob.flatten().numpy(), 1 / (1 + np.exp([-0.0, -2.0])), rtol=1e-6)
    assert pred.flatten().tolist() == [0.0, 1.0]  # sigmoid(0) = 0.5 is not > 0.5


@pytest.mark.parametrize("guide", ["prediction", "label"])
def test_every_class_at_once_equals_per_class_runs(guide):
    net = ThreeClassNet()
    x, y = _images()
    multi = segability.analyze(net, x, y, classes="all", class_names={1: "liver", 2: "tumour"}, guide=guide, units=True)
    assert sorted(multi.layers["class"].unique()) == [1, 2]
    assert set(multi.layers["class_name"]) == {"liver", "tumour"}
    assert len(multi.images) == 2 * len(x)
    for c in (1, 2):
        one = segability.analyze(net, x, y, target=c, guide=guide, units=True)
        mine = multi.layers[multi.layers["class"] == c]
        pd.testing.assert_frame_equal(_drop_class(mine), one.layers, check_exact=False, atol=1e-6, rtol=0)
        pd.testing.assert_frame_equal(_drop_class(multi.units[multi.units["class"] == c]), one.units, atol=1e-6, rtol=0)
        images = _drop_class(multi.images[multi.images["class"] == c])
        pd.testing.assert_frame_equal(images, one.images, check_exact=False, atol=1e-6, rtol=0)
    # the image Dice of class 2 by hand
    pred = net(x).argmax(1)
    inter = ((pred == 2) & (y == 2)).flatten(1).sum(1).double()
    dice = 2 * inter / ((pred == 2).flatten(1).sum(1) + (y == 2).flatten(1).sum(1))
    np.testing.assert_allclose(multi.images[multi.images["class"] == 2]["dice"], dice.numpy(), atol=1e-9)


def test_a_binary_run_has_no_class_columns_and_bad_classes_name_the_argument():
    net = ThreeClassNet()
    x, y = _images(n=2)
    res = segability.analyze(net, x, y, target=1)
    assert "class" not in res.layers.columns and "class" not in res.images.columns
    with pytest.raises(UsageError) as err:
        segability.analyze(net, x, y, classes=(1, 5))
    assert err.value.argument == "classes" and "3-channel" in str(err.value)
    with pytest.raises(UsageError, match="not both"):
        segability.analyze(net, x, y, classes=(1,), target=1)
    with pytest.raises(UsageError, match="repeat"):
        segability.analyze(net, x, y, classes=[1, 1])


def test_multi_class_tables_save_and_load(tmp_path):
    net = ThreeClassNet()
    x, y = _images(n=2)
    res = segability.analyze(net, x, y, classes=[1, 2], keep_maps=1)
    res.save(tmp_path / "run")
    back = segability.load_result(tmp_path / "run")
    pd.testing.assert_frame_equal(back.layers, res.layers)
    assert set(res.maps["0"]["classes"]) == {1, 2}
    np.testing.assert_array_equal(res.maps["0"]["prediction"], res.maps["0"]["classes"][1]["prediction"])
    for c in (1, 2):  # every class's maps come back from maps.npz
        mine, read = res.maps["0"]["classes"][c], back.maps["0"]["classes"][c]
        np.testing.assert_array_equal(read["prediction"], mine["prediction"])
        assert read["layers"].keys() == mine["layers"].keys()
        for layer in mine["layers"]:
            np.testing.assert_array_equal(read["layers"][layer], mine["layers"][layer])
    assert not np.array_equal(back.maps["0"]["classes"][1]["prediction"], back.maps["0"]["classes"][2]["prediction"])


def test_windows_every_class_equals_per_class_windows():
    net = ThreeClassNet(dims=3)
    x, y = _images(n=1, size=(14, 12, 10), seed=3)
    kw = dict(roi_size=(8, 8, 8), overlap=0.25, image_id="v", units=True)
    multi = analyze_windows(net, x[0], y[0], classes="all", **kw)
    for c in (1, 2):
        one = analyze_windows(net, x[0], y[0], target=c, **kw)
        pd.testing.assert_frame_equal(_drop_class(multi.layers[multi.layers["class"] == c]), one.layers, atol=1e-6, rtol=0)
        pd.testing.assert_frame_equal(_drop_class(multi.images[multi.images["class"] == c]), one.images, atol=1e-6, rtol=0)


def test_a_window_larger_than_the_volume_pads_and_padding_counts_nowhere():
    """A pointwise net sees no neighbours: padding changes no feature, and padded voxels weigh 0,
    so a window larger than the volume gives the whole-volume scores exactly."""
    net = ThreeClassNet(dims=3, kernel=1)
    x, y = _images(n=1, size=(9, 7, 5), seed=4)
    win = analyze_windows(net, x[0], y[0], roi_size=(16, 8, 8), classes="all", image_id="v")
    assert win.settings["padded"] == [16, 8, 8]
    whole = segability.analyze(net, x, y, classes="all", ids=["v"])
    cols = ["class", "layer", "sa", "sa_pred", "status"]
    pd.testing.assert_frame_equal(win.layers[cols], whole.layers[cols], check_exact=False, atol=1e-6, rtol=0)
    np.testing.assert_allclose(win.images["dice"], whole.images["dice"], atol=1e-9)


def test_given_logits_and_tiles_equal_the_stitched_run():
    net = ThreeClassNet(dims=3)
    x, y = _images(n=1, size=(12, 12, 10), seed=5)
    default = analyze_windows(net, x[0], y[0], roi_size=(8, 8, 8), overlap=0.5, target=2, image_id="v")
    # the same windows, given by hand (MONAI's positions for this size and overlap), and the output
    starts = [(0, 4), (0, 4), (0, 2)]
    tiles = [(slice(a, a + 8), slice(b, b + 8), slice(c, c + 8)) for a in starts[0] for b in starts[1] for c in starts[2]]
    with torch.no_grad():
        out, n = torch.zeros(1, 3, 12, 12, 10), torch.zeros(1, 1, 12, 12, 10)
        for t in tiles:
            out[(slice(None), slice(None), *t)] += net(x[(slice(None), slice(None), *t)])
            n[(slice(None), slice(None), *t)] += 1
    given = analyze_windows(net, x[0], y[0], roi_size=(8, 8, 8), target=2, image_id="v", logits=out / n, tiles=tiles)
    pd.testing.assert_frame_equal(given.layers.drop(columns="shape"), default.layers.drop(columns="shape"), atol=1e-5, rtol=0)
    with pytest.raises(UsageError) as err:
        analyze_windows(net, x[0], y[0], roi_size=(8, 8, 8), logits=out / n, tiles=tiles[:1])
    assert err.value.argument == "tiles"


def test_kept_layer_outputs_change_no_number():
    net = ThreeClassNet(dims=3)
    x, y = _images(n=1, size=(12, 12, 10), seed=6)
    kw = dict(roi_size=(8, 8, 8), image_id="v", units=True, target=1)
    kept = analyze_windows(net, x[0], y[0], memory_budget=2**30, **kw)
    recomputed = analyze_windows(net, x[0], y[0], memory_budget=0, **kw)
    pd.testing.assert_frame_equal(kept.layers, recomputed.layers, check_exact=False, atol=1e-6, rtol=0)
    pd.testing.assert_frame_equal(kept.units, recomputed.units, check_exact=False, atol=1e-6, rtol=0)


def test_windowed_maps_of_one_window_equal_the_whole_volume_maps():
    net = ThreeClassNet(dims=3)
    x, y = _images(n=1, size=(10, 8, 6), seed=7)
    win = analyze_windows(net, x[0], y[0], roi_size=(0, 0, 0), target=1, image_id="v", keep_maps=True)
    whole = segability.analyze(net, x, y, target=1, ids=["v"], keep_maps=1)
    a, b = win.maps["v"], whole.maps["v"]
    np.testing.assert_allclose(a["prediction"], b["prediction"], atol=1e-6)
    np.testing.assert_array_equal(a["label"], b["label"])
    for layer in ("input", "feat", "head"):
        np.testing.assert_array_equal(a["layers"][layer], b["layers"][layer])


NETS = '''
import torch
from torch import nn


def three_class(dims=2):
    torch.manual_seed(0)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(conv(1, 6, 3, padding=1), nn.ReLU(), conv(6, 3, 1))
'''


def test_cli_classes_and_class_names_equal_per_target_runs(tmp_path):
    from typer.testing import CliRunner

    from segability.cli.app import app

    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    x, y = _images(n=3, size=(20, 20), seed=9)
    for i in range(3):
        np.save(tmp_path / "img" / f"case{i}.npy", x[i].numpy())
        np.save(tmp_path / "lab" / f"case{i}.npy", y[i : i + 1].numpy().astype(np.uint8))
    base = ["analyze", "--model", f"{tmp_path / 'nets.py'}:three_class", "--images", str(tmp_path / "img"),
            "--labels", str(tmp_path / "lab"), "--no-report", "--no-progress"]  # fmt: skip
    runner = CliRunner()
    res = runner.invoke(app, [*base, "--out", str(tmp_path / "multi"), "--classes", "1,2", "--class-names", "1=gm,2=wm"])
    assert res.exit_code == 0, res.output
    multi = segability.load_result(tmp_path / "multi")
    assert multi.layers.groupby("class")["class_name"].first().to_dict() == {1: "gm", 2: "wm"}
    for c in (1, 2):
        res = runner.invoke(app, [*base, "--out", str(tmp_path / f"t{c}"), "--target", str(c)])
        assert res.exit_code == 0, res.output
        one = segability.load_result(tmp_path / f"t{c}")
        mine = multi.layers[multi.layers["class"] == c]
        np.testing.assert_allclose(mine["sa"], one.layers["sa"], atol=1e-6)
        np.testing.assert_allclose(mine["sa_pred"], one.layers["sa_pred"], atol=1e-6)
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--class-names", "liver"])
    assert bad.exit_code == 2 and "--class-names" in bad.output
    qc = runner.invoke(app, ["calibrate", *base[1:-2], "--out", str(tmp_path / "cal.json"), "--classes", "all",
                             "--estimator", "profile"])  # fmt: skip
    assert qc.exit_code == 2 and "--target" in qc.output


def test_report_of_a_multi_class_run_has_a_layer_view_per_class(tmp_path):
    import re

    from segability.report import build_report

    net = ThreeClassNet()
    x, y = _images(n=3)
    res = segability.analyze(net, x, y, classes="all", class_names={1: "gm", 2: "wm"}, keep_maps=1)
    res.save(tmp_path / "run")
    page = build_report(tmp_path / "run").read_text()
    titles = re.findall(r"<h2[^>]*>([^<]*)", page)
    assert "SA per layer — class 1 (gm)" in titles and "SA per layer — class 2 (wm)" in titles
    # each class's view holds that class's mean SA of the head layer (3 decimals), not the mixture
    for c in (1, 2):
        section = page[page.index(f'id="sa-layers-class-{c}"') :]
        section = section[: section.index("</section>")]
        mean = res.layers[(res.layers["class"] == c) & (res.layers["layer"] == "head")]["sa"].mean()
        assert f"{mean:.3f}" in section


def test_per_class_gate_equals_the_gate_of_each_target(tmp_path):
    """calibrate/qc --classes: each class's calibration and gate rows equal those of a --target run."""
    from typer.testing import CliRunner

    from segability.cli.app import app
    from segability.estimation.per_class import (
        ClassCalibrations,
        fit_class_calibrations,
        gate_classes,
    )
    from segability.estimation.qc import fit_calibration, gate_result

    net = ThreeClassNet()
    x, y = _images(n=12, seed=11)
    x = x + 0.6 * torch.randn_like(x) * torch.linspace(0, 1, 12).view(-1, 1, 1, 1)  # from clean to noisy
    multi = segability.analyze(net, x, y, classes="all", class_names={1: "gm", 2: "wm"})
    cals = fit_class_calibrations(net, multi, method="linear")
    cals.save(tmp_path / "cal.json")
    back = ClassCalibrations.load(tmp_path / "cal.json")
    gate = gate_classes(multi, back, threshold=0.8)
    assert list(gate.columns[:3]) == ["image", "class", "class_name"] and len(gate) == 2 * len(x)
    for c in (1, 2):
        one = segability.analyze(net, x, y, target=c)
        cal = fit_calibration(net, one, method="linear")
        assert back.classes[c].parameters == pytest.approx(cal.parameters)
        mine = gate[gate["class"] == c].drop(columns=CLASS_COLUMNS).reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, gate_result(one, cal, threshold=0.8), check_exact=False, atol=1e-9)

    # the CLI: calibrate --classes, then qc takes the classes from the calibration
    (tmp_path / "nets.py").write_text(NETS)
    for sub in ("img", "lab"):
        (tmp_path / sub).mkdir()
    for i in range(len(x)):
        np.save(tmp_path / "img" / f"case{i:02d}.npy", x[i].numpy())
        np.save(tmp_path / "lab" / f"case{i:02d}.npy", y[i : i + 1].numpy().astype(np.uint8))
    model = ["--model", f"{tmp_path / 'nets.py'}:three_class", "--images", str(tmp_path / "img"), "--no-progress"]
    runner = CliRunner()
    res = runner.invoke(app, ["calibrate", *model, "--labels", str(tmp_path / "lab"), "--classes", "all",
                              "--method", "linear", "--out", str(tmp_path / "cli.json")])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "class 1 (1)" in res.output and "class 2 (2)" in res.output
    res = runner.invoke(app, ["qc", *model, "--calibration", str(tmp_path / "cli.json"), "--out", str(tmp_path / "qc"), "--no-report"])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "qc" / "qc.csv")
    assert sorted(table["class"].unique()) == [1, 2] and len(table) == 2 * len(x)
    res = runner.invoke(app, ["qc", *model, "--calibration", str(tmp_path / "cli.json"), "--classes", "1",
                              "--out", str(tmp_path / "qc1"), "--no-report"])  # fmt: skip
    assert res.exit_code == 2 and "calibration is for the classes [1, 2]" in res.output
