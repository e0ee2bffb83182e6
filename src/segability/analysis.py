"""Stream images through a model and reduce every captured layer to SA scores at once.

:func:`analyze` is the one call a user makes on a trained network: for every image and every
chosen layer (and unit), the feature segmentation map's Dice against the label (``sa``) and against
the network's own binarised prediction (``sa_pred``, needs no label). Each batch first runs once
for the prediction (the guide); a second pass then reduces every layer's output to scores inside
its forward hook, so features never outlive their layer's step (``low_memory=False`` keeps one
batch's outputs instead and skips the second pass). Only the first ``keep_maps`` images keep their
maps.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.capture import (
    CONV_TYPES,
    FeatureRecorder,
    LayerSpec,
    eval_mode,
    first_tensor,
    resolve_layers,
)
from segability.core.functional import (
    class_logits,
    class_weights,
    dice_from_counts,
    protoseg_units,
    prototypes_from_weights,
)
from segability.core.reduction import score_layer
from segability.core.resize import resize

__all__ = [
    "output_tensor",
    "label_target",
    "layer_features",
    "progress_bar","SAResult", "analyze", "load_result", "tokens_to_grid", "model_probabilities"]

INPUT = "input"
RESULT_FILES = ("layers.parquet", "images.parquet", "units.parquet", "settings.json", "maps.npz")
BEST_UNITS_KEPT = 3

OutputKind = Literal["auto", "sigmoid", "softmax", "probabilities"]
GuideKind = Literal["prediction", "label"]


# ------------------------------------------------------------------------------------ results
@dataclass
class SAResult:
    """Tables of an analysis (column names are a contract; see ``docs/architecture.md``).

    Attributes:
        layers: one row per image and layer: image, layer, depth, channels, shape, sa, sa_pred, reason.
        images: one row per image: image, dice, mean_sa, mean_sa_pred, input_sa, input_sa_pred,
            reason, plus caller metadata columns.
        units: one row per image, layer and unit (when units were analysed): image, layer, unit,
            sa, sa_pred.
        maps: kept maps by image id: ``{"image", "label", "prediction", "layers": {layer: map},
            "units": {layer: {unit: map}}}``.
        settings: the run's settings.
    """

    layers: pd.DataFrame
    images: pd.DataFrame
    units: pd.DataFrame | None = None
    maps: dict[str, dict[str, Any]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def layer_summary(self) -> pd.DataFrame:
        """Mean, standard deviation and count of ``sa`` and ``sa_pred`` per layer, in forward order."""
        g = self.layers.groupby(["depth", "layer"], sort=True)[["sa", "sa_pred"]]
        out = g.agg(["mean", "std", "count"])
        out.columns = [f"{a}_{b}" for a, b in out.columns]
        return out.reset_index()

    def save(self, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the result folder (``layers.parquet``, ``images.parquet``, ``units.parquet``,
        ``settings.json``, ``maps.npz``).

        Raises:
            FileExistsError: when the folder already holds result files and ``overwrite`` is False.
        """
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        existing = [f for f in RESULT_FILES if (path / f).exists()]
        if existing and not overwrite:
            raise FileExistsError(
                f"{path} already holds results ({', '.join(existing)}); pass overwrite=True "
                "(--force on the command line) to replace them, or choose another folder"
            )
        for name in existing:
            (path / name).unlink()
        _atomic_parquet(self.layers, path / "layers.parquet")
        _atomic_parquet(self.images, path / "images.parquet")
        if self.units is not None:
            _atomic_parquet(self.units, path / "units.parquet")
        _atomic_write(path / "settings.json", json.dumps(self.settings, indent=2, default=str).encode())
        if self.maps:
            arrays = {"image_ids": np.array(list(self.maps), dtype=str)}
            for k, entry in enumerate(self.maps.values()):
                for key in ("image", "label", "prediction"):
                    if entry.get(key) is not None:
                        arrays[f"{k}:{key}"] = entry[key]
                for layer, arr in entry.get("layers", {}).items():
                    arrays[f"{k}:layer:{layer}"] = arr
                for layer, units in entry.get("units", {}).items():
                    for unit, arr in units.items():
                        arrays[f"{k}:unit:{layer}:{unit}"] = arr
            tmp = path / ".maps.npz.tmp.npz"
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path / "maps.npz")
        return path


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def load_result(directory: str | os.PathLike) -> SAResult:
    """Read a result folder written by :meth:`SAResult.save`.

    Raises:
        FileNotFoundError: when ``layers.parquet`` or ``images.parquet`` is missing.
    """
    path = Path(directory)
    for required in ("layers.parquet", "images.parquet"):
        if not (path / required).exists():
            raise FileNotFoundError(f"{path} is not a segability result folder: {required} is missing")
    units = pd.read_parquet(path / "units.parquet") if (path / "units.parquet").exists() else None
    settings = json.loads((path / "settings.json").read_text()) if (path / "settings.json").exists() else {}
    maps: dict[str, dict[str, Any]] = {}
    if (path / "maps.npz").exists():
        with np.load(path / "maps.npz") as npz:
            ids = [str(i) for i in npz["image_ids"]]
            maps = {i: {"image": None, "label": None, "prediction": None, "layers": {}, "units": {}} for i in ids}
            for key in npz.files:
                if key == "image_ids":
                    continue
                k, kind, *rest = key.split(":", 2)
                entry = maps[ids[int(k)]]
                if kind == "layer":
                    entry["layers"][rest[0]] = npz[key]
                elif kind == "unit":
                    layer, unit = rest[0].rsplit(":", 1)
                    entry["units"].setdefault(layer, {})[int(unit)] = npz[key]
                else:
                    entry[kind] = npz[key]
    return SAResult(
        layers=pd.read_parquet(path / "layers.parquet"),
        images=pd.read_parquet(path / "images.parquet"),
        units=units,
        maps=maps,
        settings=settings,
    )


# ------------------------------------------------------------------------------------- inputs
@dataclass
class _Batch:
    images: torch.Tensor
    labels: torch.Tensor | None
    ids: list[str]
    masks: torch.Tensor | None = None
    given: list[bool] | None = None  # per image: the id came from the caller (must be unique)


