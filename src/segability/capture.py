"""Capture the outputs of chosen layers of any ``torch.nn.Module`` with forward hooks.

Layers are chosen by dotted name, glob pattern (``"decoder.*"``), module type, module object or
predicate ``(name, module) -> bool``, or a list of those; :func:`default_layers` is the choice made
when none is given (every stage, transformer block and convolution, one entry per stage). In a glob, ``*`` and ``?`` stay inside one
dotted part (``"vit.blocks.*"`` is the blocks, not their sub-modules) and ``**`` spans any number
of parts (``"decoder.**"`` is everything inside the decoder). Hooks never leak: they are removed in
``finally``, also when the forward pass raises, and nothing in the model is changed.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "LayerInfo",
    "LayerSpec",
    "FeatureRecorder",
    "list_layers",
    "resolve_layers",
    "conv_layers",
    "default_layers",
    "eval_mode",
    "first_tensor",
]

LayerSpec = str | type | nn.Module | Callable[[str, nn.Module], bool] | Sequence[Any]

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

CONTAINER_TYPES: tuple[type[nn.Module], ...] = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
# Self-attention modules by class name: torch's, MONAI's (SABlock, Swin's WindowAttention), timm's
# and most hand-written transformers (Attention, ...SelfAttention); not attention *gates*
# (AttentionBlock, AttentionLayer of attention U-Nets), which are convolutions around a skip.
_ATTENTION = re.compile(r"^(Attention|SABlock|MultiheadAttention|MultiHeadAttention|\w*SelfAttention|WindowAttention\w*)$")


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a model: its dotted name, module type and (with an example) output shape."""

    name: str
    type: str
    shape: tuple[int, ...] | None = None
    parameters: int = 0

    def __str__(self) -> str:
        shape = "" if self.shape is None else " x ".join(str(s) for s in self.shape)
        return f"{self.name:<40} {self.type:<22} {shape}"


