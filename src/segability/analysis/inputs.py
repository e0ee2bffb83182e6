"""Every accepted input form (tensor, iterable of images or pairs or dicts, DataLoader) as batches.

Images of different sizes go to separate batches; ids given by the caller must be unique, derived
ones (file names from MONAI metadata, indices) get a ``#k`` suffix when they repeat.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from segability.errors import UsageError

__all__ = ["Batch", "batches", "IdBook", "as_tensor", "count_images"]


@dataclass
class Batch:
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
            raise UsageError(f"dict items must have an 'image' key, got keys {sorted(item)}")
        ident = item.get("id")
        return item["image"], item.get("label"), None if ident is None else str(ident)
    if isinstance(item, (tuple, list)):
        if len(item) not in (1, 2):
            raise UsageError(f"items must be an image or an (image, label) pair, got a sequence of {len(item)}")
        return item[0], (item[1] if len(item) == 2 else None), None
    return item, None, None


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """A plain tensor (subclasses such as MONAI's MetaTensor are unwrapped: they slow every op)."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise UsageError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x if type(x) is torch.Tensor else x.as_subclass(torch.Tensor)


def _check_labels(labels: torch.Tensor, images: torch.Tensor, what: str) -> None:
    """Labels (B, *S), (B, 1, *S) or one-hot (B, K, *S) for images (B, C, *S)."""
    spatial = tuple(images.shape[2:])
    shape = tuple(labels.shape)
    if shape[0] != images.shape[0]:
        raise UsageError(
            f"images and labels have different counts: {images.shape[0]} images, {shape[0]} labels{what}"
        )
    if shape[1:] != spatial and shape[2:] != spatial:
        raise UsageError(
            f"labels{what} must have the images' spatial shape {spatial}, as (N, *spatial), "
            f"(N, 1, *spatial) or one-hot (N, K, *spatial); got labels {shape} for images {tuple(images.shape)}"
        )


def batches(
    images: Any,
    labels: Any,
    ids: Sequence[str] | None,
    mask: Any,
    batch_size: int,
) -> Iterator[Batch]:
    """Normalise every accepted input form into batches of same-shaped images."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = as_tensor(images, "images")
        if images.ndim < 3:
            raise UsageError(f"images must have shape (N, C, *spatial), got {tuple(images.shape)}")
        n = images.shape[0]
        if labels is not None:
            labels = as_tensor(labels, "labels")
            _check_labels(labels, images, "")
        if ids is not None and len(ids) != n:
            raise UsageError(f"ids must have one entry per image: {n} images, {len(ids)} ids")
        if isinstance(mask, (torch.Tensor, np.ndarray)):
            mask = as_tensor(mask, "mask")
            if tuple(mask.shape) != (n, 1, *images.shape[2:]):
                raise UsageError(
                    f"mask must have shape {(n, 1, *images.shape[2:])} (one channel per image), got {tuple(mask.shape)}"
                )
        for s in range(0, n, batch_size):
            sl = slice(s, s + batch_size)
            batch_ids = [str(i) for i in (ids[sl] if ids is not None else range(s, min(n, s + batch_size)))]
            yield Batch(
                images[sl],
                None if labels is None else labels[sl],
                batch_ids,
                mask[sl] if isinstance(mask, torch.Tensor) else None,
                [ids is not None] * len(batch_ids),
            )
        return
    if isinstance(mask, (torch.Tensor, np.ndarray)):
        raise UsageError("a mask tensor goes with an images tensor; for iterables give mask='nonzero' or a callable")
    if isinstance(images, torch.utils.data.DataLoader):
        if labels is not None:
            raise UsageError("with a DataLoader, labels come from the loader's items, not the labels argument")
        count = 0
        for item in images:
            x, y, ident = _split_item(item)
            batch_ids = _loader_ids(item, x, count, x.shape[0] if isinstance(x, torch.Tensor) else 0)
            x = as_tensor(x, "images")
            if x.ndim < 3:
                raise UsageError(f"DataLoader batches must have shape (B, C, *spatial), got {tuple(x.shape)}")
            b = x.shape[0]
            if y is not None:
                y = as_tensor(y, "labels")
                _check_labels(y, x, f" (DataLoader batch of images {count}..{count + b - 1})")
            given = isinstance(item, dict) and item.get("id") is not None
            count += b
            yield Batch(x, y, batch_ids, None, [given] * b)
        return
    if not isinstance(images, Iterable):
        raise UsageError(f"images must be a tensor, an iterable of tensors or a DataLoader, got {type(images).__name__}")
    label_iter = iter(labels) if labels is not None else None
    pending: list[tuple[torch.Tensor, torch.Tensor | None, str, bool]] = []
    index = 0
    for item in images:
        x, y, ident = _split_item(item)
        name = ident or (ids[index] if ids is not None else _image_id(x, str(index)))
        given = ident is not None or ids is not None
        x = as_tensor(x, f"images[{index}]")
        if x.ndim < 2:
            raise UsageError(f"images[{index}] must have shape (C, *spatial), got {tuple(x.shape)}")
        if label_iter is not None:
            try:
                y = as_tensor(next(label_iter), f"labels[{index}]")
            except StopIteration:
                raise UsageError(f"images and labels have different counts: no label for image {index}") from None
        elif y is not None:
            y = as_tensor(y, f"labels[{index}]")
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
        raise UsageError(f"images and labels have different counts: {index} images and more labels")
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


def _stack(items: list[tuple[torch.Tensor, torch.Tensor | None, str, bool]]) -> Batch:
    xs = torch.stack([i[0] for i in items])
    ys = None if items[0][1] is None else torch.stack([i[1] for i in items])
    return Batch(xs, ys, [i[2] for i in items], None, [i[3] for i in items])


class IdBook:
    """Image ids of one run: ids given by the caller must be unique; derived ones get a suffix."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def add(self, name: str, given: bool) -> str:
        if name in self.seen:
            if given:
                raise UsageError(f"image id {name!r} appears twice: image ids must be unique")
            k = 2
            while f"{name}#{k}" in self.seen:
                k += 1
            name = f"{name}#{k}"
        self.seen.add(name)
        return name


def count_images(images: Any) -> int | None:
    """How many images ``images`` holds, when that is known without iterating."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return int(images.shape[0])
    if isinstance(images, torch.utils.data.DataLoader):
        try:
            return len(images.dataset)
        except TypeError:
            return None
    if hasattr(images, "__len__"):
        try:
            return len(images)
        except TypeError:
            return None
    return None
