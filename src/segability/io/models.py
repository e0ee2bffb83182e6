"""Load a segmentation network from files, safely: a factory plus a state dict, never a blind unpickle.

A model is named by a *spec*, ``path/to/file.py:factory`` or ``package.module:factory``, where the
factory is a callable returning the ``nn.Module`` (keyword arguments come from ``model_args``, e.g.
``--model-arg channels=16``). Weights are a state dict read with ``torch.load(weights_only=True)``
(NumPy scalars allowed, as nnU-Net's training logs hold), also inside a checkpoint: nnU-Net's
``network_weights``, Lightning's ``state_dict`` (keys under ``model.`` / ``net.``), a MONAI
bundle's ``model.pt``, or a dict with ``model`` / ``net`` / ...; the prefixes that wrappers add
(``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``) are removed when that makes the keys fit
the model. A whole pickled model (a
``.pt`` holding an ``nn.Module``) is refused unless ``trust_pickle=True``: unpickling runs arbitrary
code from the file. TorchScript is refused with the reason: a scripted module cannot take the
forward hooks that segability reads features with.

Messages name the command-line argument (``--model``, ``--weights``) the value came from, so the
CLI can print them as they are.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import stat
import sys
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segability.errors import UsageError

__all__ = [
    "load_model",
    "load_callable",
    "load_state_dict",
    "parse_model_args",
    "parse_shape",
    "is_torchscript_file",
]

TORCHSCRIPT_HELP = (
    "TorchScript modules cannot take forward hooks, which segability needs to read each layer's "
    "features: give the Python nn.Module instead (--model file.py:factory, plus --weights with its "
    "state dict, e.g. saved by torch.save(model.state_dict(), 'weights.pt'))"
)
PICKLE_HELP = (
    "unpickling it can execute arbitrary code, so it is refused; pass --trust-pickle "
    "(trust_pickle=True) only if you trust where the file comes from, or save the weights alone "
    "with torch.save(model.state_dict(), 'weights.pt') and give the architecture with --model file.py:factory"
)
# Keys under which checkpoints commonly keep the model's state dict: Lightning and most trainers
# (state_dict, model_state_dict), nnU-Net (network_weights), MONAI CheckpointSaver (model, net, network).
CHECKPOINT_KEYS = (
    "state_dict", "model_state_dict", "network_weights", "model", "net", "network", "model_state", "weights",
)  # fmt: skip
# Prefixes added by wrappers (DataParallel, Lightning modules) that a bare model does not have.
WRAPPER_PREFIXES = ("module.", "model.", "net.", "network.", "_orig_mod.")

# First bytes of what torch.save writes: a zip archive, or (legacy format) a pickle of protocol >= 2.
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"

_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def is_torchscript_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``), which has ``code/`` and ``constants.pkl``."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _split_spec(spec: str) -> tuple[str, str | None]:
    """``"a/b.py:fn"`` -> ``("a/b.py", "fn")``; a spec without a callable part -> ``(spec, None)``."""
    if ":" not in spec or (_WINDOWS_DRIVE.match(spec) and spec.count(":") == 1):
        return spec, None
    target, name = spec.rsplit(":", 1)
    return target, name


def _import_file(path: Path, argument: str) -> Any:
    """Import a user's Python file under a private name, leaving no other trace in ``sys.modules``.

    The module's name is derived from its path and content (``segability_user_<stem>_<hash>``),
    so an edited file is imported anew and no name a user's own code could import is taken; it
    stays registered because dataclasses and pickling look classes up by module name. The
    neighbour modules the file imports (``from mynet import UNet``) and ``sys.path`` are restored
    to what they were: a generic neighbour name (``model``, ``utils``) does not shadow another
    module of the same name later in the session.
    """
    resolved = path.resolve()
    digest = hashlib.sha1(str(resolved).encode() + resolved.read_bytes()).hexdigest()[:10]
    module_name = f"segability_user_{re.sub(r'[^0-9A-Za-z_]', '_', resolved.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise UsageError(argument=argument, message=f"{argument}: cannot import {path} as a Python file")
    module = importlib.util.module_from_spec(spec)
    before = set(sys.modules)
    sys.modules[module_name] = module
    # A factory file often imports its neighbours (``from mynet import UNet``).
    folder = str(resolved.parent)
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(argument=argument, message=f"{argument}: importing {path} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)
        for name in set(sys.modules) - before:
            if name != module_name and _from_folder(sys.modules[name], resolved.parent):
                del sys.modules[name]
        if sys.exc_info()[0] is not None:
            sys.modules.pop(module_name, None)
    return module


def _from_folder(module: Any, folder: Path) -> bool:
    """Whether ``module`` was loaded from a file inside ``folder`` (a user's neighbour module)."""
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().is_relative_to(folder)


def load_callable(spec: str, *, argument: str = "model") -> Callable[..., Any]:
    """Resolve ``path/to/file.py:name`` or ``package.module:name`` to the named callable.

    The name may be dotted (``module:Class.create``). A file is imported under a private module
    name, with its folder on ``sys.path`` while it runs (so it can import its neighbours).

    Args:
        spec: the spec string.
        argument: the argument the spec came from, used in messages.

    Returns:
        The callable (a function, class or any object with ``__call__``).

    Raises:
        ValueError: a malformed spec, a missing file or module, an import error, or a name that
            does not exist or is not callable.

    Example:
        >>> load_callable("json:dumps")({"a": 1})
        '{"a": 1}'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError(argument=argument, message=f"{argument} must be 'path/to/file.py:name' or 'package.module:name', got {spec!r}")
    target, name = _split_spec(spec.strip())
    if name is None or not name:
        raise UsageError(
            argument=argument, message=f"{argument}: {spec!r} names no callable; expected 'path/to/file.py:name' or 'package.module:name'"
        )
    if not _NAME.match(name):
        raise UsageError(argument=argument, message=f"{argument}: {name!r} in {spec!r} is not a Python name")
    looks_like_file = target.endswith(".py") or "/" in target or os.sep in target
    if looks_like_file:
        path = Path(target).expanduser()
        if not path.is_file():
            raise UsageError(argument=argument, message=f"{argument}: file {target!r} not found (from {spec!r})")
        module = _import_file(path, argument)
    else:
        if not _NAME.match(target):
            raise UsageError(argument=argument, message=f"{argument}: {target!r} in {spec!r} is neither a .py file nor a module name")
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise UsageError(argument=argument, message=f"{argument}: cannot import module {target!r}: {exc}") from exc
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            public = sorted(n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n, None)))
            raise UsageError(argument=argument, message=f"{argument}: {target!r} has no {name!r}; callables there: {public[:15]}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(argument=argument, message=f"{argument}: {name!r} in {target!r} is a {type(obj).__name__}, not a callable")
    return obj


def parse_model_args(items: Sequence[str] | None, *, argument: str = "model_args") -> dict[str, Any]:
    """Parse ``key=value`` strings into factory keyword arguments.

    Values are read as JSON or Python literals (numbers, booleans, lists, tuples, ``None``) when
    they parse, else kept as strings. Nothing is evaluated.

    Example:
        >>> parse_model_args(["channels=[16, 32]", "dropout=0.1", "norm=batch", "bias=true"])
        {'channels': [16, 32], 'dropout': 0.1, 'norm': 'batch', 'bias': True}
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(argument=argument, message=f"{argument} must be key=value with a Python name as key, got {item!r}")
        raw = raw.strip()
        try:
            value = json.loads(raw)
        except ValueError:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
        out[key] = value
    return out


def parse_shape(text: str | Sequence[int], *, argument: str = "example_shape") -> tuple[int, ...]:
    """``"1,1,128,128"`` (or ``"1x1x128x128"``) -> ``(1, 1, 128, 128)``; every entry a positive int.

    Example:
        >>> parse_shape("1,1,64,64")
        (1, 1, 64, 64)
    """
    parts = re.split(r"[,x\s]+", text.strip()) if isinstance(text, str) else list(text)
    try:
        shape = tuple(int(p) for p in parts if p != "")
    except (TypeError, ValueError):
        raise UsageError(argument=argument, message=f"{argument} must be comma-separated positive integers, got {text!r}") from None
    if not shape or any(s < 1 for s in shape):
        raise UsageError(argument=argument, message=f"{argument} must be comma-separated positive integers, got {text!r}")
    return shape


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _find_state_dict(obj: Any, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """The state dict in ``obj``: itself, or under one of ``CHECKPOINT_KEYS`` (two levels deep at most)."""
    if isinstance(obj, nn.Module) and not isinstance(obj, torch.jit.ScriptModule):
        return obj.state_dict()
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping) and depth < 2:
        for key in CHECKPOINT_KEYS:
            if key in obj:
                found = _find_state_dict(obj[key], depth + 1)
                if found is not None:
                    return found
    return None


def _extract_state_dict(obj: Any, path: Path, argument: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.jit.ScriptModule):
        raise UsageError(argument=argument, message=f"{argument}: {path} is a TorchScript module. {TORCHSCRIPT_HELP}")
    found = _find_state_dict(obj)
    if found is not None:
        return found
    if isinstance(obj, Mapping):
        keys = sorted(map(str, obj))
        shown = ", ".join(repr(k) for k in keys[:15]) + (f" and {len(keys) - 15} more" if len(keys) > 15 else "")
        raise UsageError(
            argument=argument, message=f"{argument}: {path} is a dict without a state dict; its top-level keys are {shown}. "
            "Understood: a state dict itself (tensors by parameter name), or a checkpoint holding one under "
            f"{', '.join(repr(k) for k in CHECKPOINT_KEYS)} (nnU-Net: 'network_weights'; Lightning: 'state_dict'; "
            "MONAI bundles: the state dict itself or 'model'); wrapper prefixes "
            f"{', '.join(repr(p) for p in WRAPPER_PREFIXES)} are removed. Otherwise save the weights alone with "
            "torch.save(model.state_dict(), 'weights.pt')"
        )
    raise UsageError(argument=argument, message=f"{argument}: {path} holds a {type(obj).__name__}, expected a state dict (parameter name -> tensor)")


def _check_torch_file(path: Path, argument: str) -> None:
    """Refuse what is not a ``torch.save`` file before ``torch.load`` guesses at it.

    ``torch.save`` writes a zip archive (``PK\\x03\\x04``) or, in the legacy format, a pickle
    (protocol 2 or later: the byte ``\\x80`` first). Anything else, a text file say, is not a
    weights file, and ``torch.load`` would report it as a pickle problem (and so suggest
    ``--trust-pickle``, which cannot help). Special files (a FIFO would block, ``/dev/zero`` never
    ends) are refused by name.
    """
    try:
        info = os.stat(path)
    except OSError as exc:
        raise UsageError(argument=argument, message=f"{argument}: {path} cannot be opened: {exc.strerror or exc}") from None
    if not stat.S_ISREG(info.st_mode):
        from segability.io.intake import _file_kind

        raise UsageError(argument=argument, message=f"{argument}: {path} is {_file_kind(path, info.st_mode)}, not a regular file")
    with path.open("rb") as f:
        head = f.read(16)
    if not head:
        raise UsageError(argument=argument, message=f"{argument}: {path} is empty, not a PyTorch weights file")
    if not (head.startswith(ZIP_MAGIC) or head[:1] == PICKLE_MAGIC):
        raise UsageError(
            argument=argument, message=f"{argument}: {path} is not a PyTorch weights file (it starts with {head!r}; torch.save writes "
            "a zip archive, which starts with b'PK\\x03\\x04', or a pickle, which starts with b'\\x80')"
        )


def _numpy_globals() -> list[Any]:
    """NumPy scalars and dtypes, for ``weights_only`` loading: nnU-Net's checkpoints log ``np.float64``.

    Rebuilding a NumPy scalar from its dtype and bytes runs no code from the file. The scalar
    function is listed under both of its module names (NumPy 1 writes ``numpy.core``, NumPy 2
    ``numpy._core``), so a file written with either loads.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    scalar = core.multiarray.scalar
    dtypes = {type(np.dtype(code)) for code in np.typecodes["All"]}
    return [
        (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype, *dtypes,
    ]  # fmt: skip


def _torch_load(path: Path, argument: str, trust_pickle: bool) -> Any:
    """``torch.load`` with ``weights_only=True`` (NumPy scalars allowed); a full unpickle only when trusted."""
    _check_torch_file(path, argument)
    if is_torchscript_file(path):
        raise UsageError(argument=argument, message=f"{argument}: {path} is a TorchScript archive (torch.jit.save). {TORCHSCRIPT_HELP}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UsageError(
                argument=argument, message=f"{argument}: {path} holds pickled Python objects beyond tensors (for example a whole "
                f"model saved with torch.save(model)); {PICKLE_HELP}"
            ) from exc
    except Exception as exc:
        raise UsageError(argument=argument, message=f"{argument}: cannot read {path} as a PyTorch file: {type(exc).__name__}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(argument=argument, message=f"{argument}: unpickling {path} failed: {type(exc).__name__}: {exc}") from exc


def load_state_dict(
    weights: str | os.PathLike, *, trust_pickle: bool = False, argument: str = "weights"
) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``torch.save`` file, with ``weights_only=True``.

    Accepted contents: a state dict; a checkpoint dict holding one under ``state_dict``,
    ``model_state_dict``, ``network_weights`` (nnU-Net), ``model``, ``net``, ``network``,
    ``model_state`` or ``weights`` (also one level further down); with ``trust_pickle=True`` also a
    whole pickled model (its ``state_dict()`` is taken). NumPy scalars in the checkpoint (nnU-Net's
    logs) are allowed without ``trust_pickle``.

    Raises:
        ValueError: a missing or unreadable file, a TorchScript archive, pickled objects without
            ``trust_pickle``, or contents without a state dict.

    Example:
        >>> import torch, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"state_dict": {"weight": torch.ones(2)}}, path)
        >>> load_state_dict(path)
        {'weight': tensor([1., 1.])}
    """
    path = Path(weights).expanduser()
    if not os.path.lexists(path):
        raise UsageError(argument=argument, message=f"{argument}: file {str(weights)!r} not found")
    return _extract_state_dict(_torch_load(path, argument, trust_pickle), path, argument)


def _readings(state: dict[str, torch.Tensor], levels: int = 3) -> list[dict[str, torch.Tensor]]:
    """The readings of a state dict's keys: as saved, then with wrapper prefixes removed.

    Prefixes nest (``module.model.`` from DDP around a Lightning module), so they are removed up to
    ``levels`` times. A prefix that only some keys carry selects those keys: a Lightning module's
    ``model.*`` beside its loss's own ``criterion.*`` buffers.
    """
    out, frontier = [state], [state]
    for _ in range(levels):
        nxt = []
        for reading in frontier:
            for prefix in WRAPPER_PREFIXES:
                inner = {k[len(prefix) :]: v for k, v in reading.items() if k.startswith(prefix)}
                if inner:
                    nxt.append(inner)
        out += nxt
        frontier = nxt
    return out


def _apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], weights: str | os.PathLike) -> None:
    own = model.state_dict()
    candidates = _readings(state)
    for candidate in candidates:
        if set(candidate) == set(own) and all(candidate[k].shape == own[k].shape for k in own):
            model.load_state_dict(candidate, strict=True)
            return
    # Report against the reading of the keys that matches the model best (the first on a tie): a
    # model whose own names start with "model." must not be compared with the names unwrapped.
    best = max(candidates, key=lambda c: len(set(c) & set(own)))
    wrong = [f"{k}: {tuple(best[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in own if k in best and best[k].shape != own[k].shape]
    missing = [k for k in own if k not in best]
    unexpected = [k for k in best if k not in own]
    problems = [
        _listing(wrong, "key with another shape", "keys with other shapes"),
        _listing(missing, "key of the model missing from the file", "keys of the model missing from the file"),
        _listing(unexpected, "key in the file that the model does not have", "keys in the file that the model does not have"),
    ]
    raise UsageError(
        f"weights: {weights} does not fit the model built by the factory: "
        f"{'; '.join(p for p in problems if p)}; check the factory's arguments (model_args)",
        argument="weights",
    )


def _listing(items: list[str], one: str, many: str, shown: int = 5) -> str:
    """``"2 keys ...: a, b"``; the first ``shown`` items and how many more; empty for none."""
    if not items:
        return ""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return f"{len(items)} {one if len(items) == 1 else many}: {', '.join(items[:shown])}{more}"


def load_model(
    spec: str | Callable[..., nn.Module] | nn.Module,
    weights: str | os.PathLike | None = None,
    *,
    trust_pickle: bool = False,
    device: str | torch.device = "cpu",
    model_args: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Build a model from a factory spec (or callable), load its weights, move it to ``device``.

    Args:
        spec: ``path/to/file.py:factory`` or ``package.module:factory`` (called with
            ``**model_args``); a callable factory; an ``nn.Module``; or the path of a whole pickled
            model (``torch.save(model)``), which needs ``trust_pickle=True``.
        weights: a ``torch.save`` file with the state dict (or a checkpoint holding it under
            ``state_dict`` / ``model`` / ...). Keys wrapped by ``DataParallel`` (``module.``) or a
            Lightning module (``model.``) are unwrapped when that makes them fit.
        trust_pickle: allow unpickling arbitrary objects (a whole model). Only for trusted files:
            unpickling can execute arbitrary code.
        device: where the model goes.
        model_args: keyword arguments of the factory.

    Returns:
        The model, in eval mode, on ``device``.

    Raises:
        ValueError: a bad spec, a factory that does not return an ``nn.Module``, a TorchScript
            model, a pickled file without ``trust_pickle``, or weights that do not fit (messages
            name ``--model`` / ``--weights``).

    Example:
        >>> net = load_model("torch.nn:Conv2d", model_args={"in_channels": 1, "out_channels": 2, "kernel_size": 1})
        >>> type(net).__name__
        'Conv2d'
    """
    kwargs = dict(model_args or {})
    if isinstance(spec, nn.Module):
        if kwargs:
            raise UsageError(argument="model_args", message="model_args: arguments are given but the model is already built")
        model = spec
    elif callable(spec):
        model = _call_factory(spec, kwargs, getattr(spec, "__name__", type(spec).__name__))
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        target, name = _split_spec(text)
        if name is None:
            model = _load_pickled_model(Path(target).expanduser(), trust_pickle, kwargs)
        else:
            model = _call_factory(load_callable(text, argument="model"), kwargs, text)
    else:
        raise UsageError(argument="model", message=f"model must be a spec 'file.py:factory', a callable or an nn.Module, got {type(spec).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(argument="model", message=f"model: the factory returned a TorchScript module. {TORCHSCRIPT_HELP}")
    if weights is not None:
        _apply_state_dict(model, load_state_dict(weights, trust_pickle=trust_pickle), weights)
    return model.to(device).eval()


def _call_factory(factory: Callable[..., Any], kwargs: dict[str, Any], label: str) -> nn.Module:
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise UsageError(
            argument="model", message=f"model: calling {label} with arguments {kwargs} failed: {type(exc).__name__}: {exc} (see model_args)"
        ) from exc
    if isinstance(model, torch.jit.ScriptModule):
        raise UsageError(argument="model", message=f"model: {label} returned a TorchScript module. {TORCHSCRIPT_HELP}")
    if not isinstance(model, nn.Module):
        raise UsageError(argument="model", message=f"model: {label} returned a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _load_pickled_model(path: Path, trust_pickle: bool, kwargs: dict[str, Any]) -> nn.Module:
    if path.suffix == ".py":
        raise UsageError(argument="model", message=f"model: {path} is a Python file; name its factory too, as '{path}:factory_name'")
    if not path.is_file():
        raise UsageError(
            argument="model", message=f"model: {str(path)!r} is neither 'path/to/file.py:factory', 'package.module:factory' nor an existing model file"
        )
    if kwargs:
        raise UsageError(argument="model_args", message="model_args: arguments go to a factory; a saved model file takes none")
    _check_torch_file(path, "--model")
    if is_torchscript_file(path):
        raise UsageError(argument="model", message=f"model: {path} is a TorchScript archive (torch.jit.save). {TORCHSCRIPT_HELP}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust_pickle:
            raise UsageError(argument="model", message=f"model: {path} is a whole pickled model (torch.save(model)); {PICKLE_HELP}") from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as inner:
            raise UsageError(argument="model", message=f"model: unpickling {path} failed: {type(inner).__name__}: {inner}") from inner
    except Exception as exc:
        raise UsageError(argument="model", message=f"model: cannot read {path} as a PyTorch file: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        raise UsageError(
            argument="model", message=f"model: {path} holds weights (a state dict or checkpoint), not a model; give the architecture "
            f"as --model file.py:factory and this file as --weights"
        )
    raise UsageError(argument="model", message=f"model: {path} holds a {type(obj).__name__}, expected a torch.nn.Module")
