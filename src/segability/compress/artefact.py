"""A pruned model as a file that plain PyTorch reloads: the factory of the original network, its
arguments and the pruned state dict; the layer shapes are read off the state dict.

The file is a ``torch.save`` of a dict loaded with ``weights_only=True`` (tensors, strings,
numbers, lists, tuples, dicts only; nothing is unpickled):

- ``format``: ``"segability.pruned"``, ``version``: 1;
- ``factory``: ``"package.module:function"`` (or ``"file.py:function"``) that builds the unpruned
  network, ``factory_args``: its keyword arguments;
- ``state_dict``: the pruned weights; ``meta``: what the caller records (ranking, fraction, ...).

:func:`load_pruned` builds the unpruned network, shrinks every layer to the shapes of the state
dict (convolutions, transposed convolutions, norms, PReLU, linear layers) and loads the weights.
It needs neither torch-pruning nor the code that pruned the model, and works as a model factory:
``segability analyze --model segability.compress:load_pruned --model-arg path=model.pt``.

Calling what a file names is running code the file chooses, so the file's own factory is used only
when it is an ``nn.Module`` class (``monai.networks.nets:BasicUNet``) or a function of segability
(``segability.models:reference_unet``); any other factory, a ``file.py:function`` among them, must
be given by the caller (``factory=``, ``--model-arg factory=...``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_pruned", "load_pruned", "FORMAT"]

FORMAT = "segability.pruned"
_VERSION = 1


def save_pruned(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    factory: str,
    factory_args: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (pruned) so that :func:`load_pruned` rebuilds it.

    Args:
        model: the pruned network.
        path: the file to write.
        factory: ``"package.module:function"`` building the unpruned network.
        factory_args: keyword arguments of the factory (numbers, strings, lists, tuples, dicts).
        meta: anything else to record (same value types).

    Returns:
        The path written.

    Raises:
        ValueError: a factory that is not ``"module:function"``.
    """
    if not isinstance(factory, str) or ":" not in factory:
        raise ValueError(f"factory must be 'package.module:function' or 'file.py:function', got {factory!r}")
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": _VERSION,
        "factory": factory,
        "factory_args": dict(factory_args or {}),
        "meta": dict(meta or {}),
        "state_dict": state,
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _shrink(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Give every parameter and buffer of ``model`` the shape it has in ``state``; fix the sizes
    the layers keep as attributes."""
    for prefix, module in model.named_modules():
        changed = False
        for kind in ("_parameters", "_buffers"):
            for key, value in list(getattr(module, kind).items()):
                full = f"{prefix}.{key}" if prefix else key
                if value is None or full not in state or state[full].shape == value.shape:
                    continue
                new = torch.empty(state[full].shape, dtype=value.dtype, device=value.device)
                getattr(module, kind)[key] = nn.Parameter(new, value.requires_grad) if kind == "_parameters" else new
                changed = True
        if not changed:
            continue
        w = getattr(module, "weight", None)
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed:  # weight (in, out / groups, *k)
                module.in_channels, module.out_channels = w.shape[0], w.shape[1] * module.groups
            else:
                module.out_channels, module.in_channels = w.shape[0], w.shape[1] * module.groups
        elif isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            ref = w if w is not None else getattr(module, "running_mean", None)
            if ref is not None:
                setattr(module, "num_channels" if isinstance(module, nn.GroupNorm) else "num_features", ref.shape[0])
        elif isinstance(module, nn.PReLU):
            module.num_parameters = w.shape[0]
        elif isinstance(module, nn.Linear):
            module.out_features, module.in_features = w.shape
        elif isinstance(module, nn.LayerNorm):
            module.normalized_shape = tuple(w.shape)


def load_pruned(path: str | os.PathLike[str], factory: str | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model written by :func:`save_pruned`, in eval mode.

    Args:
        path: the file.
        factory: the spec that builds the unpruned network, in place of the file's own; needed
            when the file's is neither an ``nn.Module`` class nor a function of segability.
        device: where the model goes.

    Returns:
        The pruned network, with ``segability_meta`` (the recorded meta dict) as an attribute.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file of another format, a factory of the file that is not trusted, or
            weights that do not fit the factory's network.

    Example:
        >>> import tempfile, torch
        >>> from segability.models import REFERENCE_ARCH, reference_unet
        >>> net = reference_unet().eval()
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save_pruned(net, f"{d}/m.pt", factory="segability.models:reference_unet")
        ...     again = load_pruned(f"{d}/m.pt")
        >>> x = torch.rand(1, 1, 32, 32)
        >>> bool(torch.equal(net(x), again(x)))
        True
    """
    from segability.io import load_callable

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pruned model at {path}")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pruned model written by segability.compress.save_pruned")
    if int(payload.get("version", 0)) > _VERSION:
        raise ValueError(f"{path} has format version {payload['version']}; this segability reads up to {_VERSION}")
    spec = factory if factory is not None else payload["factory"]
    target = spec.partition(":")[0]
    if factory is None and (target.endswith(".py") or "/" in target or os.sep in target):
        raise ValueError(f"{path} is built by the file {spec!r}; pass factory= (--model-arg factory=...) to run it")
    build = load_callable(spec, argument="factory")
    trusted = (isinstance(build, type) and issubclass(build, nn.Module)) or str(getattr(build, "__module__", "")).startswith("segability.")
    if factory is None and not trusted:
        raise ValueError(f"{path} names the factory {spec!r}, neither an nn.Module class nor a function of segability; pass factory= to use it")
    model = build(**payload["factory_args"])
    if not isinstance(model, nn.Module):
        raise ValueError(f"the factory {spec!r} did not return an nn.Module")
    state = payload["state_dict"]
    _shrink(model, state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"the weights in {path} do not fit {spec!r}: {exc}") from exc
    model.segability_meta = dict(payload.get("meta", {}))
    return model.to(device).eval()