def _image_id(image: Any, fallback: str) -> str:
    meta = getattr(image, "meta", None)
    if isinstance(meta, dict) and meta.get("filename_or_obj"):
        name = meta["filename_or_obj"]
        if isinstance(name, (list, tuple)):
            name = name[0]
        return os.path.basename(str(name))
    return fallback


def _split_item(item: Any) -> tuple[torch.Tensor, torch.Tensor | None, str | None]:
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"dict items must have an 'image' key, got keys {sorted(item)}")
        ident = item.get("id")
        return item["image"], item.get("label"), None if ident is None else str(ident)
    if isinstance(item, (tuple, list)):
        if len(item) not in (1, 2):
            raise ValueError(f"items must be an image or an (image, label) pair, got a sequence of {len(item)}")
        return item[0], (item[1] if len(item) == 2 else None), None
    return item, None, None


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    """A plain tensor (subclasses such as MONAI's MetaTensor are unwrapped: they slow every op)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


def _check_labels(labels: torch.Tensor, images: torch.Tensor, what: str) -> None:
    """Labels (B, *S), (B, 1, *S) or one-hot (B, K, *S) for images (B, C, *S)."""
    spatial = tuple(images.shape[2:])
    shape = tuple(labels.shape)
    if shape[0] != images.shape[0]:
        raise ValueError(
            f"images and labels have different counts: {images.shape[0]} images, {shape[0]} labels{what}"
        )
    if shape[1:] != spatial and shape[2:] != spatial:
        raise ValueError(
            f"labels{what} must have the images' spatial shape {spatial}, as (N, *spatial), "
            f"(N, 1, *spatial) or one-hot (N, K, *spatial); got labels {shape} for images {tuple(images.shape)}"
        )


def _batches(
    images: Any,
    labels: Any,
    ids: Sequence[str] | None,
    mask: Any,
    batch_size: int,
) -> Iterator[_Batch]:
    """Normalise every accepted input form into batches of same-shaped images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = _as_tensor(images, "images")
        if images.ndim < 3:
            raise ValueError(f"images must have shape (N, C, *spatial), got {tuple(images.shape)}")
        n = images.shape[0]
        if labels is not None:
            labels = _as_tensor(labels, "labels")
            _check_labels(labels, images, "")
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids must have one entry per image: {n} images, {len(ids)} ids")
        if isinstance(mask, (torch.Tensor, np.ndarray)):
            mask = _as_tensor(mask, "mask")
            if tuple(mask.shape) != (n, 1, *images.shape[2:]):
                raise ValueError(
                    f"mask must have shape {(n, 1, *images.shape[2:])} (one channel per image), got {tuple(mask.shape)}"
                )
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            batch_ids = [str(i) for i in (ids[sl] if ids is not None else range(s, min(n, s + batch_size)))]
            yield _Batch(
                images[sl],
                None if labels is None else labels[sl],
                batch_ids,
                mask[sl] if isinstance(mask, torch.Tensor) else None,
                [ids is not None] * len(batch_ids),
            )
        return
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        raise ValueError("a mask tensor goes with an images tensor; for iterables give mask='nonzero' or a callable")
    if isinstance(images, torch.utils.data.DataLoader):
        if labels is not None:
            raise ValueError("with a DataLoader, labels come from the loader's items, not the labels argument")
        count = 0
        for item in images:
            x, y, ident = _split_item(item)
            batch_ids = _loader_ids(item, x, count, x.shape[0] if isinstance(x, torch.Tensor) else 0)
            x = _as_tensor(x, "images")
            if x.ndim < 3:
                raise ValueError(f"DataLoader batches must have shape (B, C, *spatial), got {tuple(x.shape)}")
            b = x.shape[0]
            if y is not None:
                y = _as_tensor(y, "labels")
                _check_labels(y, x, f" (DataLoader batch of images {count}..{count + b - 1})")
            given = isinstance(item, dict) and item.get("id") is not None
            count += b
            yield _Batch(x, y, batch_ids, None, [given] * b)
        return
    if not isinstance(images, Iterable):
        raise ValueError(f"images must be a tensor, an iterable of tensors or a DataLoader, got {type(images).__name__}")
    label_iter = iter(labels) if labels is not None else None
    pending: list[tuple[torch.Tensor, torch.Tensor | None, str, bool]] = []
    index = 0
    for item in images:
        x, y, ident = _split_item(item)
        name = ident or (ids[index] if ids is not None else _image_id(x, str(index)))
        given = ident is not None or ids is not None
        x = _as_tensor(x, f"images[{index}]")
        if x.ndim < 2:
            raise ValueError(f"images[{index}] must have shape (C, *spatial), got {tuple(x.shape)}")
        if label_iter is not None:
            try:
                y = _as_tensor(next(label_iter), f"labels[{index}]")
            except StopIteration:
                raise ValueError(f"images and labels have different counts: no label for image {index}") from None
        elif y is not None:
            y = _as_tensor(y, f"labels[{index}]")
        if y is not None:
            y = y.unsqueeze(0) if y.ndim == x.ndim - 1 else y
            _check_labels(y.unsqueeze(0), x.unsqueeze(0), f"[{index}]")
        key = (tuple(x.shape), None if y is None else tuple(y.shape))
        if pending and (_key(pending[0]) != key or len(pending) >= batch_size):
            yield _stack(pending)
            pending = []
        pending.append((x, y, str(name), given))
        index += 1
    if label_iter is not None and next(label_iter, None) is not None:
        raise ValueError(f"images and labels have different counts: {index} images and more labels")
    if pending:
        yield _stack(pending)


def _key(item: tuple[torch.Tensor, torch.Tensor | None, str, bool]) -> tuple:
    return (tuple(item[0].shape), None if item[1] is None else tuple(item[1].shape))


