"""The capture layer: layer selection, FeatureRecorder, eval_mode and list_layers.

Every test runs on tiny CPU modules built here; expected names, orders, shapes and outputs are
written out by hand or computed by calling the sub-modules directly.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from segability.analysis import analyze
from segability.capture import FeatureRecorder, eval_mode, list_layers, resolve_layers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread, so that OpenMP does not oversubscribe a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class EncDec(nn.Module):
    """encoder.0 conv, encoder.1 ReLU, encoder.2 conv; decoder.0 conv, decoder.1 = Sequential(conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 3, 3, stride=2, padding=1))
        self.decoder = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Sequential(nn.Conv2d(2, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class Backwards(nn.Module):
    """Defines ``late`` before ``early`` but calls ``early`` first; ``unused`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Conv2d(4, 1, 1)
        self.unused = nn.Conv2d(1, 1, 1)
        self.early = nn.Conv2d(1, 4, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.early(x))


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom inside the model")


class RaisingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Dropout(0.5))
        self.boom = Boom()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.boom(self.block(self.conv(x)))


def names(selection) -> list[str]:
    return [n for n, _ in selection]


def assert_no_hooks(model: nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"forward hook left on {name!r}"
        assert not module._forward_pre_hooks, f"forward pre-hook left on {name!r}"
        assert not module._forward_hooks_with_kwargs, f"forward hook kwargs left on {name!r}"


def mixed_flags(model: nn.Module) -> dict[str, bool]:
    """Train the model but put one submodule in eval and one of its children back in train."""
    model.train()
    model.block.eval()
    model.block[1].train()
    return {n: m.training for n, m in model.named_modules()}


# ----------------------------------------------------------------------------------- selection
@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("encoder.0", ["encoder.0"]),
        ("decoder.*", ["decoder.0", "decoder.1"]),  # '*' stays inside one dotted part
        ("decoder.**", ["decoder.0", "decoder.1", "decoder.1.0"]),
        ("encoder.[02]", ["encoder.0", "encoder.2"]),
        ("*.?", ["encoder.0", "encoder.1", "encoder.2", "decoder.0", "decoder.1"]),
        (nn.Conv2d, ["encoder.0", "encoder.2", "decoder.0", "decoder.1.0"]),
        (nn.ReLU, ["encoder.1"]),
        (lambda n, m: isinstance(m, nn.Conv2d) and m.out_channels == 2, ["encoder.0", "decoder.0"]),
        # a list: union in definition order, without duplicates
        (["decoder.1.0", nn.ReLU, "encoder.1", "decoder.1.0"], ["encoder.1", "decoder.1.0"]),
    ],
)
def test_resolve_layers_by_every_kind_of_spec(spec, expected):
    assert names(resolve_layers(EncDec(), spec)) == expected


def test_resolve_layers_by_module_object():
    net = EncDec()
    assert names(resolve_layers(net, net.decoder[1][0])) == ["decoder.1.0"]
    assert names(resolve_layers(net, [net.encoder[2], net.encoder])) == ["encoder", "encoder.2"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("encoder.O", r"'encoder\.0'"),  # letter O: the close match is listed
        ("decodr.1.0", r"'decoder\.1\.0'"),
        ("decoder.1.*.0", "matches no layer"),
        ("decoder*0", "'decoder.0', 'decoder.1.0'; use '\\*\\*'"),
        (nn.Conv3d, "no layer of type Conv3d"),
        (int, "nn.Module subclass"),
        (nn.Conv2d(1, 1, 1), "not part of the model"),
        (lambda n, m: False, "selects no layer"),
        ([], "empty"),
        (3.5, "names, glob patterns"),
    ],
)
def test_resolve_layers_rejects_bad_selections(spec, message):
    with pytest.raises(ValueError, match=message):
        resolve_layers(EncDec(), spec)


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError) as info:
        FeatureRecorder(EncDec(), "encoder.3")
    text = str(info.value)
    assert "'encoder.3'" in text and "'encoder.0'" in text and "list_layers" in text


# ------------------------------------------------------------------------------ FeatureRecorder
def test_recorder_captures_the_outputs_that_the_submodules_produce():
    torch.manual_seed(0)
    net = EncDec().eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        e0 = net.encoder[0](x)
        e2 = net.encoder[2](net.encoder[1](e0.clone()))
        d10 = net.decoder[1](net.decoder[0](e2))
        with FeatureRecorder(net, ["decoder.1.0", "encoder.0", "encoder.2"], clone=True) as rec:
            out = net(x)
    torch.testing.assert_close(rec.outputs["encoder.0"][0], e0, rtol=0, atol=0)
    torch.testing.assert_close(rec.outputs["encoder.2"][0], e2, rtol=0, atol=0)
    torch.testing.assert_close(rec.outputs["decoder.1.0"][0], d10, rtol=0, atol=0)
    torch.testing.assert_close(out, d10, rtol=0, atol=0)
    assert rec.names == ["encoder.0", "encoder.2", "decoder.1.0"]  # definition order
    assert rec.order == ["encoder.0", "encoder.2", "decoder.1.0"]  # forward order
    assert rec.calls == {"encoder.0": 1, "encoder.2": 1, "decoder.1.0": 1}
    assert_no_hooks(net)


def test_recorder_counts_calls_of_a_reused_module_and_sees_in_place_changes():
    conv = nn.Conv2d(1, 1, 1, bias=False)
    relu = nn.ReLU(inplace=True)
    net = nn.Sequential(conv, relu, conv)  # the same conv twice
    with torch.no_grad():
        conv.weight.fill_(-1.0)
        with FeatureRecorder(net, conv) as rec:
            net(torch.ones(1, 1, 2, 2))
    assert rec.calls == {"0": 2}
    assert len(rec.outputs["0"]) == 2
    # first call: -1, then ReLU(inplace) zeroed it; the recorder notices
    assert rec.modified_in_place("0")
    assert float(rec.outputs["0"][0].abs().sum()) == 0.0
    with torch.no_grad(), FeatureRecorder(net, conv, clone=True) as rec:
        net(torch.ones(1, 1, 2, 2))
    assert float(rec.outputs["0"][0].sum()) == -4.0  # the clone kept the layer's own output
    assert not rec.modified_in_place("0")


def test_recorder_callback_sees_each_output_and_stores_nothing():
    net = Backwards()
    seen: list[tuple[str, tuple[int, ...], int]] = []
    with torch.no_grad(), FeatureRecorder(net, nn.Conv2d, callback=lambda n, t: seen.append((n, tuple(t.shape), rec.calls[n]))) as rec:
        net(torch.zeros(3, 1, 8, 8))
    assert seen == [("early", (3, 4, 4, 4), 1), ("late", (3, 1, 4, 4), 1)]
    assert rec.outputs == {}
    assert rec.calls == {"early": 1, "late": 1}


def test_recorder_outputs_are_detached():
    net = nn.Sequential(nn.Conv2d(1, 2, 1))
    with FeatureRecorder(net, "0") as rec:
        y = net(torch.ones(1, 1, 2, 2))
    assert y.requires_grad and not rec.outputs["0"][0].requires_grad


def test_hooks_are_removed_and_flags_restored_when_the_forward_raises():
    net = RaisingNet()
    before = mixed_flags(net)
    state = copy.deepcopy(net.state_dict())
    attributes = {n: set(vars(m)) for n, m in net.named_modules()}
    x = torch.rand(1, 1, 8, 8)

    with pytest.raises(RuntimeError, match="boom inside the model"):  # propagated, not swallowed
        with FeatureRecorder(net, lambda n, m: True):
            net(x)
    assert_no_hooks(net)

    with pytest.raises(RuntimeError, match="boom inside the model"):
        with eval_mode(net), FeatureRecorder(net, ["conv", "block.0"]):
            assert not any(m.training for m in net.modules())
            net(x)
    assert_no_hooks(net)
    assert {n: m.training for n, m in net.named_modules()} == before

    with pytest.raises(RuntimeError, match="boom inside the model"):
        list_layers(net, x)
    assert_no_hooks(net)
    assert {n: m.training for n, m in net.named_modules()} == before

    with pytest.raises(RuntimeError, match="failed on every image"):
        analyze(net, x)
    assert_no_hooks(net)
    assert {n: m.training for n, m in net.named_modules()} == before

    # nothing else in the model changed
    assert {n: set(vars(m)) for n, m in net.named_modules()} == attributes
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_analyze_leaves_hooks_and_flags_as_found_after_a_successful_run():
    net = RaisingNet()
    net.boom = nn.Identity()
    before = mixed_flags(net)
    analyze(net, torch.rand(2, 1, 8, 8), layers=nn.Conv2d, units=True, low_memory=True)
    analyze(net, torch.rand(2, 1, 8, 8), layers=nn.Conv2d, low_memory=False)
    assert_no_hooks(net)
    assert {n: m.training for n, m in net.named_modules()} == before


def test_eval_mode_restores_each_submodule_flag():
    net = RaisingNet()
    before = mixed_flags(net)
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert {n: m.training for n, m in net.named_modules()} == before
    assert before["block"] is False and before["block.1"] is True and before[""] is True


# ---------------------------------------------------------------------------------- list_layers
def test_list_layers_without_example_is_definition_order():
    layers = list_layers(Backwards())
    assert [layer.name for layer in layers] == ["late", "unused", "early"]
    assert all(layer.shape is None for layer in layers)
    assert [layer.parameters for layer in layers] == [4 * 1 + 1, 1 + 1, 4 * 9 + 4]
    assert layers[0].type == "Conv2d"


def test_list_layers_with_example_is_forward_order_with_shapes():
    net = Backwards()
    net.train()
    layers = list_layers(net, torch.zeros(2, 1, 9, 7))
    # stride 2, padding 1, kernel 3: ceil(9 / 2) = 5, ceil(7 / 2) = 4; 'unused' is never called
    assert [(layer.name, layer.shape) for layer in layers] == [("early", (4, 5, 4)), ("late", (1, 5, 4))]
    assert net.training and all(m.training for m in net.modules())
    assert_no_hooks(net)


def test_list_layers_shapes_of_nested_and_3d_modules():
    net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.Sequential(nn.MaxPool3d(2), nn.Conv3d(2, 5, 1)))
    layers = list_layers(net, torch.zeros(1, 1, 16, 16, 8))
    assert [(layer.name, layer.shape) for layer in layers] == [
        ("0", (2, 16, 16, 8)),
        ("1.0", (2, 8, 8, 4)),
        ("1.1", (5, 8, 8, 4)),
        ("1", (5, 8, 8, 4)),  # a container ends after its children
    ]
    assert "Conv3d" in str(layers[0]) and "2 x 16 x 16 x 8" in str(layers[0])
