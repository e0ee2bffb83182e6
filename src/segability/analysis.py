"""Stream images through a model and reduce every captured layer to SA scores at once.

:func:`analyze` is the one call a user makes on a trained network: for every image and every
chosen layer (and unit), the feature segmentation map's Dice against the label (``sa``) and against
the network's own binarised prediction (``sa_pred``, needs no label). Features are reduced to
scores as soon as the forward pass of a batch ends, one layer at a time; only the first
``keep_maps`` images keep their maps.
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
    prototypes_from_weights,
    protoseg_units,
    score_layer,
)

__all__ = ["SAResult", "analyze", "load_result", "tokens_to_grid", "model_probabilities"]

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
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


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
            if labels.shape[0] != n:
                raise ValueError(f"images and labels have different counts: {n} images, {labels.shape[0]} labels")
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids must have one entry per image: {n} images, {len(ids)} ids")
        if isinstance(mask, torch.Tensor) and mask.shape[0] != n:
            raise ValueError(f"mask must have one entry per image: {n} images, mask {tuple(mask.shape)}")
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            yield _Batch(
                images[sl],
                None if labels is None else labels[sl],
                [str(i) for i in (ids[sl] if ids is not None else range(s, min(n, s + batch_size)))],
                mask[sl] if isinstance(mask, torch.Tensor) else None,
            )
        return
    if isinstance(mask, torch.Tensor):
        raise ValueError("a mask tensor goes with an images tensor; for iterables give mask='nonzero' or a callable")
    if isinstance(images, torch.utils.data.DataLoader):
        if labels is not None:
            raise ValueError("with a DataLoader, labels come from the loader's items, not the labels argument")
        count = 0
        for item in images:
            x, y, ident = _split_item(item)
            x = _as_tensor(x, "images")
            b = x.shape[0]
            batch_ids = _loader_ids(item, x, count, b, ident)
            count += b
            yield _Batch(x, None if y is None else _as_tensor(y, "labels"), batch_ids)
        return
    if not isinstance(images, Iterable):
        raise ValueError(f"images must be a tensor, an iterable of tensors or a DataLoader, got {type(images).__name__}")
    label_iter = iter(labels) if labels is not None else None
    pending: list[tuple[torch.Tensor, torch.Tensor | None, str]] = []
    index = 0
    for item in images:
        x, y, ident = _split_item(item)
        x = _as_tensor(x, f"images[{index}]")
        if label_iter is not None:
            try:
                y = _as_tensor(next(label_iter), f"labels[{index}]")
            except StopIteration:
                raise ValueError(f"labels ran out before images: no label for image {index}") from None
        elif y is not None:
            y = _as_tensor(y, f"labels[{index}]")
        name = ident or (ids[index] if ids is not None else _image_id(x, str(index)))
        if pending and (pending[0][0].shape != x.shape or len(pending) >= batch_size or (pending[0][1] is None) != (y is None)):
            yield _stack(pending)
            pending = []
        pending.append((x, y, str(name)))
        index += 1
    if label_iter is not None and next(label_iter, None) is not None:
        raise ValueError(f"images and labels have different counts: {index} images and more labels")
    if pending:
        yield _stack(pending)


def _loader_ids(item: Any, x: torch.Tensor, start: int, b: int, ident: Any) -> list[str]:
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


def _stack(items: list[tuple[torch.Tensor, torch.Tensor | None, str]]) -> _Batch:
    xs = torch.stack([i[0] for i in items])
    ys = None if items[0][1] is None else torch.stack([_label_with_channel(i[1], i[0]) for i in items])
    return _Batch(xs, ys, [i[2] for i in items])


def _label_with_channel(label: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    return label.unsqueeze(0) if label.ndim == image.ndim - 1 else label


# ------------------------------------------------------------------------------------ outputs
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
    if isinstance(out, dict):
        if output_key is None or output_key not in out:
            raise ValueError(f"the model returns a dict: give output_key, one of {sorted(map(str, out))}")
        out = out[output_key]
    elif isinstance(out, (tuple, list)):
        out = first_tensor(out)
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"the model output must be a tensor (or tuple/list/dict of tensors), got {type(out).__name__}")
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
        if k == 1:
            return out, (out > 0.5).to(out.dtype), k
        return out[:, target : target + 1], (out.argmax(1, keepdim=True) == target).to(out.dtype), k
    raise ValueError(f'output must be "auto", "sigmoid", "softmax" or "probabilities", got {output!r}')


def _label_target(label: torch.Tensor, k: int, target: int | None, target_given: bool) -> torch.Tensor:
    """Binary target mask (B, 1, *S) from a label map (B, 1, *S) or one-hot (B, K, *S)."""
    if label.ndim >= 2 and label.shape[1] > 1:
        if not 0 <= (target or 0) < label.shape[1]:
            raise ValueError(f"target {target} is not a channel of the one-hot labels {tuple(label.shape)}")
        return (label[:, target : target + 1] > 0.5).float()
    values = torch.unique(label)
    binary = bool(((values == 0) | (values == 1)).all())
    if binary and (k == 1 or not target_given or target == 1):
        return (label > 0.5).float()
    if not binary and k == 1 and not target_given:
        shown = values[:8].tolist()
        raise ValueError(
            f"labels contain values {shown} but the model has one output channel (a binary target): "
            "pass target=k to use the label value k as the target"
        )
    return (label == target).float()


def tokens_to_grid(tokens: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor | None:
    """Reshape transformer tokens (B, N, C) to a grid (B, C, *g) when N fits the input grid.

    The grid is ``spatial // p`` for a patch size p (isotropic), with or without one leading class
    token. Returns None when no patch size fits.
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


