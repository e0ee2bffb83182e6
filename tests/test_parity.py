"""One computation, six producers: analyze, sliding windows over the whole image, the accumulator,
the Lightning callback, the MONAI handler and pruning's unit ranking give the same mean layer and
unit SA on one fixture (a seeded MONAI UNet, labelled images, one with an empty prediction)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from segability import analyze
from segability.analysis import analyze_windows
from segability.integrations import SAAccumulator
from segability.prune import prunable_layers, unit_scores

ATOL = 1e-6
EMPTY = "3"  # the image whose prediction is empty (one output channel)


def unet(out_channels: int = 1) -> nn.Module:
    """A seeded UNet whose last bias is lowered so that one image predicts nothing.

    The last convolution's output is the network output (its residual unit adds the identity), so
    lowering its bias lowers every logit of the target channel. One channel: image 3's largest
    logit is 2.49, the others' at least 3.78; lowering by 3 empties image 3 only. Three channels:
    the target's largest margin over the other classes is 1.38 on image 1, at least 1.67 elsewhere;
    lowering by 1.5 empties image 1 only.
    """
    torch.manual_seed(0)
    net = UNet(2, 1, out_channels, channels=(4, 8), strides=(2,), num_res_units=1).eval()
    last = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
    with torch.no_grad():
        if out_channels == 1:
            last.bias -= 3.0
        else:
            last.bias[2] -= 1.5
    return net


def data(n: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares on noise and their masks; image 3 is noise alone (its label is not)."""
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        y[i, 0, r : r + 6, c : c + 6] = 1
    x = y + 0.3 * torch.randn(n, 1, size, size, generator=g)
    x[3] = -torch.randn(1, size, size, generator=torch.Generator().manual_seed(1))
    return x, y


def means(layers: pd.DataFrame, units: pd.DataFrame | None) -> dict[str, pd.DataFrame]:
    """Means over images of per-image rows (NaN, an undefined score, left out): per layer, per
    layer over units, and per unit."""
    out = {"layers": layers.groupby("layer")[["sa", "sa_pred"]].mean()}
    if units is not None:
        per_layer = units.groupby("layer")[["sa", "sa_pred"]].mean()
        out["unit_layers"] = per_layer.rename(columns={"sa": "unit_sa", "sa_pred": "unit_sa_pred"})
        out["units"] = units.groupby(["layer", "unit"])[["sa", "sa_pred"]].mean()
    return out


def from_table(table: pd.DataFrame, strip: str = "") -> dict[str, pd.DataFrame]:
    """The accumulator's table (and the callbacks' history) in the shape of :func:`means`."""
    table = table.assign(layer=table["layer"].str.removeprefix(strip)).set_index("layer")
    return {"layers": table[["sa", "sa_pred"]], "unit_layers": table[["unit_sa", "unit_sa_pred"]]}


# ----------------------------------------------------------------------------- the producers
def by_analyze(x, y):
    res = analyze(unet(), x, y, units=True, batch_size=3)  # other batches than the reference's
    return means(res.layers, res.units)


def by_windows(x, y):
    runs = [
        analyze_windows(unet(), x[i], y[i], roi_size=tuple(x.shape[2:]), units=True, image_id=str(i))
        for i in range(len(x))
    ]
    return means(pd.concat([r.layers for r in runs]), pd.concat([r.units for r in runs]))


def by_accumulator(x, y):
    acc = SAAccumulator(unet(), units=True)
    acc.update(x[:2], y[:2])
    acc.update(x[2:], y[2:, 0])  # (B, H, W) labels too
    assert acc.images == len(x)
    return from_table(acc.table())


def by_lightning(x, y):
    pl = pytest.importorskip("lightning.pytorch")
    from segability.integrations.lightning import SACallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = unet()

        def forward(self, images):
            return self.net(images)

        def validation_step(self, batch, batch_idx):
            return None

    callback = SACallback(num_batches=None, units=True)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=2)
    trainer.validate(Module(), dataloaders=loader, verbose=False)
    history = callback.history
    assert (history["images"] == len(x)).all() and history["epoch"].nunique() == 1
    return from_table(history, strip="net.")


def by_monai(x, y):
    pytest.importorskip("ignite")
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SimpleInferer

    from segability.integrations.monai import SAHandler

    net = unet()
    items = [{"image": a, "label": b} for a, b in zip(x, y, strict=True)]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=torch.utils.data.DataLoader(items, batch_size=2), network=net,
        inferer=SimpleInferer(),
    )  # fmt: skip
    handler = SAHandler(units=True)
    handler.attach(evaluator)
    evaluator.run()
    assert (handler.history["images"] == len(x)).all()
    return from_table(handler.history)


