"""The SA profile of an image: every label-free SA-derived number the estimator reads.

One row per image, one column per feature:

| column | what |
|---|---|
| ``sa_pred:<layer>`` | ``sa_pred`` of every analysed layer (from the analysis result) |
| ``sa_pred_body:<layer>`` | the same with a body mask on the prototypes **and** the maps |
| ``input_sa_pred``, ``input_sa_pred_body`` | the input image's SA against the prediction, both ways |
| ``reverse:<layer>``, ``reverse_body:<layer>`` | reverse SA against the reference cache (:mod:`.reverse`) |
| ``input_reverse``, ``input_reverse_body`` | the input's reverse SA: its intensity prototypes on the references |
| ``pred_fraction``, ``pred_body_fraction`` | the prediction's size relative to the image and to the body |
| ``empty_prediction`` | 1 when the prediction is empty (``sa_pred`` is then undefined) |
| ``unit_mean``, ``unit_max``, ``unit_q90``, ``unit_share`` | unit ``sa_pred`` summaries, when units were analysed |
| ``mean:<kind>`` | the mean over the hidden layers of each per-layer kind (:func:`add_summaries`) |

``sa_pred`` and ``input_sa_pred`` come from the analysis result as :func:`segability.analyze`
made them. The analysis' own ``mask`` shapes only the prototypes; the body-masked variant here also
restricts the maps, so it is counted in one extra forward pass through
:class:`segability.SegmentationAbility` with the body mask as prototype mask and as per-pixel
weights. The same pass takes each image's prototypes for reverse SA.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from segability.analysis.features import layer_features
from segability.analysis.readout import model_probabilities
from segability.analysis.results import INPUT, SAResult
from segability.capture import FeatureRecorder, eval_mode
from segability.core.functional import UndefinedPrototypeWarning
from segability.core.metric import SegmentationAbility
from segability.errors import UsageError
from segability.estimation.reverse import ReferenceCache, image_prototypes, reverse_sa

__all__ = ["body_mask", "sa_profile", "add_summaries", "profile_layers", "FEATURE_KINDS"]

MaskFn = Callable[[torch.Tensor], torch.Tensor]
FEATURE_KINDS = ("sa_pred", "sa_pred_body", "reverse", "reverse_body")


def body_mask(images: torch.Tensor, *, sigma: float = 2.0, fraction: float = 0.15) -> torch.Tensor:
    """The body (foreground) of images: smoothed intensity above a fraction of its bright level.

    The first channel is smoothed with a Gaussian of ``sigma`` pixels (separable, any number of
    spatial dims) and compared with ``fraction`` times its 99th percentile per image: air and the
    background are out, the anatomy in. Noise that lifts the background lifts the mask too, and
    the SA inside it then says so.

    Args:
        images: (B, C, *S).
        sigma: smoothing width in pixels.
        fraction: threshold relative to each image's 99th percentile of the smoothed intensity.

    Returns:
        (B, 1, *S) float 0/1 mask.

    Example:
        >>> x = torch.zeros(1, 1, 16, 16); x[..., 4:12, 4:12] = 1.0
        >>> int(body_mask(x).sum()) >= 64
        True
    """
    x = images[:, :1].float()
    b, _, *spatial = x.shape
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(spatial)]
    for d in range(len(spatial)):
        shape = [1, 1] + [1] * len(spatial)
        shape[2 + d] = kernel.numel()
        pad = [0] * (2 * len(spatial))
        pad[2 * (len(spatial) - 1 - d)] = pad[2 * (len(spatial) - 1 - d) + 1] = radius
        x = conv(F.pad(x, pad, mode="replicate"), kernel.reshape(shape))
    level = torch.quantile(x.flatten(1), 0.99, dim=1).clamp_min(1e-6)
    return (x > fraction * level.view(b, *([1] * (x.ndim - 1)))).float()


def profile_layers(result: SAResult) -> list[str]:
    """The analysed layers that have a score (``input`` first), in forward order."""
    layers = result.layers
    ok = layers.groupby("layer")["sa_pred"].apply(lambda s: s.notna().any())
    depth = layers.groupby("layer")["depth"].min()
    names = [n for n in depth.sort_values().index if bool(ok.get(n, False)) or n == INPUT]
    return names


@torch.no_grad()
def sa_profile(
    model: nn.Module,
    images: torch.Tensor,
    result: SAResult,
    *,
    references: ReferenceCache | None = None,
    mask: MaskFn | Literal["body"] | None = "body",
    layers: Sequence[str] | None = None,
    ids: Sequence[str] | None = None,
    batch_size: int = 16,
    output: str = "auto",
    target: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> pd.DataFrame:
    """The SA profile (see the module docstring) of every image of ``result``.

    Args:
        model: the network the analysis ran on.
        images: the analysed images (N, C, *S), in the order of ``ids``.
        result: :func:`segability.analyze` of ``images`` (``sa_pred`` per layer, input SA).
        references: the reference cache for reverse SA (None: no reverse columns).
        mask: ``"body"`` (:func:`body_mask`), a callable images -> (B, 1, *S), or None (no
            body-masked columns).
        layers: layers of the profile (default: every scored layer of ``result``, ``input`` first).
        ids: image ids of ``images`` (default ``result.images["image"]`` in order).
        batch_size: images per forward pass.
        output, target: how to read the network output (as in :func:`segability.analyze`).
        progress: called with the number of images after each batch.

    Returns:
        One row per image: ``image`` and the feature columns.

    Raises:
        UsageError: ids that do not match the result, layers the model lacks.
    """
    ids = [str(i) for i in (ids if ids is not None else result.images["image"].astype(str).tolist())]
    if len(ids) != images.shape[0]:
        raise UsageError(f"ids: {len(ids)} ids for {images.shape[0]} images", argument="ids")
    layers = list(layers) if layers is not None else profile_layers(result)
    if INPUT not in layers:
        layers = [INPUT, *layers]
    hidden = [n for n in layers if n != INPUT]
    mask_fn = body_mask if mask == "body" else mask
    if mask_fn is not None and not callable(mask_fn):
        raise UsageError(f"mask must be 'body', a callable or None, got {mask!r}", argument="mask")
    if references is not None:
        missing = [n for n in layers if n not in references.features]
        if missing:
            raise UsageError(f"references lack layers {missing}", argument="references")
        if mask_fn is not None and references.body is None:
            raise UsageError("references were built without a body mask; build them with body_mask=", argument="references")

    table = _from_result(result, ids, layers)
    extra: dict[str, list[float]] = {}
    body_metric = SegmentationAbility(empty="one")
    tgt = 1 if target is None else target
    spatial = tuple(images.shape[2:])
    with eval_mode(model), FeatureRecorder(model, hidden) as rec, warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedPrototypeWarning)
        for s in range(0, images.shape[0], batch_size):
            x = images[s : s + batch_size].float()
            batch_ids = ids[s : s + batch_size]
            rec.clear()
            prob, pred, _ = model_probabilities(model(x), output, tgt)
            body = mask_fn(x).float() if mask_fn is not None else None
            n_pix = float(np.prod(spatial))
            _append(extra, "pred_fraction", (pred.flatten(1).sum(1) / n_pix).tolist())
            if body is not None:
                frac = (pred * body).flatten(1).sum(1) / body.flatten(1).sum(1).clamp_min(1.0)
                _append(extra, "pred_body_fraction", frac.tolist())
            feats = {}
            for name in layers:
                out = x if name == INPUT else rec.outputs[name][-1]
                f, _ = layer_features(out, x.shape[0], spatial)
                if f is not None:
                    feats[name] = f.float()
            if body is not None:
                body_metric.update(feats, guide=prob, references=pred, mask=body, weights=body, ids=batch_ids,
                                   prediction=0, validate=False)  # fmt: skip
            if references is not None:
                for kind, m in (("reverse", None), ("reverse_body", body)):
                    if kind == "reverse_body" and body is None:
                        continue
                    protos = {n: image_prototypes(f, prob, m) for n, f in feats.items()}
                    for n, v in reverse_sa(protos, references, use_body=m is not None).items():
                        _append(extra, _column(kind, n), v.tolist())
            if progress is not None:
                progress(len(x))
    for k, v in extra.items():
        table[k] = v
    if mask_fn is not None:
        for name, sc in body_metric.scores().items():
            table[_column("sa_pred_body", name)] = pd.Series(sc.sa[:, 0].double().numpy(), index=sc.ids).reindex(ids).to_numpy()
    table = table.rename(columns={
        "reverse:input": "input_reverse", "reverse_body:input": "input_reverse_body", "sa_pred_body:input": "input_sa_pred_body",
    })  # fmt: skip
    return add_summaries(table)


def add_summaries(profile: pd.DataFrame) -> pd.DataFrame:
    """Add ``mean:<kind>``, the mean over the hidden layers of each per-layer kind (undefined skipped).

    A few summaries generalise to unseen shifts better than the wide per-layer vector; the
    estimator chooses between them by cross-validation. Idempotent.
    """
    out = profile.copy()
    for kind in FEATURE_KINDS:
        cols = [c for c in out.columns if c.startswith(kind + ":")]
        if cols:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: NaN
                out[f"mean:{kind}"] = np.nanmean(out[cols].to_numpy(float), axis=1)
    return out


def _column(kind: str, layer: str) -> str:
    return f"{kind}:{layer}"


def _append(store: dict[str, list[float]], key: str, values: list[float]) -> None:
    store.setdefault(key, []).extend(float(v) for v in values)


def _from_result(result: SAResult, ids: list[str], layers: list[str]) -> pd.DataFrame:
    """``sa_pred`` per layer, input SA, empty-prediction flag and unit summaries from the result."""
    lay = result.layers.assign(image=result.layers["image"].astype(str))
    wide = lay.pivot_table(index="image", columns="layer", values="sa_pred", aggfunc="first", dropna=False)
    table = pd.DataFrame({"image": ids})
    for name in layers:
        values = wide[name].reindex(ids).to_numpy(float) if name in wide else np.full(len(ids), math.nan)
        table["input_sa_pred" if name == INPUT else _column("sa_pred", name)] = values
    status = lay[lay["layer"] != INPUT].groupby("image")["status"].agg(lambda s: bool((s == "empty_prediction").any()))
    table["empty_prediction"] = status.reindex(ids).fillna(False).astype(float).to_numpy()
    units = getattr(result, "units", None)
    if units is not None and len(units):
        u = units.assign(image=units["image"].astype(str))
        u = u[u["layer"] != INPUT]
        g = u.groupby("image")["sa_pred"]
        summaries: dict[str, Any] = {
            "unit_mean": g.mean(),
            "unit_max": g.max(),
            "unit_q90": g.quantile(0.9),
            "unit_share": g.apply(lambda s: float((s > 0.5).mean())),
        }
        for key, series in summaries.items():
            table[key] = series.reindex(ids).to_numpy(float)
    return table