# ------------------------------------------------------------------------------------ analyze
def _resolve_mask(mask: Any, batch: _Batch, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        return batch.masks.to(device=device, dtype=torch.float32)
    if mask == "nonzero":
        return (batch.images != 0).any(dim=1, keepdim=True).to(device=device, dtype=torch.float32)
    if callable(mask):
        return mask(batch.images).to(device=device, dtype=torch.float32)
    raise ValueError(f"mask must be None, 'nonzero', a tensor (N, 1, *spatial) or a callable, got {mask!r}")


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(str(int(s)) for s in shape)


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

    def features_of(self, name: str, tensors: list[torch.Tensor], spatial: Sequence[int]) -> tuple[torch.Tensor | None, str]:
        reason = f"called {len(tensors)} times in one forward pass; the last call is scored" if len(tensors) > 1 else ""
        feats = tensors[-1]
        if self.reshape is not None:
            reshaped = self.reshape(feats)
            if reshaped is not None:
                feats = reshaped
        if feats.ndim == len(spatial) + 2:
            return feats, reason
        if feats.ndim == 3 and len(spatial) >= 2:
            grid = tokens_to_grid(feats, spatial)
            if grid is not None:
                return grid, reason
            return None, (
                f"skipped: token output {tuple(feats.shape)} does not fit the input grid {tuple(spatial)} "
                "at any patch size; give reshape="
            )
        return None, f"skipped: output {tuple(feats.shape)} is not (B, C, *spatial) with {len(spatial)} spatial dims"

    def score(
        self,
        layer: str,
        feats: torch.Tensor,
        guide: torch.Tensor,
        refs: torch.Tensor,
        has_label: bool,
        mask: torch.Tensor | None,
        ids: list[str],
        valid: torch.Tensor,
        reason: str,
    ) -> None:
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        feats = feats.to(dtype)
        finite = torch.isfinite(feats.flatten(1)).all(dim=1)
        if not bool(finite.all()):
            feats = torch.where(finite.view(-1, *([1] * (feats.ndim - 1))), feats, torch.zeros_like(feats))
        g, r = guide.to(dtype), refs.to(dtype)
        m = None if mask is None else mask.to(dtype)
        layer_sa, unit_sa, undefined = score_layer(
            feats, g, r, m, units=self.units, empty=self.empty, chunk_size=self.chunk_size
        )
        layer_sa = layer_sa.cpu().double().numpy()
        channels = int(feats.shape[1])
        shape = _shape_str(feats.shape[1:])
        bad_image = (~valid | ~finite).cpu().numpy()
        undefined = undefined.cpu().numpy()
        for i, image in enumerate(ids):
            why = reason
            if not bool(valid[i]):
                why = "model output contains NaN or Inf"
            elif not bool(finite[i]):
                why = "features contain NaN or Inf"
            elif undefined[i]:
                why = "guide has no target or no background: prototypes undefined"
            sa, sa_pred = (layer_sa[i, 0], layer_sa[i, -1])
            if bad_image[i]:
                sa = sa_pred = math.nan
            self.layer_rows.append(
                {
                    "image": image,
                    "layer": layer,
                    "depth": self.depth[layer],
                    "channels": channels,
                    "shape": shape,
                    "sa": float(sa) if has_label else math.nan,
                    "sa_pred": float(sa_pred),
                    "reason": why,
                }
            )
        if unit_sa is not None:
            u = unit_sa.cpu().double().numpy()  # (B, R, C)
            u[bad_image] = math.nan
            b, _, c = u.shape
            self.unit_frames.append(
                pd.DataFrame(
                    {
                        "image": np.repeat(np.array(ids, dtype=object), c),
                        "layer": layer,
                        "unit": np.tile(np.arange(c), b),
                        "sa": u[:, 0].reshape(-1) if has_label else np.full(b * c, math.nan),
                        "sa_pred": u[:, -1].reshape(-1),
                    }
                )
            )
        self._keep_layer_maps(layer, feats, g, m, ids, unit_sa, has_label)

    def _keep_layer_maps(self, layer, feats, guide, mask, ids, unit_sa, has_label) -> None:
        kept = [i for i, image in enumerate(ids) if image in self.maps]
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
            entry = self.maps[ids[i]]
            entry["layers"][layer] = seg[j]
            if unit_sa is None or not bool(torch.isfinite(protos[j]).all()):
                continue
            scores = unit_sa[i, 0 if has_label else -1].cpu().numpy()
            order = [int(u) for u in np.argsort(-np.nan_to_num(scores, nan=-1.0))[:BEST_UNITS_KEPT]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                maps = protoseg_units(f[j : j + 1, order], g[j : j + 1], None if m is None else m[j : j + 1])
            entry["units"][layer] = {u: maps[0, n].to(torch.uint8).cpu().numpy() for n, u in enumerate(order)}


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
) -> SAResult:
    """Segmentation ability of every chosen layer (and unit) of ``model`` on ``images``.

    For each image and layer: ``sa``, the Dice of the layer's feature segmentation map against the
    label (NaN without labels), and ``sa_pred``, against the network's binarised prediction. The
    prototypes come from the network's own probability map (``guide="prediction"``, needs no
    label) or from the label (``guide="label"``). The input image itself is analysed as the layer
    ``"input"``.

    Args:
        model: any ``nn.Module`` returning (B, K, *S) logits or probabilities (or a tuple/list whose
            first element is that, or a dict with ``output_key``).
        images: a tensor (N, C, *S); an iterable of single images (C, *S), ``(image, label)`` pairs
            or dicts with "image"/"label"/"id"; or a DataLoader of batches (tensors, pairs or dicts).
            Images of different sizes are processed in separate batches.
        labels: (N, 1, *S) / (N, *S) label maps for tensor images, or an iterable matching
            ``images``; None for label-free analysis.
        layers: "auto" (every convolution, 1D/2D/3D and transposed, in forward order) or a selection
            (names, glob patterns, types, modules, predicates; see :func:`segability.capture.resolve_layers`).
        units: also score every unit (channel) of every layer.
        guide: "prediction" or "label".
        output: how to read the model output: "auto", "sigmoid", "softmax" or "probabilities".
        target: the target class (K-channel outputs, or multi-class label maps); default 1.
        mask: pixels that shape the prototypes: None, "nonzero" (any image channel != 0), a tensor
            (N, 1, *S) for tensor images, or a callable images -> (B, 1, *S).
        batch_size: images per forward pass (for tensors and iterables).
        device: where to run; default the model's device.
        keep_maps: keep the feature segmentation maps of the first ``keep_maps`` images.
        output_key: key of a dict output.
        reshape: callable turning a layer output into (B, C, *spatial) features (e.g. transformer
            tokens), returning None to fall back to the automatic rules.
        ids: image ids for tensor / iterable inputs (default: the index).
        metadata: extra per-image columns (must have an ``image`` column) joined to ``images``.
        empty: Dice convention for two empty maps ("one" or "nan").
        chunk_size: channels resized at once for unit maps (memory bound); automatic when None.
        progress: show a progress bar.
        data: a description of the data, stored in the settings.
        model_name: a name for the model, stored in the settings (default its class name).

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
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if keep_maps < 0:
        raise ValueError(f"keep_maps must be >= 0, got {keep_maps}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError("TorchScript modules cannot take forward hooks: give the Python nn.Module instead")
    target_given = target is not None
    target = 1 if target is None else int(target)

    if layers == "auto":
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
    state = _Analysis(units=units, keep_maps=keep_maps, empty=empty, chunk_size=chunk_size, reshape=reshape)
    spatial_dims = None
    first_error: BaseException | None = None
    n_images = 0
    order_known = False

    batches = _batches(images, labels, ids, mask, batch_size)
    total = None
    if isinstance(images, (torch.Tensor, np.ndarray)):
        total = images.shape[0]
    elif hasattr(images, "__len__"):
        try:
            total = len(images.dataset) if isinstance(images, torch.utils.data.DataLoader) else len(images)
        except TypeError:
            total = None

    with _progress(progress, total) as advance, eval_mode(model), torch.no_grad():
        for batch in batches:
            n_images += len(batch.ids)
            x = batch.images.to(dev)
            if spatial_dims is None:
                spatial_dims = x.ndim - 2
            if guide == "label" and batch.labels is None:
                raise ValueError('guide="label" needs labels, but a batch came without them')
            try:
                with FeatureRecorder(model, names) as rec:
                    out = model(x if x.is_floating_point() else x.float())
                prob, pred, k = model_probabilities(out, output, target, output_key)
                if not order_known:
                    for d, name in enumerate(rec.order, start=1):
                        state.depth[name] = d
                    for name in names:
                        state.depth.setdefault(name, len(state.depth))
                    order_known = True
                label = None
                if batch.labels is not None:
                    lab = batch.labels.to(dev)
                    if lab.ndim == x.ndim - 1:
                        lab = lab.unsqueeze(1)
                    if lab.shape[0] != x.shape[0] or lab.shape[2:] != prob.shape[2:]:
                        raise ValueError(
                            f"labels {tuple(lab.shape)} do not match the model output {tuple(prob.shape)} "
                            f"for images {batch.ids}"
                        )
                    label = _label_target(lab, k, target, target_given)
            except ValueError:
                raise
            except Exception as exc:  # one failing batch of many is recorded, the run goes on
                first_error = first_error or exc
                for image in batch.ids:
                    state.failed.append((image, f"{type(exc).__name__}: {exc}"))
                    state.image_rows.append(_failed_row(image, f"{type(exc).__name__}: {exc}"))
                advance(len(batch.ids))
                continue
            valid = torch.isfinite(prob.flatten(1)).all(dim=1)
            prob = torch.nan_to_num(prob, nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
            pred = torch.where(valid.view(-1, *([1] * (pred.ndim - 1))), pred, torch.zeros_like(pred))
            g = label if guide == "label" else prob
            refs = pred if label is None else torch.cat([label, pred], dim=1)
            m = _resolve_mask(mask, batch, dev)
            for i, image in enumerate(batch.ids):
                if len(state.maps) < keep_maps and image not in state.maps:
                    state.maps[image] = {
                        "image": batch.images[i].float().cpu().numpy(),
                        "label": None if label is None else label[i, 0].to(torch.uint8).cpu().numpy(),
                        "prediction": prob[i, 0].float().cpu().numpy(),
                        "layers": {},
                        "units": {},
                    }
            spatial = tuple(x.shape[2:])
            state.score(INPUT, x.float(), g, refs, label is not None, m, batch.ids, valid, "")
            for name in names:
                tensors = rec.pop(name)
                if not tensors:
                    for image in batch.ids:
                        state.layer_rows.append(_skipped_row(image, name, state.depth[name], "not called in the forward pass"))
                    continue
                feats, why = state.features_of(name, tensors, spatial)
                if feats is None:
                    for image in batch.ids:
                        state.layer_rows.append(_skipped_row(image, name, state.depth[name], why))
                    continue
                if rec.modified_in_place(name):
                    why = (why + "; " if why else "") + "output modified in place after the layer (e.g. inplace activation)"
                state.score(name, feats, g, refs, label is not None, m, batch.ids, valid, why)
                del feats, tensors
            state.image_rows.extend(_image_rows(batch.ids, label, pred, valid, empty))
            advance(len(batch.ids))

    if n_images == 0:
        raise ValueError("images is empty: nothing to analyse")
    if first_error is not None and len(state.failed) == n_images:
        raise RuntimeError(f"the model failed on every image; first error: {first_error}") from first_error
    if state.failed:
        warnings.warn(f"{len(state.failed)} of {n_images} images failed in the model; see the 'reason' column", stacklevel=2)

    layers_df = pd.DataFrame(state.layer_rows, columns=["image", "layer", "depth", "channels", "shape", "sa", "sa_pred", "reason"])
    layers_df = layers_df.astype({"image": str, "layer": str, "depth": int, "channels": int, "shape": str, "sa": float, "sa_pred": float, "reason": str})
    images_df = _images_table(state.image_rows, layers_df)
    # With an empty prediction, sa_pred compares against nothing: undefined, never "perfect".
    empty_pred = set(images_df.loc[images_df["reason"].str.startswith("empty prediction"), "image"])
    if empty_pred:
        rows = layers_df["image"].isin(empty_pred)
        layers_df.loc[rows, "sa_pred"] = math.nan
        layers_df.loc[rows, "reason"] = layers_df.loc[rows, "reason"].where(
            layers_df.loc[rows, "reason"] != "", "empty prediction: sa_pred undefined"
        )
        images_df = _images_table(state.image_rows, layers_df)
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
        "n_images": n_images,
        "device": str(dev),
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": data,
    }
    return SAResult(layers=layers_df, images=images_df, units=units_df, maps=state.maps, settings=settings)


def _failed_row(image: str, reason: str) -> dict[str, Any]:
    return {"image": image, "dice": math.nan, "reason": reason}


def _skipped_row(image: str, layer: str, depth: int, reason: str) -> dict[str, Any]:
    return {"image": image, "layer": layer, "depth": depth, "channels": 0, "shape": "", "sa": math.nan, "sa_pred": math.nan, "reason": reason}


def _image_rows(ids, label, pred, valid, empty) -> list[dict[str, Any]]:
    if label is None:
        dice = [math.nan] * len(ids)
    else:
        p, lab = pred.flatten(1).double(), label.flatten(1).double()
        dice = dice_from_counts((p * lab).sum(1), p.sum(1), lab.sum(1), empty).cpu().tolist()
    rows = []
    for i, image in enumerate(ids):
        ok = bool(valid[i])
        reason = "" if ok else "model output contains NaN or Inf"
        if ok and float(pred[i].sum()) == 0:
            reason = "empty prediction: sa_pred undefined"
        rows.append({"image": image, "dice": dice[i] if ok else math.nan, "reason": reason})
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


class _progress:
    """A rich progress bar over images, or nothing."""

    def __init__(self, enabled: bool, total: int | None):
        self.enabled = enabled
        self.total = total
        self._bar = None

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn("analysing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self._bar.__enter__()
        task = self._bar.add_task("analyse", total=self.total)
        return lambda n: self._bar.advance(task, n)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
