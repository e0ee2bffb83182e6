"""SA during training: the accumulator, the Lightning callback and the MONAI handler give the values
of ``segability.analyze`` on the same batches and weights, and leave no hook behind."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from segability import analyze
from segability.integrations import SAAccumulator, split_batch


def blobs(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bright squares on noise, and their masks."""
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(n, 1, size, size)
    for i in range(n):
        r, c = torch.randint(0, size - 6, (2,), generator=g).tolist()
        y[i, 0, r : r + 6, c : c + 6] = 1
    x = y + 0.3 * torch.randn(n, 1, size, size, generator=g)
    return x, y


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return UNet(2, 1, 1, channels=(4, 8), strides=(2,), num_res_units=1)


def hooks(net: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in net.modules())


def analyze_means(net: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, **kw) -> pd.DataFrame:
    res = analyze(net, x, y, batch_size=4, **kw)
    return res.layers.groupby("layer", sort=False)[["sa", "sa_pred"]].mean()


# ----------------------------------------------------------------------------- accumulator
def test_split_batch_reads_pairs_dicts_and_tensors():
    x, y = torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4)
    assert split_batch((x, y))[1] is y
    assert split_batch([x, y, "extra"])[0] is x
    assert split_batch({"image": x})[1] is None
    assert split_batch(x) == (x, None)
    with pytest.raises(ValueError, match="'image'"):
        split_batch({"img": x})
    with pytest.raises(ValueError, match="batch_to_xy"):
        split_batch("nope")


@pytest.mark.parametrize("guide", ["prediction", "label"])
def test_accumulator_matches_analyze_layers_and_units(guide):
    net = tiny_unet().eval()
    x, y = blobs(8)
    acc = SAAccumulator(net, units=True, guide=guide)
    acc.update(x[:4], y[:4])
    acc.update(x[4:], y[4:, 0])  # (B, H, W) labels too
    table = acc.table().set_index("layer")
    res = analyze(net, x, y, units=True, guide=guide, batch_size=4)
    expected = res.layers.groupby("layer")[["sa", "sa_pred"]].mean()
    units = res.units.groupby("layer")[["sa", "sa_pred"]].mean()
    assert list(table.index) == list(res.layers.drop_duplicates("layer").sort_values("depth")["layer"])
    np.testing.assert_allclose(table.loc[expected.index, "sa"], expected["sa"], atol=1e-6)
    np.testing.assert_allclose(table.loc[expected.index, "sa_pred"], expected["sa_pred"], atol=1e-6)
    np.testing.assert_allclose(table.loc[units.index, "unit_sa"], units["sa"], atol=1e-6)
    assert (table["images"] == 8).all()
    assert hooks(net) == 0  # without open(), hooks live only during update