def by_pruning(x, y):
    # guide="prediction" to compare with analyze's default (pruning's own default is the label).
    scores = unit_scores(unet(), x, y, ranking="sa", guide="prediction", batch_size=3)
    rows = [(layer, unit, float(v)) for layer, s in scores.items() for unit, v in enumerate(s)]
    table = pd.DataFrame(rows, columns=["layer", "unit", "sa"]).set_index(["layer", "unit"])
    return {"units": table}


PRODUCERS: dict[str, Callable] = {
    "analyze": by_analyze,
    "windows": by_windows,
    "accumulator": by_accumulator,
    "lightning": by_lightning,
    "monai": by_monai,
    "pruning": by_pruning,
}


@pytest.fixture(scope="module")
def fixture():
    x, y = data()
    res = analyze(unet(), x, y, units=True)
    return x, y, res


@pytest.mark.parametrize("producer", list(PRODUCERS))
def test_every_producer_gives_the_mean_sa_of_analyze(fixture, producer):
    x, y, res = fixture
    expected = means(res.layers, res.units)
    got = PRODUCERS[producer](x, y)
    assert got, "a producer must give something to compare"
    for key, table in got.items():
        if producer == "pruning":  # the prunable layers only (the output convolutions are never pruned)
            assert list(dict.fromkeys(table.index.get_level_values(0))) == list(prunable_layers(unet(), x))
        else:
            assert sorted(table.index) == sorted(expected[key].index), key
        reference = expected[key].loc[table.index, table.columns]
        assert table.notna().to_numpy().any(), key
        np.testing.assert_allclose(table.to_numpy(float), reference.to_numpy(float), atol=ATOL, rtol=0, err_msg=key)


def test_the_fixture_has_an_empty_prediction_left_out_of_the_means(fixture):
    x, y, res = fixture
    images = res.images.set_index("image")
    assert images.loc[EMPTY, "status"] == "empty_prediction"
    assert (images.drop(index=EMPTY)["status"] == "ok").all()
    rows = res.layers[res.layers["image"] == EMPTY]
    assert rows["sa_pred"].isna().all() and rows["sa"].notna().all()
    assert (rows["status"] == "empty_prediction").all()
    others = res.layers[res.layers["image"] != EMPTY].groupby("layer")["sa_pred"].mean()
    np.testing.assert_allclose(means(res.layers, None)["layers"].loc[others.index, "sa_pred"], others, atol=0)


# ----------------------------------------------------------------------------- windows vs analyze
def window_runs(net: nn.Module, x: torch.Tensor, y: torch.Tensor, **kw):
    runs = [
        analyze_windows(net, x[i], y[i], roi_size=tuple(x.shape[2:]), image_id=str(i), **kw) for i in range(len(x))
    ]
    layers = pd.concat([r.layers for r in runs], ignore_index=True)
    images = pd.concat([r.images for r in runs], ignore_index=True)
    return layers, images


@pytest.mark.parametrize(
    ("out_channels", "kw"),
    [(1, {}), (3, {"output": "softmax", "target": 2})],
    ids=["sigmoid", "softmax-target-2"],
)
def test_one_window_over_the_whole_image_equals_analyze_per_image(out_channels, kw):
    x, y = data()
    if out_channels == 3:  # a label map with classes 0, 1, 2; the target is 2
        y = y * 2 + (torch.arange(16) < 4).float().view(1, 1, 1, 16) * (y == 0)
    res = analyze(unet(out_channels), x, y, **kw)
    layers, images = window_runs(unet(out_channels), x, y, **kw)
    key = ["image", "layer"]
    a = res.layers.sort_values(key).reset_index(drop=True)
    w = layers.sort_values(key).reset_index(drop=True)
    assert a[key].equals(w[key])
    assert a["status"].tolist() == w["status"].tolist()
    # One window is the whole image: the same forward pass, the same counts, the same numbers.
    np.testing.assert_array_equal(w[["sa", "sa_pred"]].to_numpy(float), a[["sa", "sa_pred"]].to_numpy(float))
    # The empty prediction: the same status, no sa_pred, left out of both means.
    image = EMPTY if out_channels == 1 else "1"  # the image that predicts nothing (see unet)
    for table in (res.images, images):
        assert table.set_index("image").loc[image, "status"] == "empty_prediction"
    for table in (a, w):
        assert table.loc[table["image"] == image, "sa_pred"].isna().all()
        assert table.loc[table["image"] != image, "sa_pred"].notna().all()
    expected = a[a["image"] != image].groupby("layer")[["sa_pred"]].mean()
    for table in (a, w):
        np.testing.assert_allclose(table.groupby("layer")[["sa_pred"]].mean(), expected, atol=ATOL, rtol=0)
    assert a["sa"].notna().all()
