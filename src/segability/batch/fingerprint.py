"""What makes two batch runs the same run: everything that changes a result, and how to name a change.

A resumed run adds its images to the tables of the earlier one, so it must use the same model, the
same inputs and the same options. The fingerprint (``shards/run.json``) holds:

- the analysis options, :meth:`AnalysisConfig.fingerprint` (``layers`` as the resolved names);
- the model spec (a ``.py`` file by its name), ``model_args``, and the sha256 of the model file (the
  ``.py`` file, the module's source file, or a pickled model), or of the state dict of a model object;
- the weights file's sha256;
- the preprocessing (a mapping as it is; a config or ``.py`` file by its sha256);
- the inputs: the image file names, the labels folder (resolved), ``label_suffix`` and the label
  file paired with each image.

Files are compared by content: a moved weights file with the same bytes is the same run; an
edited one is not. Label files are compared by name, not content (reading every label up front
would cost as much as the run).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segability.analysis.config import AnalysisConfig, describe
from segability.batch.shards import Item

__all__ = ["run_fingerprint", "changes", "file_sha256"]

_MISSING = object()


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _file(path: str | os.PathLike) -> dict[str, str]:
    return {"file": str(Path(path).resolve()), "sha256": file_sha256(path)}


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        buf = io.BytesIO()
        torch.save(tensor.detach().cpu().contiguous(), buf)
        digest.update(buf.getvalue())
    return digest.hexdigest()


def _model_entries(model: Any) -> dict[str, Any]:
    """``model`` (the spec as a reader recognises it) and ``model_file`` (its content)."""
    if isinstance(model, nn.Module):
        return {"model": type(model).__name__, "model_file": {"file": "", "sha256": _state_sha256(model)}}
    if not isinstance(model, (str, os.PathLike)):
        return {"model": describe(model), "model_file": None}
    text = os.fspath(model)
    target, sep, name = text.rpartition(":")
    if sep and Path(target).is_file():
        return {"model": f"{Path(target).name}:{name}", "model_file": _file(target)}
    if not sep and Path(text).is_file():
        return {"model": Path(text).name, "model_file": _file(text)}
    spec = importlib.util.find_spec(target.split(":")[0]) if sep and target else None
    origin = getattr(spec, "origin", None)
    source = {"file": origin, "sha256": file_sha256(origin)} if origin and Path(origin).is_file() else None
    return {"model": text, "model_file": source}


def _preprocess_entries(preprocess: Any) -> dict[str, Any]:
    if preprocess is None or isinstance(preprocess, Mapping):
        return {"preprocess": json.loads(json.dumps(preprocess, default=str)), "preprocess_file": None}
    if callable(preprocess):
        return {"preprocess": describe(preprocess), "preprocess_file": None}
    text = os.fspath(preprocess)
    path = Path(text.rpartition(":")[0] if text.rpartition(":")[0].endswith(".py") else text)
    if path.is_file():
        return {"preprocess": text.replace(str(path), path.name), "preprocess_file": _file(path)}
    return {"preprocess": text, "preprocess_file": None}


def _labels_source(labels: Any) -> Any:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        return str(Path(labels).expanduser().resolve())
    return [Path(p).name for p in labels]


def run_fingerprint(
    *,
    config: AnalysisConfig,
    layers: Sequence[str],
    model: Any,
    model_args: Mapping[str, Any],
    weights: str | os.PathLike | None,
    preprocess: Any,
    items: Sequence[Item],
    labels: Any,
    label_suffix: str,
) -> dict[str, Any]:
    """The fingerprint of a run (JSON-ready): see the module docstring for what it holds."""
    out: dict[str, Any] = {**config.fingerprint(), "layers": list(layers)}
    out.update(_model_entries(model))
    out["model_args"] = describe(dict(model_args))
    out["weights"] = None if weights is None else _file(weights)
    out.update(_preprocess_entries(preprocess))
    out["images"] = [it.image_id for it in items]
    out["labels"] = _labels_source(labels)
    out["label_suffix"] = label_suffix
    out["label_files"] = {it.image_id: Path(it.label).name if it.label else None for it in items}
    channels = {it.image_id: [Path(f).name for f in it.channels.split("\n")] for it in items if it.channels}
    if channels:  # an image of several channel files: which files (absent otherwise, as before)
        out["channel_files"] = channels
    return json.loads(json.dumps(out, default=str))


def _short(value: Any) -> str:
    if value is _MISSING:
        return "not recorded"
    if isinstance(value, dict) and "sha256" in value:
        return repr(value["file"] or f"sha256 {value['sha256'][:8]}")
    return repr(value)


def _names(values: Sequence[str], shown: int = 5) -> str:
    more = f" and {len(values) - shown} more" if len(values) > shown else ""
    return f"{list(values[:shown])}{more}"


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Each item that differs between two fingerprints, in words (empty when they match).

    Example:
        >>> changes({"labels": None, "units": True}, {"labels": "lab", "units": True})
        ["labels: None -> 'lab'"]
    """
    found = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and "sha256" in a and "sha256" in b:
            if a["sha256"] != b["sha256"]:
                found.append(f"{key}: content changed (sha256 {a['sha256'][:8]} -> {b['sha256'][:8]})")
        elif key == "images" and isinstance(a, list) and isinstance(b, list):
            added, removed = [x for x in b if x not in set(a)], [x for x in a if x not in set(b)]
            parts = ([f"{len(added)} added {_names(added)}"] if added else []) + ([f"{len(removed)} removed {_names(removed)}"] if removed else [])
            found.append(f"images: {', '.join(parts) or 'another order'}")
        elif key == "label_files" and isinstance(a, dict) and isinstance(b, dict):
            diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in b if k in a and a[k] != b[k]]
            if diff:
                found.append(f"label_files: {len(diff)} image(s) paired with another label ({'; '.join(diff[:3])}{' ...' if len(diff) > 3 else ''})")
        else:
            found.append(f"{key}: {_short(a)} -> {_short(b)}")
    return found