def _loader_ids(item: Any, x: Any, start: int, b: int) -> list[str]:
    if isinstance(item, dict) and item.get("id") is not None:
        raw = item["id"]
        return [str(v) for v in (raw if isinstance(raw, (list, tuple)) else raw.tolist())]
    meta = getattr(x, "meta", None)
    if isinstance(meta, dict) and "filename_or_obj" in meta:
        names = meta["filename_or_obj"]
        names = names if isinstance(names, (list, tuple)) else [names] * b
        if len(names) == b:
            return [os.path.basename(str(n)) for n in names]
    return [str(i) for i in range(start, start + b)]


def _stack(items: list[tuple[torch.Tensor, torch.Tensor | None, str, bool]]) -> _Batch:
    xs = torch.stack([i[0] for i in items])
    ys = None if items[0][1] is None else torch.stack([i[1] for i in items])
    return _Batch(xs, ys, [i[2] for i in items], None, [i[3] for i in items])


class _IdBook:
    """Image ids of one run: ids given by the caller must be unique; derived ones get a suffix."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def add(self, name: str, given: bool) -> str:
        if name in self.seen:
            if given:
                raise ValueError(f"image id {name!r} appears twice: image ids must be unique")
            k = 2
            while f"{name}#{k}" in self.seen:
                k += 1
            name = f"{name}#{k}"
        self.seen.add(name)
        return name


# ------------------------------------------------------------------------------------ outputs
def output_tensor(out: Any, output_key: str | None = None) -> torch.Tensor:
    """The tensor of a model output: itself, the first of a tuple/list (deep supervision), or the
    ``output_key`` entry of a dict."""
    if isinstance(out, dict):
        if output_key is None or output_key not in out:
            raise ValueError(f"the model returns a dict: give output_key, one of {sorted(map(str, out))}")
        out = out[output_key]
    elif isinstance(out, (tuple, list)):
        out = first_tensor(out)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model output must be a tensor (or tuple/list/dict of tensors), got {type(out).__name__}")
    return out


def model_probabilities(
    out: Any, output: OutputKind = "auto", target: int = 1, output_key: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Turn a model output into the target's probability map and binarised prediction.

    Args:
        out: the model's output: a tensor (B, K, *S); a tuple/list (deep supervision: the first
            element is used); or a dict (``output_key`` picks the entry).
        output: "sigmoid" for one-channel logits (default when K == 1), "softmax" for K-channel
            logits (default when K > 1), "probabilities" when the model already returns them.
        target: the class of interest for K > 1.
        output_key: the key of a dict output.

    Returns:
        ``(probability (B, 1, *S), prediction (B, 1, *S) 0/1, K)``. For K > 1 the prediction is
        ``argmax == target``; for K == 1 it is ``probability > 0.5``.
    """
    out = output_tensor(out, output_key)
    if out.ndim < 3:
        raise ValueError(f"the model output must have shape (B, K, *spatial), got {tuple(out.shape)}")
    k = out.shape[1]
    kind = output
    if kind == "auto":
        kind = "sigmoid" if k == 1 else "softmax"
    out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if k > 1 and not 0 <= target < k:
        raise ValueError(f"target must be a class index in [0, {k - 1}] for a {k}-channel output, got {target}")
    if kind == "sigmoid":
        if k != 1:
            prob = torch.sigmoid(out[:, target : target + 1])
            return prob, (prob > 0.5).to(prob.dtype), k
        prob = torch.sigmoid(out)
        return prob, (prob > 0.5).to(prob.dtype), k
    if kind == "softmax":
        if k == 1:
            raise ValueError("output='softmax' needs a K-channel output with K > 1; use 'sigmoid' for one channel")
        soft = torch.softmax(out, dim=1)
        return soft[:, target : target + 1], (soft.argmax(1, keepdim=True) == target).to(soft.dtype), k
    if kind == "probabilities":
        lo, hi = float(out.min()), float(out.max())
        if lo < -1e-4 or hi > 1 + 1e-4:  # NaN compares False: a NaN output is reported per image later
            raise ValueError(
                f"output='probabilities' but the model output lies in [{lo:g}, {hi:g}], not [0, 1]: "
                "give output='sigmoid' or 'softmax' for logits"
            )
        out = out.clamp(0, 1)
        if k == 1:
            return out, (out > 0.5).to(out.dtype), k
        return out[:, target : target + 1], (out.argmax(1, keepdim=True) == target).to(out.dtype), k
    raise ValueError(f'output must be "auto", "sigmoid", "softmax" or "probabilities", got {output!r}')


def label_target(label: torch.Tensor, k: int, target: int | None, target_given: bool) -> torch.Tensor:
    """Binary float32 target mask (B, 1, *S) from a label map (B, 1, *S) or one-hot labels (B, K, *S).

    A binary target (one-channel model output, no ``target`` given) needs 0/1 labels; a label map
    with more values takes ``target`` (the label value of the class of interest; None means 1).
    """
    target = 1 if target is None else int(target)
    label = label.float() if not label.is_floating_point() else label
    if label.shape[1] > 1:
        values = torch.unique(label)
        if not bool(((values == 0) | (values == 1)).all()):
            raise ValueError(
                f"one-hot labels {tuple(label.shape)} must hold only 0 and 1, got values {values[:8].tolist()}"
            )
        if not 0 <= target < label.shape[1]:
            raise ValueError(f"target {target} is not a channel of the one-hot labels {tuple(label.shape)}")
        return label[:, target : target + 1].to(torch.float32)
    values = torch.unique(label)
    binary = bool(((values == 0) | (values == 1)).all())
    if not binary and k == 1 and not target_given:
        raise ValueError(
            f"labels contain values {values[:8].tolist()} but the model has one output channel (a binary "
            "target): labels must be 0/1, or pass target=k to use the label value k as the target"
        )
    if binary and not target_given:
        return label.to(torch.float32)
    return (label == target).to(torch.float32)


