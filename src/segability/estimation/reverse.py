"""Reverse SA: a test image's prototypes applied to labelled reference images.

Reverse classification accuracy (Valindria et al., IEEE TMI 2017) with ProtoSeg as the reverse
classifier. For a test image and a layer, the two prototypes are taken from the image's own
features, guided by its own predicted probability; they segment the features of every labelled
reference image (nearest prototype), and the Dice of that map with the reference's label is the
reverse SA. A correct output yields prototypes that describe the target in any image; a wrong one
(background lifted by noise, a bright bias-field region) yields prototypes that segment the
references poorly. Needs no label of the test image.

The references' features are computed once (:meth:`ReferenceCache.build`) and kept at each
layer's own resolution, with the labels reduced to that grid (area average, then > 0.5), so the
reverse map is counted on the features' grid: no resize, a fraction of a forward pass per image
(``benchmarks/qc_profile.py`` measures it). The map of every (test image, reference) pair is
one matrix product per layer; SA and its status come from the one rule,
:func:`segability.core.reduction.sa_compute`. ``tests/test_estimator.py`` checks the result
against :func:`segability.protoseg` and :func:`segability.sa_score`, and against
:class:`segability.SegmentationAbility` with fixed prototypes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segability.analysis.features import layer_features
from segability.analysis.results import INPUT
from segability.capture import FeatureRecorder, eval_mode
from segability.core.reduction import SACounts, prototype_update, sa_compute
from segability.errors import UsageError

__all__ = ["ReferenceCache", "reverse_sa", "image_prototypes", "to_grid"]

MaskFn = Callable[[torch.Tensor], torch.Tensor]


def to_grid(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A (B, 1, *S) binary mask on the grid ``size``: area average, then > 0.5 (itself on its own grid)."""
    size = tuple(int(s) for s in size)
    if tuple(mask.shape[2:]) == size:
        return (mask > 0.5).float()
    return (F.interpolate(mask.float(), size=size, mode="area") > 0.5).float()


