"""Which channels are pruned together, and removing them for real.

A *group* is the set of output channels that must go together: a convolution's output channel,
the channel of its normalisation and activation, the channel of every convolution added to it
(residual units), and the input channel of every layer that reads it (directly or through a
skip concatenation, transposed convolutions included). The dependency graph of ``torch-pruning``
finds the groups by tracing the forward pass; a group is named after its first convolution in
forward order (its *root*), and its units are the root's output channels.

Zeroing a unit everywhere it exists (every member's output channel, after the layer: see
:func:`zeroing_plan`) and removing it give the same network, because every reader of a channel
that is zero after every layer only adds zero. Zeroing only the convolution's output (what
:func:`segability.prune.mask_units` on the convolution does) is the same only when the layers
that follow map zero to zero: a BatchNorm with running mean ``m``, variance ``v``, weight ``g``
and bias ``b`` turns a zero channel into the constant ``b - g m / sqrt(v + eps)`` (after the
activation: ``a``), which the next convolution adds, ``a * sum(w[:, c])`` in the interior (less at
zero-padded borders). Fresh BatchNorm (m = 0, v = 1, b = 0) and InstanceNorm without an affine
shift map zero to zero.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from segability.capture import CONV_TYPES, LayerSpec, eval_mode
from segability.prune import prunable_layers

__all__ = ["PruneGroup", "prunable_groups", "zeroing_plan", "prune_units", "model_cost", "cpu_latency"]


@dataclass(frozen=True)
class PruneGroup:
    """Output channels removed together.

    Attributes:
        name: the root: the group's first convolution in forward order; units are its output
            channels.
        layers: every convolution whose output channels belong to the group (root first).
        channels: the number of units.
    """

    name: str
    layers: tuple[str, ...]
    channels: int


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as exc:  # an optional extra
        raise ImportError("structural pruning needs torch-pruning: pip install 'segability[compress]'") from exc
    return torch_pruning


class _TraceMode(TorchFunctionMode):
    """A torch-function mode for the traced forward pass, which does two things.

    It records the channel count of every input of each ``torch.cat`` along the channel axis,
    keyed by the output's ``grad_fn`` (the node torch-pruning builds for it). And it runs
    functions called with ``inplace=True`` (nnU-Net's LeakyReLU) out of place: an in-place
    activation on a norm's output replaces the ``grad_fn`` torch-pruning keyed the norm by, and
    the norm then drops out of the graph (its channels would not be pruned). The modules keep
    their ``inplace`` flag; only this trace computes out of place, with the same values.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[Any, list[int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "inplace" in _parameters(func):
            bound = inspect.signature(func).bind(*args, **kwargs)
            if bound.arguments.get("inplace"):
                bound.arguments["inplace"] = False
                args, kwargs = bound.args, bound.kwargs
        out = func(*args, **kwargs)
        if func in (torch.cat, torch.concat, torch.concatenate) and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", kwargs.get("axis", 0))
            if out.ndim >= 2 and int(dim) % out.ndim == 1 and all(t.requires_grad for t in tensors):
                self.sizes[out.grad_fn] = [int(t.shape[1]) for t in tensors]
        return out


@functools.lru_cache(maxsize=256)
def _parameters(func: Any) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # builtins without a signature
        return ()


def _graph(model: nn.Module, example: torch.Tensor):
    """The dependency graph of ``model`` traced on ``example`` in eval mode.

    torch-pruning infers the channel counts of a concatenation's inputs by walking the graph, and
    loses them behind some operations (a one-parameter PReLU, MONAI's default activation; the
    copies an in-place activation leaves, as in nnU-Net); it then leaves the concatenation
    unmapped or fails. The counts seen in the traced forward pass are given to it instead.
    """
    tp = _torch_pruning()
    seen: dict[nn.Module, int] = {}
    concat = _TraceMode()

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.ndim >= 2:
            seen[module] = int(output.shape[1])

    def forward(net: nn.Module, x: torch.Tensor) -> Any:
        with concat:
            return net(x)

    class Graph(tp.DependencyGraph):
        def _build_dependency(self, module2node):
            super()._build_dependency(module2node)
            for node in module2node.values():
                sizes = concat.sizes.get(getattr(node, "grad_fn", None))
                if node.type == tp.ops.OPTYPE.CONCAT and sizes is not None and len(sizes) == len(node.inputs):
                    node.module.concat_sizes = sizes

        def get_out_channels(self, module_or_node):
            found = super().get_out_channels(module_or_node)
            module = getattr(module_or_node, "module", module_or_node)
            return seen.get(module) if found is None and isinstance(module, nn.PReLU) else found

        def get_in_channels(self, module_or_node):
            found = super().get_in_channels(module_or_node)
            module = getattr(module_or_node, "module", module_or_node)
            return seen.get(module) if found is None and isinstance(module, nn.PReLU) else found

    handles = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, nn.PReLU)]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    with eval_mode(model), torch.enable_grad():
        return Graph().build_dependency(model, example_inputs=example, forward_fn=forward, verbose=False)


def _plain(idxs: Sequence[Any]) -> list[int]:
    return sorted(int(getattr(i, "idx", i)) for i in idxs)


def _members(graph, module: nn.Module, idxs: Sequence[int]) -> list[tuple[nn.Module, list[int]]]:
    """``(module, output channels)`` of every module of the group that carries the channels."""
    pruner = graph.get_pruner_of_module(module)
    group = graph.get_pruning_group(module, pruner.prune_out_channels, idxs=list(idxs))
    out = []
    for dep, found in group:
        target = dep.target.module
        if isinstance(target, nn.Module) and graph.is_out_channel_pruning_fn(dep.handler):
            out.append((target, _plain(found)))
    return out


def _example(model: nn.Module, example: Any) -> torch.Tensor:
    if not isinstance(example, torch.Tensor) or example.ndim < 3:
        raise ValueError(f"example must be an input batch (B, C, *spatial), got {getattr(example, 'shape', type(example).__name__)}")
    param = next(iter(model.parameters()), None)
    x = example[:1].to(param.device if param is not None else "cpu")
    return x if x.is_floating_point() else x.float()


def prunable_groups(
    model: nn.Module,
    example: torch.Tensor,
    layers: LayerSpec | Literal["auto"] = "auto",
    *,
    output_key: str | None = None,
) -> list[PruneGroup]:
    """The groups of channels that can be removed, in forward order of their roots.

    A group that contains an output convolution (see :func:`segability.prune.prunable_layers`)
    or a convolution outside an explicit ``layers`` selection is left out: removing its channels
    would remove output classes or touch a layer that was not chosen.

    Args:
        model: the network.
        example: an input batch (B, C, *S); its first image is traced.
        layers: "auto" (every convolution but the output ones) or a selection of convolutions.
        output_key: key of a dict output.

    Returns:
        The groups, each with its member convolutions.

    Raises:
        ValueError: nothing can be pruned, or a malformed example.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> prunable_groups(net, torch.zeros(1, 1, 8, 8))
        [PruneGroup(name='0', layers=('0',), channels=4)]
    """
    x = _example(model, example)
    candidates = prunable_layers(model, x, layers, output_key=output_key)
    order = list(candidates)
    graph = _graph(model, x)
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    groups, assigned = [], set()
    for name in order:
        if name in assigned:
            continue
        convs = [names[m] for m, _ in _members(graph, modules[name], [0]) if isinstance(m, CONV_TYPES)]
        assigned.update(convs)
        if any(c not in candidates for c in convs):
            continue  # reaches an output convolution or an unselected layer
        convs.sort(key=order.index)
        groups.append(PruneGroup(convs[0], tuple(convs), candidates[convs[0]]))
    if not groups:
        raise ValueError("every group of channels reaches an output convolution: nothing can be pruned")
    return groups


def _check_units(model: nn.Module, units: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    if not isinstance(units, Mapping):
        raise ValueError(f"units must be a mapping {{group root: [unit indices]}}, got {type(units).__name__}")
    modules = dict(model.named_modules())
    out = {}
    for name, idx in units.items():
        module = modules.get(name)
        if not isinstance(module, CONV_TYPES):
            raise ValueError(f"units keys must name convolutions (group roots), got {name!r}")
        idx = sorted({int(i) for i in idx})
        if idx and (idx[0] < 0 or idx[-1] >= module.out_channels):
            raise ValueError(f"unit indices of {name!r} must be in [0, {module.out_channels}), got {idx}")
        if len(idx) >= module.out_channels:
            raise ValueError(f"cannot remove all {module.out_channels} units of {name!r}: keep at least one")
        if idx:
            out[name] = idx
    return out


def zeroing_plan(model: nn.Module, units: Mapping[str, Sequence[int]], example: torch.Tensor) -> dict[str, list[int]]:
    """Every module output channel that :func:`prune_units` removes, for the zeroing reference.

    ``segability.prune.mask_units(model, zeroing_plan(model, units, x))`` zeroes each removed
    channel after every layer that carries it (convolutions, norms, activations), which makes the
    masked network compute exactly what the pruned one computes.

    Args:
        model: the network (unchanged).
        units: ``{group root: unit indices}``.
        example: an input batch to trace.

    Returns:
        ``{module name: output channel indices}``.
    """
    chosen = _check_units(model, units)
    if not chosen:
        return {}
    graph = _graph(model, _example(model, example))
    names = {m: n for n, m in model.named_modules()}
    modules = dict(model.named_modules())
    plan: dict[str, list[int]] = {}
    for name, idx in chosen.items():
        for module, found in _members(graph, modules[name], idx):
            if names.get(module):
                plan[names[module]] = sorted(set(plan.get(names[module], [])) | set(found))
    return plan


def prune_units(model: nn.Module, units: Mapping[str, Sequence[int]], example: torch.Tensor) -> nn.Module:
    """Remove the chosen units and everything that depends on them, in place.

    Args:
        model: the network; its layers are replaced by smaller ones.
        units: ``{group root: unit indices}`` (see :func:`prunable_groups`).
        example: an input batch to trace.

    Returns:
        ``model``, smaller.

    Raises:
        ValueError: unknown roots, indices out of range, or all units of a group.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> net = prune_units(net, {"0": [1, 2]}, torch.zeros(1, 1, 8, 8))
        >>> net[0].out_channels, net[2].in_channels
        (2, 2)
    """
    chosen = _check_units(model, units)
    x = _example(model, example)
    modules = dict(model.named_modules())
    # One graph per group: a group's indices are its root's channels, untouched by the others.
    for name, idx in chosen.items():
        graph = _graph(model, x)
        pruner = graph.get_pruner_of_module(modules[name])
        graph.get_pruning_group(modules[name], pruner.prune_out_channels, idxs=idx).prune(record_history=False)
    return model


def model_cost(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """``(parameters, MACs)`` of one forward pass on ``example`` (torch-pruning's counter).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model_cost(nn.Conv2d(1, 2, 1, bias=False), torch.zeros(1, 1, 4, 4))
        (2, 32)
    """
    tp = _torch_pruning()
    with eval_mode(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, _example(model, example))
    return int(params), int(macs)


def cpu_latency(model: nn.Module, example: torch.Tensor, *, repeats: int = 20, warmup: int = 3, threads: int = 1) -> float:
    """Median seconds of a forward pass of one image on the CPU with ``threads`` threads.

    The model is copied to the CPU; the caller's thread count is restored afterwards.
    """
    if repeats < 1 or warmup < 0 or threads < 1:
        raise ValueError(f"repeats and threads must be >= 1 and warmup >= 0, got {repeats}, {threads}, {warmup}")
    import copy

    net = copy.deepcopy(model).cpu().eval()
    x = example[:1].cpu().float()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                net(x)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
    return float(torch.tensor(times).median())