def test_images_with_an_empty_prediction_have_no_sa_pred_as_in_analyze():
    net = nn.Sequential(nn.Conv2d(1, 2, 1), nn.Conv2d(2, 1, 1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
        net[0].bias.zero_()
        net[1].weight.copy_(torch.tensor([1.0, 0.0]).view(1, 2, 1, 1))
        net[1].bias.fill_(-0.5)
    x, y = blobs(4, seed=7)
    x[1:3] = -1.0  # output < 0 everywhere: empty predictions for images 1 and 2
    acc = SAAccumulator(net)
    acc.update(x, y)
    table = acc.table().set_index("layer")
    res = analyze(net, x, y)
    assert res.layers.loc[res.layers["image"].isin(["1", "2"]), "sa_pred"].isna().all()
    expected = res.layers.groupby("layer")[["sa", "sa_pred"]].mean()
    np.testing.assert_allclose(table.loc[expected.index, "sa_pred"], expected["sa_pred"], atol=1e-6)
    np.testing.assert_allclose(table.loc[expected.index, "sa"], expected["sa"], atol=1e-6)


def test_summed_states_of_two_processes_give_the_pooled_means():
    """What the callbacks do under DDP: each process accumulates its share, the states are summed."""
    net = tiny_unet(1).eval()
    x, y = blobs(8, seed=3)
    a, b = SAAccumulator(net), SAAccumulator(net)
    a.update(x[:2], y[:2])
    b.update(x[2:], y[2:])
    pooled = SAAccumulator(net)
    pooled.load_state_tensor(a.state_tensor() + b.state_tensor())
    table = pooled.table().set_index("layer")
    expected = analyze_means(net, x, y)
    np.testing.assert_allclose(table.loc[expected.index, "sa"], expected["sa"], atol=1e-6)
    np.testing.assert_allclose(table.loc[expected.index, "sa_pred"], expected["sa_pred"], atol=1e-6)
    assert (table["images"] == 8).all()
    with pytest.raises(ValueError, match="state"):
        pooled.load_state_tensor(torch.zeros(3))


def test_accumulator_without_labels_and_open_hooks_record_only_in_update():
    net = tiny_unet().eval()
    x, _ = blobs(4)
    with SAAccumulator(net, layers="model.0.conv.unit0.conv") as acc:
        assert hooks(net) == 1
        net(x)  # the caller's own forward pass is not recorded
        assert acc._recorder.outputs == {}
        acc.update(x)
    assert hooks(net) == 0
    table = acc.table()
    assert table["sa"].isna().all() and table["sa_pred"].notna().all()
    assert list(table["layer"]) == ["input", "model.0.conv.unit0.conv"]
    with pytest.raises(ValueError, match="guide"):
        SAAccumulator(net, guide="labels")
    with pytest.raises(ValueError, match="Close matches"):
        SAAccumulator(net, layers="model.0.cnv")


def test_labelled_and_unlabelled_batches_mix_as_in_analyze():
    """sa from the labelled images only, sa_pred from all: the state keeps both apart."""
    net = tiny_unet(3).eval()
    x, y = blobs(6, seed=5)
    acc = SAAccumulator(net, units=True)
    acc.update(x[:2], y[:2])
    acc.update(x[2:])
    table = acc.table().set_index("layer")
    labelled = analyze_means(net, x[:2], y[:2])
    everything = analyze_means(net, x)
    np.testing.assert_allclose(table.loc[labelled.index, "sa"], labelled["sa"], atol=1e-6)
    np.testing.assert_allclose(table.loc[everything.index, "sa_pred"], everything["sa_pred"], atol=1e-6)
    assert (table["images"] == 6).all()


def test_outputs_changed_in_place_go_through_a_second_pass_in_the_accumulators_hooks():
    """ReLU(inplace=True) changes the convolution's output after its hook: the engine scores that
    layer again in a second forward pass, through the accumulator's own hooks and forward."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 1, 1)).eval()
    x, y = blobs(4, seed=6)
    calls = []

    def forward(images):
        calls.append(len(images))
        return net(images)

    with SAAccumulator(net, units=True) as acc:
        acc.update(x, y, forward=forward)
        assert hooks(net) == 2
    assert calls == [4, 4] and hooks(net) == 0
    table = acc.table().set_index("layer")
    expected = analyze_means(net, x, y)
    np.testing.assert_allclose(table.loc[expected.index, "sa"], expected["sa"], atol=1e-6)
    np.testing.assert_allclose(table.loc[expected.index, "sa_pred"], expected["sa_pred"], atol=1e-6)


def test_a_failing_forward_raises_and_leaves_no_hook_or_score():
    net = tiny_unet().eval()
    x, y = blobs(2)
    acc = SAAccumulator(net)

    def broken(images):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        acc.update(x, y, forward=broken)
    assert hooks(net) == 0 and acc.images == 0
    acc.update(x, y)  # and it goes on
    assert acc.images == 2
    with pytest.raises(ValueError, match="mask"):
        SAAccumulator(net, mask=torch.ones(2, 1, 16, 16))


# ----------------------------------------------------------------------------- Lightning
pl = pytest.importorskip("lightning.pytorch")


class SegModule(pl.LightningModule):
    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = tiny_unet()
        self.fail_at = fail_at

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and batch_idx == self.fail_at:
            raise RuntimeError("boom")
        return nn.functional.binary_cross_entropy_with_logits(self(batch["img"]), batch["seg"])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.binary_cross_entropy_with_logits(self(batch["img"]), batch["seg"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.02)


def loader(x, y, shuffle=False):
    items = [{"img": a, "seg": b} for a, b in zip(x, y, strict=True)]
    return torch.utils.data.DataLoader(items, batch_size=4, shuffle=shuffle)


class HookProbe(pl.Callback):
    def __init__(self):
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.counts.append(hooks(pl_module))


def trainer(tmp_path, callbacks, **kw):
    from lightning.pytorch.loggers import CSVLogger

    settings = dict(
        max_epochs=2, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2, log_every_n_steps=1,
    )
    return pl.Trainer(callbacks=callbacks, **{**settings, **kw})


def test_lightning_callback_logs_what_analyze_gives(tmp_path):
    from segability.integrations.lightning import SACallback

    torch.manual_seed(0)
    tx, ty = blobs(16, seed=1)
    vx, vy = blobs(12, seed=2)
    sa = SACallback(num_batches=2, units=True, batch_to_xy=lambda b: (b["img"], b["seg"]))
    probe = HookProbe()
    module = SegModule()
    trainer(tmp_path, [sa, probe]).fit(module, loader(tx, ty, shuffle=True), loader(vx, vy))

    n_layers = 1 + sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in module.modules())
    assert probe.counts and set(probe.counts) == {n_layers - 1}  # registered during fit
    assert hooks(module) == 0  # removed in teardown
    hist = sa.history
    # Two epochs, no sanity-check run, 2 batches of 4 images each time.
    assert hist["epoch"].tolist() == [0] * n_layers + [1] * n_layers
    assert (hist["images"] == 8).all()

    # The last validation used the final weights: analyze on the same 8 images must agree.
    last = hist[hist["epoch"] == 1].set_index("layer")
    res = analyze(module, vx[:8], vy[:8], batch_size=4, units=True)
    expected = res.layers.groupby("layer")[["sa", "sa_pred"]].mean()
    np.testing.assert_allclose(last.loc[expected.index, "sa"], expected["sa"], atol=1e-6)
    np.testing.assert_allclose(last.loc[expected.index, "sa_pred"], expected["sa_pred"], atol=1e-6)
    units = res.units.groupby("layer")["sa"].mean()
    np.testing.assert_allclose(last.loc[units.index, "unit_sa"], units, atol=1e-6)
    assert hist.groupby("epoch")["sa"].apply(lambda s: s.notna().all()).all()

    logged = pd.read_csv(next(tmp_path.rglob("metrics.csv")))
    layer = "net.model.0.conv.unit0.conv"
    rows = logged.dropna(subset=[f"sa/{layer}"])
    assert rows["epoch"].tolist() == [0, 1]
    np.testing.assert_allclose(rows[f"sa/{layer}"].iloc[-1], last.loc[layer, "sa"], atol=1e-6)
    np.testing.assert_allclose(rows[f"sa/pred/{layer}"].iloc[-1], last.loc[layer, "sa_pred"], atol=1e-6)
    np.testing.assert_allclose(rows[f"sa/unit/{layer}"].iloc[-1], last.loc[layer, "unit_sa"], atol=1e-6)
    hidden = last.drop(index="input")
    np.testing.assert_allclose(rows["sa/pred/mean"].iloc[-1], hidden["sa_pred"].mean(), atol=1e-6)


def test_lightning_callback_removes_its_hooks_when_fit_raises(tmp_path):
    from segability.integrations.lightning import SACallback

    tx, ty = blobs(8, seed=1)
    module = SegModule(fail_at=1)
    sa = SACallback(batch_to_xy=lambda b: (b["img"], b["seg"]))
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path, [sa], num_sanity_val_steps=0).fit(module, loader(tx, ty))
    assert hooks(module) == 0
    assert sa.history.empty


def test_lightning_callback_rejects_bad_arguments():
    from segability.integrations.lightning import SACallback

    with pytest.raises(ValueError, match="num_batches"):
        SACallback(num_batches=0)
    with pytest.raises(ValueError, match="guide"):
        SACallback(guide="truth")
    with pytest.raises(ValueError, match="batch_to_xy"):
        SACallback(batch_to_xy="image")


# ----------------------------------------------------------------------------- MONAI
def test_monai_handler_on_a_supervised_evaluator():
    pytest.importorskip("ignite")
    from monai.engines import SupervisedEvaluator
    from monai.inferers import SimpleInferer
    from monai.transforms import Activationsd, AsDiscreted, Compose

    from segability.integrations.monai import SAHandler

    net = tiny_unet(2)
    x, y = blobs(12, seed=4)
    data = torch.utils.data.DataLoader([{"image": a, "label": b} for a, b in zip(x, y, strict=True)], batch_size=4)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=net,
        inferer=SimpleInferer(),
        # thresholded predictions: the handler's guide is the network's own output, not these
        postprocessing=Compose([Activationsd(keys="pred", sigmoid=True), AsDiscreted(keys="pred", threshold=0.5)]),
    )
    handler = SAHandler(num_batches=2)
    handler.attach(evaluator)
    evaluator.run(global_epoch=1)
    metrics = evaluator.state.metrics
    expected = analyze_means(net, x[:8], y[:8])
    for layer, row in expected.iterrows():
        assert metrics[f"sa/{layer}"] == pytest.approx(row["sa"], abs=1e-6)
        assert metrics[f"sa/pred/{layer}"] == pytest.approx(row["sa_pred"], abs=1e-6)
    assert metrics["sa/mean"] == pytest.approx(expected.drop(index="input")["sa"].mean(), abs=1e-6)
    assert hooks(net) == 0

    evaluator.run(global_epoch=2)  # a second epoch starts from zero
    hist = handler.history
    assert sorted(hist["epoch"].unique()) == [1, 2] and (hist["images"] == 8).all()
    first, second = (hist[hist["epoch"] == e].set_index("layer")["sa"] for e in (1, 2))
    pd.testing.assert_series_equal(first, second)
    assert hooks(net) == 0


def test_monai_handler_needs_a_network():
    pytest.importorskip("ignite")
    from ignite.engine import Engine

    from segability.integrations.monai import SAHandler, image_and_label

    with pytest.raises(ValueError, match="network"):
        SAHandler().attach(Engine(lambda e, b: b))
    with pytest.raises(ValueError, match="num_batches"):
        SAHandler(num_batches=-1)
    with pytest.raises(ValueError, match="output_transform"):
        image_and_label({"pred": torch.zeros(1)})