def first_tensor(output: Any) -> torch.Tensor | None:
    """The first tensor of a module output (a tensor, or the first tensor in a tuple/list/dict)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            found = first_tensor(item)
            if found is not None:
                return found
    if isinstance(output, dict):
        for item in output.values():
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def _named(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if n]


def conv_layers(model: nn.Module) -> list[str]:
    """Names of every convolution (1D/2D/3D, transposed too) of ``model``, in definition order."""
    return [n for n, m in _named(model) if isinstance(m, CONV_TYPES)]


def default_layers(model: nn.Module) -> list[str]:
    """The layers analysed by default: one entry per stage or transformer block, plus convolutions.

    The rule, so that each stage of the common architectures is one row rather than its many inner
    convolutions:

    1. **Stages**: the elements of a container named ``stages`` (nnU-Net's / dynamic_network_
       architectures' ``encoder.stages.<i>`` and ``decoder.stages.<i>``). The module holding the
       ``stages`` (``encoder``, ``decoder``) contributes nothing else: its stem, transposed
       convolutions and segmentation heads (called only with deep supervision) are left out.
    2. **Transformer blocks**: each element of a container that holds a self-attention module
       (MONAI UNETR's ``vit.blocks.<i>``). When two or more container elements each hold such a
       list of blocks, they are **stages** of blocks and are taken instead of their blocks
       (MONAI SwinUNETR's ``swinViT.layers1.0`` ... ``swinViT.layers4.0``: the Swin stage that is
       called, not the ``ModuleList`` around it).
    3. **Convolutions** (1D/2D/3D, transposed too) that are not inside a module chosen above.

    A container (``ModuleList``, ``ModuleDict``) is never chosen: it is not called itself. A net
    of plain convolutions (MONAI UNet, a hand-made U-Net) gets every convolution, as
    :func:`conv_layers`.

    Returns:
        Names in definition order; empty when the model has none of these.

    Example:
        >>> from torch import nn
        >>> class Encoder(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.stem = nn.Conv2d(1, 4, 3)
        ...         self.stages = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)),
        ...                                     nn.Sequential(nn.Conv2d(4, 8, 3)))
        >>> net = nn.Sequential(Encoder(), nn.Conv2d(8, 1, 1))
        >>> default_layers(net)
        ['0.stages.0', '0.stages.1', '1']
    """
    modules = dict(model.named_modules())

    def parent(name: str) -> str:
        return name.rpartition(".")[0]

    def is_element(name: str) -> bool:
        return bool(name) and isinstance(modules.get(parent(name)), CONTAINER_TYPES)

    def inside(name: str, roots: set[str]) -> bool:
        return any(name == r or name.startswith(r + ".") for r in roots)

    names = [n for n in modules if n]
    stages = {n for n in names if is_element(n) and parent(n).rpartition(".")[2] == "stages"}
    owners = {parent(parent(n)) for n in stages} - {""}
    blocks: set[str] = set()
    for name in names:
        module = modules[name]
        if not (isinstance(module, nn.MultiheadAttention) or _ATTENTION.match(type(module).__name__)):
            continue
        above = name
        while above and not is_element(above):
            above = parent(above)
        if above and not inside(above, stages):
            blocks.add(above)
    # Blocks listed in a child container of a container element: that element is a stage of blocks.
    block_stages = {b.rsplit(".", 2)[0] for b in blocks if b.count(".") >= 2 and is_element(b.rsplit(".", 2)[0])}
    if len(block_stages) >= 2:
        blocks = {b for b in blocks if not inside(b, block_stages)} | block_stages
    chosen = stages | blocks
    # Nested choices (a block inside a block) keep the outer one.
    chosen = {n for n in chosen if not any(n.startswith(c + ".") for c in chosen)}
    convs = {n for n in conv_layers(model) if not inside(n, chosen) and not inside(n, owners)}
    return [n for n in names if n in chosen or n in convs]


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob over dotted names: ``*``/``?`` match within one part, ``**`` across parts."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if ch == "*":
            out.append(r"[^.]*")
        elif ch == "?":
            out.append(r"[^.]")
        elif ch == "[":
            end = pattern.find("]", i + 1)
            if end < 0:
                out.append(re.escape(ch))
            else:
                body = pattern[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = end
        else:
            out.append(re.escape(ch))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _close_matches(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n in names if name.split(".")[-1] in n][:5]
    hint = f" Close matches: {', '.join(repr(c) for c in close)}." if close else ""
    return f"no layer named {name!r} in the model.{hint} `segability.list_layers(model)` lists them all."


def resolve_layers(model: nn.Module, layers: LayerSpec) -> list[tuple[str, nn.Module]]:
    """Resolve a layer selection to ``(name, module)`` pairs, in the model's definition order.

    Args:
        model: any module.
        layers: a dotted name, a glob pattern, a module type, a module object, a predicate
            ``(name, module) -> bool``, or a list/tuple of these.

    Returns:
        The selected ``(name, module)`` pairs without duplicates.

    Raises:
        ValueError: a name or pattern that matches nothing (with close matches), a module that is
            not part of the model, or a selection that selects nothing.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> [n for n, _ in resolve_layers(net, nn.Conv2d)]
        ['0', '2']
    """
    named = _named(model)
    names = [n for n, _ in named]
    specs = list(layers) if isinstance(layers, (list, tuple)) else [layers]
    if not specs:
        raise ValueError("layers is empty: give at least one layer name, pattern, type or module")
    chosen: set[str] = set()
    for spec in specs:
        if isinstance(spec, str):
            if any(ch in spec for ch in "*?["):
                regex = _glob_regex(spec)
                hits = [n for n in names if regex.match(n)]
                if not hits:
                    loose = [n for n in names if fnmatch.fnmatchcase(n, spec)][:5]
                    hint = f" Names it would match across dots: {', '.join(map(repr, loose))}; use '**'." if loose else ""
                    raise ValueError(
                        f"the pattern {spec!r} matches no layer of the model ('*' stays within one dotted "
                        f"part).{hint} `segability.list_layers(model)` lists them all."
                    )
            elif spec in names:
                hits = [spec]
            else:
                raise ValueError(_close_matches(spec, names))
        elif isinstance(spec, type):
            if not issubclass(spec, nn.Module):
                raise ValueError(f"a type in layers must be an nn.Module subclass, got {spec.__name__}")
            hits = [n for n, m in named if isinstance(m, spec)]
            if not hits:
                raise ValueError(f"the model has no layer of type {spec.__name__}")
        elif isinstance(spec, nn.Module):
            hits = [n for n, m in named if m is spec]
            if not hits:
                raise ValueError(f"the module {type(spec).__name__} given in layers is not part of the model")
        elif callable(spec):
            hits = [n for n, m in named if spec(n, m)]
        else:
            raise ValueError(
                "layers must be names, glob patterns, module types, module objects or predicates, "
                f"got {type(spec).__name__}"
            )
        chosen.update(hits)
    if not chosen:
        raise ValueError("the layer selection selects no layer of the model")
    return [(n, m) for n, m in named if n in chosen]


class FeatureRecorder:
    """Context manager that records the outputs of chosen layers during forward passes.

    Outputs are detached (no graph is kept); each call of a hooked module appends to
    ``outputs[name]``, ``calls[name]`` counts the calls, and ``order`` lists the layer names in the
    order they were first called. With ``callback``, each output is handed to
    ``callback(name, output)`` inside the hook instead of being stored, so it can be reduced while
    the forward pass goes on (nothing is kept). Hooks are removed on exit, also when the forward
    pass raised; exceptions propagate. The model itself is never changed.

    Args:
        model: any ``nn.Module``.
        layers: the selection (see :func:`resolve_layers`).
        clone: copy each stored output (safe against later in-place ops such as
            ``ReLU(inplace=True)``, at the cost of memory). Without a copy, ``modified_in_place``
            tells which outputs changed.
        callback: called as ``callback(name, output)`` for every call of a selected layer whose
            output holds a tensor; ``calls[name]`` already counts this call.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1))
        >>> with FeatureRecorder(net, nn.Conv2d) as rec:
        ...     _ = net(torch.zeros(1, 1, 8, 8))
        >>> {k: tuple(v[-1].shape) for k, v in rec.outputs.items()}
        {'0': (1, 4, 8, 8), '2': (1, 1, 8, 8)}
    """

    def __init__(
        self,
        model: nn.Module,
        layers: LayerSpec,
        *,
        clone: bool = False,
        callback: Callable[[str, torch.Tensor], None] | None = None,
    ):
        self.model = model
        self.layers = resolve_layers(model, layers)
        self.clone = clone
        self.callback = callback
        self.outputs: dict[str, list[torch.Tensor]] = {}
        self.calls: dict[str, int] = {}
        self.order: list[str] = []
        self._versions: dict[str, list[int]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def names(self) -> list[str]:
        """The selected layer names (definition order)."""
        return [n for n, _ in self.layers]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if name not in self.calls:
                self.order.append(name)
            self.calls[name] = self.calls.get(name, 0) + 1
            tensor = first_tensor(output)
            if tensor is None:
                return
            tensor = tensor.detach()
            if self.callback is not None:
                self.callback(name, tensor)
                return
            if self.clone:
                tensor = tensor.clone()
            self.outputs.setdefault(name, []).append(tensor)
            self._versions.setdefault(name, []).append(tensor._version)

        return hook

    def __enter__(self) -> FeatureRecorder:
        registered = False
        try:
            for name, module in self.layers:
                self._handles.append(module.register_forward_hook(self._hook(name)))
            registered = True
        finally:
            if not registered:  # a failure half-way (or an interrupt) leaves no hook behind
                self.remove()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this recorder registered (idempotent)."""
        while self._handles:
            self._handles.pop().remove()

    def pop(self, name: str) -> list[torch.Tensor]:
        """Take (and forget) the recorded outputs of a layer."""
        self._versions.pop(name, None)
        return self.outputs.pop(name, [])

    def modified_in_place(self, name: str) -> bool:
        """Whether an output of ``name`` was changed in place after it was recorded."""
        return any(t._version != v for t, v in zip(self.outputs.get(name, []), self._versions.get(name, []), strict=True))

    def clear(self) -> None:
        """Forget all recorded outputs and call counts (hooks stay registered)."""
        self.outputs.clear()
        self._versions.clear()
        self.calls.clear()
        self.order.clear()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own ``training`` flag afterwards.

    Each submodule gets back its own flag (a frozen, eval-mode part of a training model stays in
    eval mode), also when the body raises.

    Example:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training
        True
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


