"""The container of a generated data set (:class:`LesionData`), how samples become one, and its cache.

Every generator (:func:`~segability.datasets.mni_lesions`, :func:`~segability.datasets.mni_lesions_3d`)
draws samples (a dict of image, label, brain mask and drawn parameters each), assembles them into a
:class:`LesionData` and keeps it in the on-disk cache (:mod:`segability.datasets.cache`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from scipy import ndimage

from segability.datasets.cache import cache_path, load_arrays, save_arrays

if TYPE_CHECKING:
    import torch

__all__ = ["LesionData"]


@dataclass
class LesionData:
    """Images, labels and brain masks of a generated data set, with one meta row per image.

    Attributes:
        images: float32 (N, 1, *S), intensities about [0, 1], background 0.
        labels: uint8 (N, 1, *S), 1 on the lesion cores.
        brain: uint8 (N, 1, *S), 1 inside the brain (grey + white matter probability > 0.5).
        ids: N unique strings, e.g. ``"test-z087-0003"``.
        meta: one row per image, in order: ``id``, ``split``, ``slice``, ``n_lesions``,
            ``lesion_pixels``, ``polarity`` and the drawn parameters (plus ``shift`` and
            ``severity`` for a shifted suite).

    Example:
        >>> from segability.datasets import mni_lesions
        >>> data = mni_lesions(4, size=32, cache_dir=False)
        >>> len(data), data.images.shape, data.subset([0, 2]).ids == [data.ids[0], data.ids[2]]
        (4, (4, 1, 32, 32), True)
    """

    images: np.ndarray
    labels: np.ndarray
    brain: np.ndarray
    ids: list[str]
    meta: pd.DataFrame

    def __post_init__(self) -> None:
        self.ids = [str(i) for i in self.ids]
        n = len(self.ids)
        for name in ("images", "labels", "brain"):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.ndim not in (4, 5) or array.shape[1] != 1:
                raise ValueError(f"{name} must be an ndarray of shape (N, 1, *spatial) with 2 or 3 spatial dims")
            if array.shape[0] != n or array.shape[2:] != self.images.shape[2:]:
                raise ValueError(
                    f"{name} has shape {array.shape}, expected ({n}, 1, *{tuple(self.images.shape[2:])})"
                )
        if len(self.meta) != n:
            raise ValueError(f"meta must have one row per image ({n}), got {len(self.meta)}")
        if len(set(self.ids)) != n:
            raise ValueError("ids must be unique")
        self.images = self.images.astype(np.float32, copy=False)
        self.labels = self.labels.astype(np.uint8, copy=False)
        self.brain = self.brain.astype(np.uint8, copy=False)
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def spatial_dims(self) -> int:
        """2 for slices, 3 for volumes."""
        return self.images.ndim - 2

    def subset(self, indices: Sequence[int] | np.ndarray | slice) -> LesionData:
        """The images at ``indices`` (integers, a boolean mask of length N, or a slice), copied.

        Example:
            >>> from segability.datasets import mni_lesions
            >>> data = mni_lesions(3, size=32, cache_dir=False)
            >>> data.subset(slice(1, None)).ids == data.ids[1:]
            True
        """
        if isinstance(indices, slice):
            index = np.arange(len(self))[indices]
        else:
            index = np.asarray(indices)
            if index.dtype == bool:
                if index.shape != (len(self),):
                    raise ValueError(f"a boolean indices mask must have shape ({len(self)},), got {index.shape}")
                index = np.flatnonzero(index)
            elif index.size == 0:
                index = index.astype(np.int64)
            elif not np.issubdtype(index.dtype, np.integer):
                raise ValueError(f"indices must be integers, a boolean mask or a slice, got dtype {index.dtype}")
            index = index.reshape(-1)
            if index.size and (index.min() < -len(self) or index.max() >= len(self)):
                raise ValueError(f"indices must lie in [-{len(self)}, {len(self)}), got {index.min()}..{index.max()}")
        return LesionData(
            images=self.images[index].copy(),
            labels=self.labels[index].copy(),
            brain=self.brain[index].copy(),
            ids=[self.ids[i] for i in index],
            meta=self.meta.iloc[index].reset_index(drop=True),
        )

    def as_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` as float32 torch tensors of shape (N, 1, *S) (copies).

        Example:
            >>> from segability.datasets import mni_lesions
            >>> x, y = mni_lesions(2, size=32, cache_dir=False).as_tensors()
            >>> x.dtype, y.dtype, tuple(y.shape)
            (torch.float32, torch.float32, (2, 1, 32, 32))
        """
        import torch

        return torch.from_numpy(self.images.copy()), torch.from_numpy(self.labels.astype(np.float32))

    @classmethod
    def concat(cls, parts: Sequence[LesionData]) -> LesionData:
        """Join data sets with the same spatial shape, in order (ids must stay unique).

        Example:
            >>> from segability.datasets import mni_lesions
            >>> a = mni_lesions(2, size=32, cache_dir=False)
            >>> b = mni_lesions(2, split="test", size=32, cache_dir=False)
            >>> len(LesionData.concat([a, b]))
            4
        """
        parts = list(parts)
        if not parts:
            raise ValueError("parts must hold at least one LesionData")
        shapes = {p.images.shape[1:] for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"parts must share one image shape (1, *spatial), got {sorted(shapes)}")
        return cls(
            images=np.concatenate([p.images for p in parts]),
            labels=np.concatenate([p.labels for p in parts]),
            brain=np.concatenate([p.brain for p in parts]),
            ids=[i for p in parts for i in p.ids],
            meta=pd.concat([p.meta for p in parts], ignore_index=True),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write to one ``.npz`` (atomically); read back with :meth:`load`."""
        arrays = {
            "images": self.images,
            "labels": self.labels,
            "brain": self.brain,
            "ids": np.asarray(self.ids, dtype=np.str_),
        }
        return save_arrays(path, arrays, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LesionData:
        """Read a file written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` is missing or not a readable data set file.
        """
        loaded = load_arrays(path)
        if loaded is None or not {"images", "labels", "brain", "ids"} <= set(loaded[0]):
            raise FileNotFoundError(f"no readable LesionData file at {path}")
        arrays, meta = loaded
        return cls(arrays["images"], arrays["labels"], arrays["brain"], arrays["ids"].tolist(), meta)


# ------------------------------------------------------------------------------------- assembly
def _assemble(samples: list[dict[str, Any]], ids: list[str], base_meta: list[dict[str, Any]]) -> LesionData:
    full = np.ones((3,) * samples[0]["label"].ndim, bool)
    rows = []
    for sample, row in zip(samples, base_meta, strict=True):
        label = sample["label"]
        rows.append(
            {
                **row,
                "n_lesions": int(ndimage.label(label, structure=full)[1]),
                "lesion_pixels": int(label.sum()),
                **sample["meta"],
            }
        )
    return LesionData(
        images=np.stack([s["image"] for s in samples])[:, None],
        labels=np.stack([s["label"] for s in samples])[:, None].astype(np.uint8),
        brain=np.stack([s["brain"] for s in samples])[:, None].astype(np.uint8),
        ids=ids,
        meta=pd.DataFrame(rows),
    )


def _cached(
    function: str,
    cache_dir: str | os.PathLike[str] | None | Literal[False],
    make: Callable[[], LesionData],
    **params: Any,
) -> LesionData:
    if cache_dir is False:
        return make()
    path = cache_path(cache_dir, function, **params)
    try:
        return LesionData.load(path)
    except FileNotFoundError:
        pass
    data = make()
    data.save(path)
    return data