def tokens_to_grid(tokens: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor | None:
    """Reshape transformer tokens (B, N, C) to a grid (B, C, *g) when N fits the input grid.

    The grid is ``spatial // p`` for a patch size p (isotropic), with or without one leading class
    token. Returns None when no patch size fits.

    Example:
        >>> import torch
        >>> tokens_to_grid(torch.zeros(2, 16, 5), (32, 32)).shape  # 8x8 patches of a 32x32 image
        torch.Size([2, 5, 4, 4])
    """
    b, n, c = tokens.shape
    for p in range(1, max(spatial) + 1):
        if any(s % p for s in spatial):
            continue
        grid = [s // p for s in spatial]
        cells = math.prod(grid)
        if cells == n:
            return tokens.transpose(1, 2).reshape(b, c, *grid)
        if cells == n - 1:
            return tokens[:, 1:].transpose(1, 2).reshape(b, c, *grid)
    return None


def _on_input_grid(grid: Sequence[int], spatial: Sequence[int]) -> bool:
    """Whether ``grid`` is the input grid reduced by one integer factor p (floor or ceil)."""
    for p in range(1, max(spatial) + 1):
        if all(g in (s // p, -(-s // p)) for g, s in zip(grid, spatial, strict=True)):
            return True
    return False


def _channels_first(feats: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """(B, C, *g) features; a channels-last output (B, *g, C) is moved when only that reading fits.

    Swin-type blocks return (B, *g, C). An output is read as channels-last only when its middle
    dimensions are the input grid reduced by one factor and its last ones are not; anything else
    (anisotropic strides included) stays channels-first.
    """
    if _on_input_grid(feats.shape[1:-1], spatial) and not _on_input_grid(feats.shape[2:], spatial):
        return feats.movedim(-1, 1)
    return feats


# ------------------------------------------------------------------------------------ analyze
def _resolve_mask(
    mask: Any, batch: _Batch, device: torch.device, size: tuple[int, ...]
) -> torch.Tensor | None:
    """The batch's mask (B, 1, *size) in [0, 1], on ``device``, at the guide's grid ``size``."""
    if mask is None:
        return None
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        m = batch.masks
    elif isinstance(mask, str) and mask == "nonzero":
        m = (batch.images != 0).any(dim=1, keepdim=True)
    elif callable(mask):
        m = mask(batch.images)
        expected = (batch.images.shape[0], 1, *batch.images.shape[2:])
        if not isinstance(m, torch.Tensor) or tuple(m.shape) != expected:
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"the mask callable must return a tensor of shape {expected}, got {got}")
    else:
        raise ValueError(f"mask must be None, 'nonzero', a tensor (N, 1, *spatial) or a callable, got {mask!r}")
    m = m.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(m).all()) or float(m.min()) < 0 or float(m.max()) > 1:
        raise ValueError("mask values must be finite and lie in [0, 1]")
    return resize(m, size)


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


@dataclass
class _Context:
    """What every layer of one batch is scored against."""

    ids: list[str]
    guide: torch.Tensor  # (B, 1, *S)
    refs: torch.Tensor  # (B, R, *S): [label,] prediction
    has_label: bool
    mask: torch.Tensor | None
    valid: list[bool]  # the model output is finite
    empty_pred: list[bool]  # valid, but nothing predicted: sa_pred is undefined
    spatial: tuple[int, ...]  # the input grid
    cache: dict = field(default_factory=dict)  # shared by the batch's layers (see score_layer)


Rows = tuple[list[dict[str, Any]], "pd.DataFrame | None"]


def _finite_per_image(t: torch.Tensor) -> torch.Tensor:
    """(B,) whether each image's values are all finite. A sum is finite when every term is (up to
    overflow), which is one cheap reduction; only a non-finite sum needs the element-wise check."""
    flat = t.flatten(1)
    finite = torch.isfinite(flat.sum(dim=1))
    if not bool(finite.all()):
        finite = torch.isfinite(flat).all(dim=1)
    return finite


def layer_features(
    output: torch.Tensor,
    batch: int,
    spatial: Sequence[int],
    reshape: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor | None, str]:
    """A layer output read as (B, C, *spatial) features, or None and why it cannot be.

    The rules of :func:`analyze`: a ``reshape`` callable first (None falls through); then outputs
    with the input's number of dims (channels-last moved to channels-first when only that reading
    fits the grid); then transformer tokens (B, N, C) on the grid ``spatial // p``.
    """
    spatial = tuple(spatial)
    if reshape is not None:
        reshaped = reshape(output)
        if reshaped is not None:
            if not isinstance(reshaped, torch.Tensor) or reshaped.ndim != len(spatial) + 2 or reshaped.shape[0] != batch:
                got = tuple(reshaped.shape) if isinstance(reshaped, torch.Tensor) else type(reshaped).__name__
                raise ValueError(
                    f"reshape must return features (B={batch}, C, *spatial) with {len(spatial)} spatial dims "
                    f"(or None), got {got} for an output {tuple(output.shape)}"
                )
            return reshaped, ""
    shape = tuple(output.shape)
    if not output.is_floating_point():
        return None, f"skipped: output {shape} is not floating point ({output.dtype})"
    if output.ndim < 3 or shape[0] != batch:
        return None, f"skipped: output {shape} is not a batch of {batch} feature maps"
    if output.ndim == len(spatial) + 2:
        return _channels_first(output, spatial), ""
    if output.ndim == 3 and len(spatial) >= 2:
        grid = tokens_to_grid(output, spatial)
        if grid is not None:
            return grid, ""
        return None, f"skipped: token output {shape} does not fit the input grid {spatial} at any patch size; give reshape="
    return None, f"skipped: output {shape} is not (B, C, *spatial) with {len(spatial)} spatial dims"


class _Analysis:
    """The state of one analyze() run: rows and kept maps, filled batch by batch."""

    def __init__(self, *, units: bool, keep_maps: int, empty: str, chunk_size: int | None, reshape: Callable | None):
        self.units = units
        self.keep_maps = keep_maps
        self.empty = empty
        self.chunk_size = chunk_size
        self.reshape = reshape
        self.layer_rows: list[dict[str, Any]] = []
        self.unit_frames: list[pd.DataFrame] = []
        self.image_rows: list[dict[str, Any]] = []
        self.maps: dict[str, dict[str, Any]] = {}
        self.depth: dict[str, int] = {INPUT: 0}
        self.failed: list[tuple[str, str]] = []
        self.reused: set[str] = set()

    def features_of(self, output: torch.Tensor, ctx: _Context) -> tuple[torch.Tensor | None, str]:
        """The layer output as (B, C, *spatial) features, or None and why it is skipped."""
        return layer_features(output, len(ctx.ids), ctx.spatial, self.reshape)

    def layer(self, name: str, output: torch.Tensor, ctx: _Context) -> Rows:
        feats, why = self.features_of(output, ctx)
        if feats is None:
            return self.skipped(name, ctx, why, _shape_str(output.shape[1:])), None
        return self.score(name, feats, ctx, tuple(output.shape[1:]))

    def skipped(self, name: str, ctx: _Context | list[str], reason: str, shape: str = "") -> list[dict[str, Any]]:
        ids = ctx.ids if isinstance(ctx, _Context) else ctx
        return [_skipped_row(image, name, self.depth.get(name, 0), reason, shape) for image in ids]

    def score(self, layer: str, feats: torch.Tensor, ctx: _Context, raw_shape: Sequence[int]) -> Rows:
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        feats = feats.to(dtype)
        finite = _finite_per_image(feats)
        if not bool(finite.all()):
            feats = torch.where(finite.view(-1, *([1] * (feats.ndim - 1))), feats, torch.zeros_like(feats))
        g, r = ctx.guide.to(dtype), ctx.refs.to(dtype)
        m = None if ctx.mask is None else ctx.mask.to(dtype)
        layer_sa, unit_sa, undefined = score_layer(
            feats, g, r, m, units=self.units, empty=self.empty, chunk_size=self.chunk_size, cache=ctx.cache
        )
        layer_sa = layer_sa.cpu().double().numpy()
        finite_l, undefined_l = finite.cpu().tolist(), undefined.cpu().tolist()
        channels, shape = int(feats.shape[1]), _shape_str(raw_shape)
        rows = []
        nan_all = np.zeros(len(ctx.ids), dtype=bool)  # rows without any score
        nan_pred = np.zeros(len(ctx.ids), dtype=bool)  # rows without sa_pred
        for i, image in enumerate(ctx.ids):
            why = ""
            if not ctx.valid[i]:
                why = "model output contains NaN or Inf"
            elif not finite_l[i]:
                why = "features contain NaN or Inf"
            elif undefined_l[i]:
                why = "guide has no target or no background: prototypes undefined"
            elif ctx.empty_pred[i]:
                why = "empty prediction: sa_pred undefined"
            nan_all[i] = not ctx.valid[i] or not finite_l[i]
            nan_pred[i] = nan_all[i] or ctx.empty_pred[i]
            rows.append(
                {
                    "image": image,
                    "layer": layer,
                    "depth": self.depth[layer],
                    "channels": channels,
                    "shape": shape,
                    "sa": math.nan if nan_all[i] or not ctx.has_label else float(layer_sa[i, 0]),
                    "sa_pred": math.nan if nan_pred[i] else float(layer_sa[i, -1]),
                    "reason": why,
                }
            )
        frame = None
        if unit_sa is not None:
            u = unit_sa.cpu().double().numpy()  # (B, R, C)
            u[nan_all] = math.nan
            u[nan_pred, -1] = math.nan
            b, _, c = u.shape
            frame = pd.DataFrame(
                {
                    "image": np.repeat(np.array(ctx.ids, dtype=object), c),
                    "layer": layer,
                    "unit": np.tile(np.arange(c), b),
                    "sa": u[:, 0].reshape(-1) if ctx.has_label else np.full(b * c, math.nan),
                    "sa_pred": u[:, -1].reshape(-1),
                }
            )
        self._keep_layer_maps(layer, feats, g, m, ctx, unit_sa)
        return rows, frame

    def start_maps(self, ctx: _Context, images: torch.Tensor, label: torch.Tensor | None, prob: torch.Tensor) -> None:
        for i, image in enumerate(ctx.ids):
            if len(self.maps) < self.keep_maps:
                self.maps[image] = {
                    "image": images[i].float().cpu().numpy(),
                    "label": None if label is None else label[i, 0].to(torch.uint8).cpu().numpy(),
                    "prediction": prob[i, 0].float().cpu().numpy(),
                    "layers": {},
                    "units": {},
                }

    def _keep_layer_maps(self, layer, feats, guide, mask, ctx: _Context, unit_sa) -> None:
        kept = [i for i, image in enumerate(ctx.ids) if image in self.maps]
        if not kept:
            return
        idx = torch.tensor(kept, device=feats.device)
        f, g = feats[idx], guide[idx]
        m = None if mask is None else mask[idx]
        weights = class_weights(g, m)
        protos = prototypes_from_weights(f, weights)
        logits = class_logits(f, protos, tuple(g.shape[2:]))
        seg = (logits[:, 1] > logits[:, 0]).to(torch.uint8).cpu().numpy()
        for j, i in enumerate(kept):
            entry = self.maps[ctx.ids[i]]
            entry["layers"][layer] = seg[j]
            if unit_sa is None or not bool(torch.isfinite(protos[j]).all()):
                continue
            scores = unit_sa[i, 0 if ctx.has_label else -1].cpu().numpy()
            order = [int(u) for u in np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable")[:BEST_UNITS_KEPT]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                maps = protoseg_units(f[j : j + 1, order], g[j : j + 1], None if m is None else m[j : j + 1])
            entry["units"][layer] = {u: maps[0, n].to(torch.uint8).cpu().numpy() for n, u in enumerate(order)}


@dataclass
class _FirstPass:
    """What the prediction pass saw of the chosen layers."""

    calls: dict[str, int]  # calls per layer
    order: list[str]  # layers in the order first called
    tensor_calls: dict[str, int] = field(default_factory=dict)  # calls whose output held a tensor
    kept: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # last output, its version
    kept_bytes: int = 0


def _first_pass(model: nn.Module, names: list[str], x: torch.Tensor, *, keep_bytes: int) -> tuple[Any, _FirstPass]:
    """Run the model once; count the chosen layers' calls and keep their last outputs while they
    fit in ``keep_bytes`` (the others are scored in a second pass)."""
    seen = _FirstPass(calls={}, order=[])

    def on_output(name: str, t: torch.Tensor) -> None:
        seen.tensor_calls[name] = seen.tensor_calls.get(name, 0) + 1
        old = seen.kept.pop(name, None)
        if old is not None:
            seen.kept_bytes -= old[0].nbytes
        size = t.nelement() * t.element_size()
        if seen.kept_bytes + size <= keep_bytes:
            seen.kept[name] = (t, t._version)
            seen.kept_bytes += size

    with FeatureRecorder(model, names, callback=on_output) as rec:
        out = model(x)
    seen.calls, seen.order = dict(rec.calls), list(rec.order)
    return out, seen


def _second_pass(
    model: nn.Module, names: list[str], x: torch.Tensor, tensor_calls: dict[str, int], state: _Analysis, ctx: _Context
) -> dict[str, Rows]:
    """Run the model again and score each layer inside its hook, on the call the first pass saw last."""
    results: dict[str, Rows] = {}
    seen: dict[str, int] = {}

    def on_output(name: str, t: torch.Tensor) -> None:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] == tensor_calls[name]:
            results[name] = state.layer(name, t, ctx)

    with FeatureRecorder(model, names, callback=on_output):
        model(x)
    for name in names:
        if name not in results:
            why = "skipped: not called in the second forward pass (the model is not deterministic)"
            results[name] = (state.skipped(name, ctx, why), None)
    return results


def analyze(
    model: nn.Module,
    images: Any,
    labels: Any = None,
    *,
    layers: LayerSpec | Literal["auto"] = "auto",
    units: bool = False,
    guide: GuideKind = "prediction",
    output: OutputKind = "auto",
    target: int | None = None,
    mask: Any = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    keep_maps: int = 0,
    output_key: str | None = None,
    reshape: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
    ids: Sequence[str] | None = None,
    metadata: pd.DataFrame | None = None,
    empty: Literal["one", "nan"] = "one",
    chunk_size: int | None = None,
    progress: bool = False,
    data: str | None = None,
    model_name: str | None = None,
    low_memory: bool = False,
    memory_budget: int = 512 * 2**20,
) -> SAResult:
    """Segmentation ability of every chosen layer (and unit) of ``model`` on ``images``.

    For each image and layer: ``sa``, the Dice of the layer's feature segmentation map against the
    label (NaN without labels), and ``sa_pred``, against the network's binarised prediction. The
    prototypes come from the network's own probability map (``guide="prediction"``, needs no
    label) or from the label (``guide="label"``). The input image itself is analysed as the layer
    ``"input"``.

    Layer outputs are read as features (B, C, *spatial). Transformer tokens (B, N, C) are put on
    the grid ``spatial // p`` when N fits it for some patch size p (one class token allowed), and
    channels-last outputs (B, *g, C), as Swin blocks return, are moved to channels-first when only
    that reading fits the input grid; a ``reshape`` callable overrides both rules. Outputs that fit
    none are skipped, with the reason in the table.

    Memory: the guide (the prediction) exists only at the end of the forward pass, so the chosen
    layers' outputs of one batch are kept (at their own, low resolution; never resized for all
    channels) until it exists, up to ``memory_budget`` bytes. Layers beyond the budget, and
    outputs the model changes in place after the layer, are scored in a second forward pass
    inside their hooks, so their features never outlive the layer's own step. ``low_memory=True``
    sets the budget to 0: every batch runs twice and no features are kept (for large 3D volumes).

    Args:
        model: any ``nn.Module`` returning (B, K, *S) logits or probabilities (or a tuple/list whose
            first element is that, or a dict with ``output_key``).
        images: a tensor (N, C, *S); an iterable of single images (C, *S), ``(image, label)`` pairs
            or dicts with "image"/"label"/"id"; or a DataLoader of batches (tensors, pairs or dicts).
            Images of different sizes are processed in separate batches; a batch the model fails on
            is recorded (``reason``) and the run goes on.
        labels: (N, *S), (N, 1, *S) label maps or one-hot (N, K, *S) labels for tensor images, or
            an iterable matching ``images``; None for label-free analysis.
        layers: "auto" (every convolution, 1D/2D/3D and transposed) or a selection (names, glob
            patterns, types, modules, predicates; see :func:`segability.capture.resolve_layers`).
            Rows and ``depth`` follow the forward order.
        units: also score every unit (channel) of every layer.
        guide: "prediction" or "label".
        output: how to read the model output: "auto", "sigmoid", "softmax" or "probabilities".
        target: the target class: the channel of a K-channel output or one-hot label, and the
            label value in a multi-class label map. Default 1; a one-channel model with labels
            other than 0/1 needs it.
        mask: pixels that shape the prototypes: None, "nonzero" (any image channel != 0), a tensor
            (N, 1, *S) for tensor images, or a callable images -> (B, 1, *S).
        batch_size: images per forward pass (for tensors and iterables).
        device: where to run; default the model's device.
        keep_maps: keep the feature segmentation maps of the first ``keep_maps`` images.
        output_key: key of a dict output.
        reshape: callable turning a layer output into (B, C, *spatial) features (e.g. transformer
            tokens), returning None to fall back to the automatic rules.
        ids: image ids for tensor / iterable inputs (default: the index); must be unique.
        metadata: extra per-image columns (must have an ``image`` column) joined to ``images``.
        empty: Dice convention for two empty maps ("one" or "nan").
        chunk_size: channels resized at once for unit maps (memory bound); automatic when None.
        progress: show a progress bar.
        data: a description of the data, stored in the settings.
        model_name: a name for the model, stored in the settings (default its class name).
        low_memory: keep no features: reduce them inside the hooks of a second forward pass.
        memory_budget: bytes of layer outputs kept from the first pass (see Memory above).

    Returns:
        :class:`SAResult`.

    Raises:
        ValueError: malformed arguments or inputs (named in the message).
        RuntimeError: when every batch failed in the model (the first error is chained).

    Example:
        >>> import torch
        >>> from monai.networks.nets import UNet
        >>> net = UNet(2, 1, 1, channels=(4, 8), strides=(2,))
        >>> res = analyze(net, torch.rand(2, 1, 32, 32))
        >>> sorted(res.layers.columns)
        ['channels', 'depth', 'image', 'layer', 'reason', 'sa', 'sa_pred', 'shape']
    """
    if guide not in ("prediction", "label"):
        raise ValueError(f'guide must be "prediction" or "label", got {guide!r}')
    if guide == "label" and labels is None and isinstance(images, (torch.Tensor, np.ndarray)):
        raise ValueError('guide="label" needs labels')
    if output not in ("auto", "sigmoid", "softmax", "probabilities"):
        raise ValueError(f'output must be "auto", "sigmoid", "softmax" or "probabilities", got {output!r}')
    if empty not in ("one", "nan"):
        raise ValueError(f'empty must be "one" or "nan", got {empty!r}')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if keep_maps < 0:
        raise ValueError(f"keep_maps must be >= 0, got {keep_maps}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("TorchScript modules cannot take forward hooks: give the Python nn.Module instead")
    target_given = target is not None
    target = 1 if target is None else int(target)
    if target < 0:
        raise ValueError(f"target must be a class index >= 0, got {target}")

    if isinstance(layers, str) and layers == "auto":
        selected = [(n, m) for n, m in model.named_modules() if n and isinstance(m, CONV_TYPES)]
        if not selected:
            raise ValueError("layers='auto' found no convolution in the model: choose layers by name or type")
    else:
        selected = resolve_layers(model, layers)
    if any(n == INPUT for n, _ in selected):
        raise ValueError(f"a model layer is named {INPUT!r}, which is reserved for the input image")
    names = [n for n, _ in selected]

    params = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (params.device if params is not None else torch.device("cpu"))
    in_dtype = params.dtype if params is not None and params.is_floating_point() else torch.float32
    state = _Analysis(units=units, keep_maps=keep_maps, empty=empty, chunk_size=chunk_size, reshape=reshape)
    book = _IdBook()
    image_order: list[str] = []
    spatial_dims = None
    first_error: BaseException | None = None
    order_known = False

    total = None
    if isinstance(images, (torch.Tensor, np.ndarray)):
        total = images.shape[0]
    elif hasattr(images, "__len__"):
        try:
            total = len(images.dataset) if isinstance(images, torch.utils.data.DataLoader) else len(images)
        except TypeError:
            total = None

    with progress_bar(progress, total) as advance, eval_mode(model), torch.no_grad():
        for batch in _batches(images, labels, ids, mask, batch_size):
            batch.ids = [book.add(i, g) for i, g in zip(batch.ids, batch.given or [False] * len(batch.ids), strict=True)]
            image_order.extend(batch.ids)
            if guide == "label" and batch.labels is None:
                raise ValueError(f'guide="label" needs labels, but images {batch.ids} came without them')
            x = batch.images.to(device=dev, dtype=in_dtype)
            spatial = tuple(x.shape[2:])
            spatial_dims = spatial_dims or len(spatial)

            try:
                out, first = _first_pass(model, names, x, keep_bytes=0 if low_memory else memory_budget)
            except Exception as exc:  # one failing batch of many is recorded, the run goes on
                first_error = first_error or exc
                why = f"model failed: {type(exc).__name__}: {exc}".replace("\n", " ")
                for image in batch.ids:
                    state.failed.append((image, why))
                    state.image_rows.append(_failed_row(image, why))
                advance(len(batch.ids))
                continue
            if not order_known:
                for d, name in enumerate(first.order, start=1):
                    state.depth[name] = d
                for name in names:
                    state.depth.setdefault(name, len(state.depth))
                order_known = True
            state.reused.update(n for n, c in first.calls.items() if c > 1)

            prob, pred, k = model_probabilities(out, output, target, output_key)
            del out
            label = None
            if batch.labels is not None:
                if tuple(prob.shape[2:]) != spatial:
                    raise ValueError(
                        f"the model output {tuple(prob.shape)} is not on the image grid {spatial}: "
                        "labels cannot be compared with it"
                    )
                lab = batch.labels.to(device=dev, dtype=torch.float32)
                lab = lab.unsqueeze(1) if lab.ndim == x.ndim - 1 else lab
                label = label_target(lab, k, target, target_given)
            finite = torch.isfinite(prob.flatten(1)).all(dim=1)
            prob = torch.nan_to_num(prob.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
            pred = pred.float() * finite.view(-1, *([1] * (pred.ndim - 1)))
            empty_pred = finite & (pred.flatten(1).sum(1) == 0)
            g = label if guide == "label" else prob
            ctx = _Context(
                ids=batch.ids,
                guide=g,
                refs=pred if label is None else torch.cat([label, pred], dim=1),
                has_label=label is not None,
                mask=_resolve_mask(mask, batch, dev, tuple(g.shape[2:])),
                valid=finite.cpu().tolist(),
                empty_pred=empty_pred.cpu().tolist(),
                spatial=spatial,
            )
            state.start_maps(ctx, batch.images, label, prob)

            results: dict[str, Rows] = {INPUT: state.score(INPUT, x, ctx, tuple(x.shape[1:]))}
            pending = []
            for name in names:
                if first.calls.get(name, 0) == 0:
                    results[name] = (state.skipped(name, ctx, "not called in the forward pass"), None)
                elif first.tensor_calls.get(name, 0) == 0:
                    results[name] = (state.skipped(name, ctx, "skipped: the layer's output holds no tensor"), None)
                elif name in first.kept and first.kept[name][0]._version == first.kept[name][1]:
                    results[name] = state.layer(name, first.kept.pop(name)[0], ctx)
                else:  # low_memory, or the output was changed in place after the layer
                    pending.append(name)
            first.kept.clear()
            if pending:
                results.update(_second_pass(model, pending, x, first.tensor_calls, state, ctx))
            for name in sorted(results, key=lambda n: state.depth[n]):
                rows, frame = results[name]
                state.layer_rows.extend(rows)
                if frame is not None:
                    state.unit_frames.append(frame)
            state.image_rows.extend(_image_rows(ctx, label, pred, empty))
            advance(len(batch.ids))

    n_images = len(image_order)
    if n_images == 0:
        raise ValueError("images is empty: nothing to analyse")
    if first_error is not None and len(state.failed) == n_images:
        raise RuntimeError(f"the model failed on every image; first error: {first_error}") from first_error
    if state.failed:
        warnings.warn(f"{len(state.failed)} of {n_images} images failed in the model; see the 'reason' column", stacklevel=2)
    if state.reused:
        warnings.warn(
            f"layers called more than once per forward pass (their last call is scored): {sorted(state.reused)}",
            stacklevel=2,
        )
    for image, why in state.failed:
        for name in (INPUT, *names):
            state.layer_rows.append(_skipped_row(image, name, state.depth[name], why))

    position = {image: i for i, image in enumerate(image_order)}
    layers_df = pd.DataFrame(state.layer_rows, columns=["image", "layer", "depth", "channels", "shape", "sa", "sa_pred", "reason"])
    layers_df = layers_df.astype({"image": str, "layer": str, "depth": int, "channels": int, "shape": str, "sa": float, "sa_pred": float, "reason": str})
    layers_df = _in_order(layers_df, position, ["depth"])
    images_df = _images_table(state.image_rows, layers_df)
    images_df = _in_order(images_df, position, [])
    if metadata is not None:
        if "image" not in metadata.columns:
            raise ValueError("metadata must have an 'image' column with the image ids")
        meta = metadata.assign(image=metadata["image"].astype(str))
        images_df = images_df.merge(meta, on="image", how="left", suffixes=("", "_meta"))
    units_df = None
    if units:
        units_df = (
            pd.concat(state.unit_frames, ignore_index=True)
            if state.unit_frames
            else pd.DataFrame(columns=["image", "layer", "unit", "sa", "sa_pred"])
        )
        units_df = units_df.astype({"image": str, "layer": str, "unit": int, "sa": float, "sa_pred": float})
        depth = units_df["layer"].map(state.depth)
        units_df = _in_order(units_df.assign(_depth=depth), position, ["_depth", "unit"]).drop(columns="_depth")
    from segability import __version__

    settings = {
        "model": model_name or type(model).__name__,
        "layers": [INPUT, *sorted(names, key=lambda n: state.depth.get(n, 0))],
        "guide": guide,
        "output": output,
        "target": target,
        "units": units,
        "spatial_dims": spatial_dims,
        "mask": mask if isinstance(mask, str) or mask is None else type(mask).__name__,
        "empty": empty,
        "batch_size": batch_size,
        "keep_maps": keep_maps,
        "low_memory": low_memory,
        "memory_budget": memory_budget,
        "n_images": n_images,
        "device": str(dev),
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
    }
    return SAResult(layers=layers_df, images=images_df, units=units_df, maps=state.maps, settings=settings)


def _in_order(df: pd.DataFrame, position: dict[str, int], by: list[str]) -> pd.DataFrame:
    """Rows by image (in the order images came), then ``by``; a fresh index."""
    keyed = df.assign(_pos=df["image"].map(position))
    return keyed.sort_values(["_pos", *by], kind="stable").drop(columns="_pos").reset_index(drop=True)


def _failed_row(image: str, reason: str) -> dict[str, Any]:
    return {"image": image, "dice": math.nan, "reason": reason}


def _skipped_row(image: str, layer: str, depth: int, reason: str, shape: str = "") -> dict[str, Any]:
    return {"image": image, "layer": layer, "depth": depth, "channels": 0, "shape": shape, "sa": math.nan, "sa_pred": math.nan, "reason": reason}


def _image_rows(ctx: _Context, label: torch.Tensor | None, pred: torch.Tensor, empty: str) -> list[dict[str, Any]]:
    if label is None:
        dice = [math.nan] * len(ctx.ids)
    else:
        p, lab = pred.flatten(1).double(), label.flatten(1).double()
        dice = dice_from_counts((p * lab).sum(1), p.sum(1), lab.sum(1), empty).cpu().tolist()
    rows = []
    for i, image in enumerate(ctx.ids):
        reason = ""
        if not ctx.valid[i]:
            reason = "model output contains NaN or Inf"
        elif ctx.empty_pred[i]:
            reason = "empty prediction: sa_pred undefined"
        rows.append({"image": image, "dice": dice[i] if ctx.valid[i] else math.nan, "reason": reason})
    return rows


def _images_table(rows: list[dict[str, Any]], layers_df: pd.DataFrame) -> pd.DataFrame:
    base = pd.DataFrame(rows, columns=["image", "dice", "reason"]).astype({"image": str, "dice": float, "reason": str})
    hidden = layers_df[layers_df["layer"] != INPUT]
    means = hidden.groupby("image", sort=False)[["sa", "sa_pred"]].mean()
    means.columns = ["mean_sa", "mean_sa_pred"]
    inputs = layers_df[layers_df["layer"] == INPUT].set_index("image")[["sa", "sa_pred"]]
    inputs.columns = ["input_sa", "input_sa_pred"]
    out = base.join(means, on="image").join(inputs, on="image")
    cols = ["image", "dice", "mean_sa", "mean_sa_pred", "input_sa", "input_sa_pred", "reason"]
    out = out[cols]
    return out.astype({c: float for c in cols if c not in ("image", "reason")})


class progress_bar:
    """A rich progress bar (``with progress_bar(True, n, "label") as advance: advance(k)``), or nothing."""

    def __init__(self, enabled: bool, total: int | None, label: str = "analysing"):
        self.enabled = enabled
        self.total = total
        self.label = label
        self._bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._bar = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._bar.__enter__()
        task = self._bar.add_task(self.label, total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