def list_layers(model: nn.Module, example: torch.Tensor | None = None) -> list[LayerInfo]:
    """The layers of a model, to read before choosing which to analyse.

    Without ``example``: every named submodule in definition order. With an example input: the
    submodules that the forward pass calls, in the order they are first called, each with its
    output shape (without batch). The model is run in eval mode without gradients; its mode is
    restored.

    Args:
        model: any module.
        example: an input batch, e.g. ``torch.zeros(1, 1, 128, 128)``.

    Returns:
        A list of :class:`LayerInfo`.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        >>> [(l.name, l.shape) for l in list_layers(net, torch.zeros(1, 1, 8, 8))]
        [('0', (4, 8, 8)), ('1', (4, 8, 8))]
    """
    named = _named(model)

    def params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters(recurse=False))

    if example is None:
        return [LayerInfo(n, type(m).__name__, None, params(m)) for n, m in named]
    shapes: dict[str, tuple[int, ...]] = {}
    order: list[str] = []
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            if name in shapes:
                return
            t = first_tensor(output)
            shapes[name] = tuple(t.shape[1:]) if t is not None else ()
            order.append(name)

        return hook

    try:
        for n, m in named:
            handles.append(m.register_forward_hook(make_hook(n)))
        first = next(iter(model.parameters()), None)
        if first is not None and isinstance(example, torch.Tensor):
            example = example.to(first.device)
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    modules = dict(named)
    return [LayerInfo(n, type(modules[n]).__name__, shapes[n], params(modules[n])) for n in order]