def image_prototypes(features: torch.Tensor, guide: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, 2, C) background and target prototypes of ``features`` under ``guide`` (NaN where undefined).

    The same prototypes as the analysis takes (:func:`segability.core.reduction.prototype_update`),
    without a warning for undefined ones: the caller reads NaN.
    """
    return prototype_update(features, guide, mask).prototypes()


@dataclass
class ReferenceCache:
    """Labelled reference images' features at chosen layers, at each layer's own resolution.

    Attributes:
        layers: the layers (``"input"`` is the image itself), in the order given.
        features: layer -> float32 (N, C, *s) features of the N references.
        labels: layer -> uint8 (N, 1, *s) reference labels on that layer's grid.
        body: layer -> uint8 (N, 1, *s) reference body masks on that layer's grid (or None).
        ids: the N reference image ids.
        model_hash: :func:`segability.estimation.calibration.state_dict_hash` of the model.
    """

    layers: list[str]
    features: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    body: dict[str, np.ndarray] | None
    ids: list[str]
    model_hash: str

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor,
        layers: Sequence[str],
        *,
        body_mask: MaskFn | None = None,
        ids: Sequence[str] | None = None,
        batch_size: int = 16,
    ) -> ReferenceCache:
        """Run the N labelled references through ``model`` once and keep the chosen layers.

        Args:
            model: the segmentation network (the one the test images go through).
            images: (N, C, *S) reference images.
            labels: (N, 1, *S) or (N, *S) binary labels of the target.
            layers: layer names (``"input"`` allowed).
            body_mask: images -> (B, 1, *S) mask in [0, 1] (see :func:`segability.estimation.profile.body_mask`).
            ids: reference ids (default their index).
            batch_size: images per forward pass.

        Raises:
            UsageError: labels that do not match the images.
        """
        from segability.estimation.calibration import state_dict_hash

        if labels.ndim == images.ndim - 1:
            labels = labels.unsqueeze(1)
        if labels.shape[0] != images.shape[0] or labels.shape[2:] != images.shape[2:]:
            raise UsageError(f"labels {tuple(labels.shape)} must match images {tuple(images.shape)}", argument="labels")
        hidden = [name for name in layers if name != INPUT]
        spatial = tuple(images.shape[2:])
        feats: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        with eval_mode(model), FeatureRecorder(model, hidden) as rec:
            for s in range(0, len(images), batch_size):
                x = images[s : s + batch_size].float()
                rec.clear()
                model(x)
                for name in layers:
                    out = x if name == INPUT else rec.outputs[name][-1]
                    f, why = layer_features(out, x.shape[0], spatial)
                    if f is None:
                        raise UsageError(f"layer {name!r}: {why}", argument="layers")
                    feats[name].append(f.float().numpy())
        body_full = None if body_mask is None else body_mask(images.float())
        out_feats, out_labels, out_body = {}, {}, ({} if body_full is not None else None)
        for name in layers:
            out_feats[name] = np.concatenate(feats[name])
            grid = out_feats[name].shape[2:]
            out_labels[name] = to_grid(labels, grid).numpy().astype(np.uint8)
            if body_full is not None:
                out_body[name] = to_grid(body_full, grid).numpy().astype(np.uint8)
        return cls(
            layers=list(layers),
            features=out_feats,
            labels=out_labels,
            body=out_body,
            ids=[str(i) for i in (ids if ids is not None else range(len(images)))],
            model_hash=state_dict_hash(model),
        )

    def _prepared(self, name: str, use_body: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A layer's references as reverse SA reads them, made once: (offset (C,), centred features
        (C, N * s), labels (N, s), body weights (N, s) or None)."""
        store = self.__dict__.setdefault("_ready", {})
        if name not in store:
            feats = torch.from_numpy(np.asarray(self.features[name], dtype=np.float32))
            n, c = feats.shape[:2]
            # centred on the references' mean feature: float32 keeps the margin when features
            # share a large offset (the same reason the core centres its logits)
            offset = feats.mean(dim=(0, *range(2, feats.ndim)))
            flat = (feats - offset.view(1, c, *([1] * (feats.ndim - 2)))).transpose(0, 1).reshape(c, -1).contiguous()
            labels = torch.from_numpy(np.asarray(self.labels[name])).float().reshape(n, -1)
            body = None if self.body is None else torch.from_numpy(np.asarray(self.body[name])).float().reshape(n, -1)
            store[name] = (offset, flat, labels, body)
        offset, flat, labels, body = store[name]
        return offset, flat, labels, body if use_body else None

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write one ``.npz`` (``numpy.savez_compressed``; no pickled object inside)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        for k, name in enumerate(self.layers):
            arrays[f"features/{k}"] = self.features[name].astype(np.float32)
            arrays[f"labels/{k}"] = self.labels[name]
            if self.body is not None:
                arrays[f"body/{k}"] = self.body[name]
        header = {"layers": self.layers, "ids": self.ids, "model_hash": self.model_hash, "body": self.body is not None}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceCache:
        """Read a file written by :meth:`save` (``allow_pickle=False``)."""
        with np.load(Path(path), allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            layers = list(header["layers"])
            return cls(
                layers=layers,
                features={name: z[f"features/{k}"] for k, name in enumerate(layers)},
                labels={name: z[f"labels/{k}"] for k, name in enumerate(layers)},
                body={name: z[f"body/{k}"] for k, name in enumerate(layers)} if header["body"] else None,
                ids=list(header["ids"]),
                model_hash=str(header["model_hash"]),
            )


def reverse_sa(
    prototypes: Mapping[str, torch.Tensor],
    cache: ReferenceCache,
    *,
    use_body: bool = False,
    reduce: bool = True,
    chunk_elements: int = 2**24,
) -> dict[str, torch.Tensor]:
    """Reverse SA of B test images per layer: their prototypes applied to the cached references.

    For test image b and reference r, a pixel of the reference's features ``F_r(x)`` (on their own
    grid) is target when it is strictly nearer the target prototype, ``(F_r(x) - c_b) . w_b > 0``
    with ``w_b = p_target - p_background`` and ``c_b`` their midpoint -- the feature segmentation
    map of :func:`segability.protoseg` with fixed prototypes. All images and references of a layer
    take one matrix product; the counts (intersection with the reference label, sizes, optionally
    weighted by the references' body masks) go to :func:`segability.core.reduction.sa_compute`,
    the one rule for SA and for when it is undefined.

    Args:
        prototypes: layer -> (B, 2, C) background and target prototypes of the test images.
        cache: the references.
        use_body: count only the references' body pixels (per-pixel weights).
        reduce: mean over references (undefined scores skipped) -> (B,); else (B, N).
        chunk_elements: map values held at once (memory bound, about 4 bytes each).

    Returns:
        layer -> float64 reverse SA (B,) or (B, N); NaN for images whose prototypes are undefined.

    Example:
        >>> import numpy as np, torch
        >>> cache = ReferenceCache(["input"], {"input": np.array([[[[0.0, 1.0]]]], np.float32)},
        ...     {"input": np.array([[[[0, 1]]]], np.uint8)}, None, ["r"], "")
        >>> reverse_sa({"input": torch.tensor([[[0.0], [1.0]]])}, cache)["input"]
        tensor([1.], dtype=torch.float64)
    """
    if use_body and cache.body is None:
        raise UsageError("use_body=True needs a cache built with a body_mask", argument="use_body")
    out: dict[str, torch.Tensor] = {}
    n = len(cache)
    for name, protos in prototypes.items():
        if name not in cache.features:
            raise UsageError(f"layer {name!r} is not in the reference cache ({', '.join(cache.layers)})", argument="prototypes")
        offset, flat, labels, weights = cache._prepared(name, use_body)
        refs_w = labels if weights is None else labels * weights
        protos = protos.float()
        b = protos.shape[0]
        defined = ~torch.isnan(protos).flatten(1).any(dim=1)
        p = torch.nan_to_num(protos)
        w = p[:, 1] - p[:, 0]  # (B, C)
        bias = (((p[:, 1] + p[:, 0]) / 2 - offset) * w).sum(-1, keepdim=True)  # (B, 1)
        inter, seg_size = [], []
        step = max(1, min(b, chunk_elements // max(1, flat.shape[1])))
        for s in range(0, b, step):
            seg = (w[s : s + step] @ flat).sub_(bias[s : s + step]).gt_(0).reshape(-1, n, labels.shape[1])  # (k, N, s)
            seg = seg.transpose(0, 1)  # (N, k, s): one batched product per reference
            inter.append((seg @ refs_w.unsqueeze(-1)).squeeze(-1).T)
            seg_size.append(seg.sum(-1).T if weights is None else (seg @ weights.unsqueeze(-1)).squeeze(-1).T)
        counts = SACounts(
            intersection=torch.cat(inter).reshape(b * n, 1),
            seg_size=torch.cat(seg_size).reshape(b * n),
            ref_size=refs_w.sum(-1).repeat(b).reshape(b * n, 1),
            features_finite=torch.ones(b * n, dtype=torch.bool),
            prototypes_defined=defined.repeat_interleave(n),
            output_finite=torch.ones(b * n, dtype=torch.bool),
        )
        scores = sa_compute(counts, "one").layer[:, 0].double().reshape(b, n)
        out[name] = scores.nanmean(dim=1) if reduce else scores
    return out
