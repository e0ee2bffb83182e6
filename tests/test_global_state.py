"""What segability changes in the interpreter it runs in, it restores (issue 12, item 9),
and a failure in the second forward pass costs only its own batch (issue 13, case 5)."""

from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

import segability
from segability.io.models import load_callable
from segability.train import TrainConfig, train_reference


def test_training_restores_threads_and_the_global_random_stream(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    cfg = TrainConfig(epochs=1, steps_per_epoch=1, n_train=8, n_val=4, sa_images=2, batch_size=2, threads=threads + 1)
    train_reference(cfg, cache_dir=tmp_path / "cache", command="test")
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.rand(3), expected)  # the caller's stream goes on as if nothing ran


def test_a_user_file_leaves_no_neighbour_module_and_is_reimported_when_edited(tmp_path):
    (tmp_path / "blocks_for_test.py").write_text("WIDTH = 3\n")
    factory = tmp_path / "nets.py"
    factory.write_text("from blocks_for_test import WIDTH\ndef width():\n    return WIDTH\n")
    path_before = list(sys.path)
    assert load_callable(f"{factory}:width")() == 3
    assert "blocks_for_test" not in sys.modules and sys.path == path_before
    factory.write_text("def width():\n    return 5\n")
    assert load_callable(f"{factory}:width")() == 5  # the edited file, not a cached module


class _InPlaceNet(nn.Module):
    """A conv followed by an in-place ReLU (its output is scored in a second pass) that fails on
    the second forward pass of its second batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(2, 1, 1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 4:  # batch 2, second pass
            raise RuntimeError("device lost")
        return self.head(self.act(self.conv(x)))


def test_a_failure_in_the_second_pass_keeps_every_finished_score():
    torch.manual_seed(0)
    net = _InPlaceNet()
    x = torch.randn(4, 1, 16, 16)
    filters = list(warnings.filters)
    res = segability.analyze(net, x, batch_size=2, layers=["conv", "head"])
    assert list(warnings.filters) == filters  # no filter left behind
    rows = res.layers.set_index(["image", "layer"])
    for image in ("0", "1"):  # batch 1: every layer scored
        assert rows.loc[(image, "conv"), "status"] == "ok"
    for image in ("2", "3"):  # batch 2: the first pass's layers kept, the second pass's failed
        assert rows.loc[(image, "input"), "status"] == "ok"
        assert rows.loc[(image, "head"), "status"] == "ok"
        assert rows.loc[(image, "conv"), "status"] == "failed"
        assert "second forward pass failed: RuntimeError: device lost" in rows.loc[(image, "conv"), "reason"]
    # the scores that were made equal those of a run without the failure
    clean = segability.analyze(_fresh(net), x, batch_size=2, layers=["conv", "head"]).layers.set_index(["image", "layer"])
    assert abs(rows.loc[("2", "head"), "sa_pred"] - clean.loc[("2", "head"), "sa_pred"]) < 1e-9


def _fresh(net: _InPlaceNet) -> _InPlaceNet:
    copy = _InPlaceNet()
    copy.load_state_dict(net.state_dict())
    copy.calls = -100  # never reaches the failing call
    return copy


def test_analyze_works_inside_inference_mode():
    torch.manual_seed(0)
    net, x = _fresh(_InPlaceNet()), torch.randn(2, 1, 16, 16)
    want = segability.analyze(net, x, layers=["conv", "head"]).layers
    with torch.inference_mode():
        got = segability.analyze(net, x, layers=["conv", "head"]).layers
    assert (got["status"] == "ok").all()
    assert got["sa_pred"].tolist() == want["sa_pred"].tolist()
