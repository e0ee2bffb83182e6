"""Large volumes in sliding windows: the same scores, accumulated over MONAI's windows.

Forward hooks fire once per window, so each layer's counts are accumulated over the windows of the
volume, inside the hooks, through the one reduction (:class:`segability.SegmentationAbility`, all
windows under one image id). With ``n(x)`` the number of windows covering voxel ``x``:

1. MONAI ``sliding_window_inference`` stitches the network output (constant blending); its target
   probability is the guide ``g`` (or the label) and its binarised map the prediction.
2. Per layer, the volume prototypes ``p_k = sum_w sum_x W_k(x) F_w(x) / n(x) / sum_x W_k(x)``
   (:func:`~segability.core.reduction.prototype_update` with per-pixel weights ``1 / n(x)``).
3. Each window's features go to the nearer volume prototype; intersections and sizes are counted
   with the weights ``1 / n(x)``, so every voxel counts once over the volume; SA from the sums.

For a network of 1x1 convolutions this equals the whole-volume analysis exactly; with larger
receptive fields the windows' borders differ, as the stitched output does.
"""

from __future__ import annotations

import datetime as _dt
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis.config import (
    AnalysisConfig,
    Capture,
    EmptyRule,
    GuideKind,
    OutputKind,
    Readout,
    Scoring,
    Windows,
)
from segability.analysis.features import (
    hookable,
    layer_features,
    layer_names,
    model_device,
    shape_text,
)
from segability.analysis.readout import label_target, model_probabilities, output_tensor
from segability.analysis.results import (
    IMAGES,
    INPUT,
    LAYERS,
    UNITS,
    SAResult,
    empty_table,
    layer_means,
    typed,
)
from segability.capture import FeatureRecorder, eval_mode
from segability.core.functional import dice_from_counts
from segability.core.metric import SegmentationAbility
from segability.core.reduction import PrototypeCounts, Status, prototype_update
from segability.errors import UsageError

__all__ = ["analyze_windows"]


def _crop(volume: torch.Tensor, locations: Sequence[Sequence[slice]], device: torch.device) -> torch.Tensor:
    """Stack the windows ``locations`` (MONAI's ``[batch, channel, *spatial]`` slices) of a (1, C, *S) volume."""
    return torch.cat([volume[(slice(None), slice(None), *loc[2:])] for loc in locations]).to(device)


def analyze_windows(
    model: nn.Module,
    image: torch.Tensor,
    label: torch.Tensor | None = None,
    *,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    layers: Any = "auto",
    units: bool = False,
    guide: GuideKind = "prediction",
    output: OutputKind = "auto",
    target: int | None = None,
    mask: str | None = None,
    output_key: str | None = None,
    image_id: str = "0",
    empty: EmptyRule = "one",
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
) -> SAResult:
    """SA of every chosen layer of ``model`` on one large volume, processed in sliding windows.

    Args:
        model: a network returning (B, K, *S) output on the window's grid.
        image: (C, *S) volume (1-3 spatial dims), kept where it is; windows go to ``device``.
        label: (1, *S) or (*S) label, or None.
        roi_size, overlap, sw_batch_size: see :class:`~segability.analysis.config.Windows`; a size
            <= 0 or larger than the volume takes the whole axis.
        layers, units, guide, output, target, output_key, empty, chunk_size: as in
            :func:`segability.analyze`.
        mask: None or ``"nonzero"`` (voxels where some image channel is non-zero shape the prototypes).
        image_id: the image's id in the tables.
        device: where the model runs; default the model's device.

    Returns:
        :class:`segability.SAResult` with one image. The ``shape`` column is a layer's output shape
        for one window. The model runs three times per window.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv3d(1, 4, 1), nn.ReLU(), nn.Conv3d(4, 1, 1))
        >>> res = analyze_windows(net, torch.rand(1, 24, 24, 24), roi_size=(16, 16, 16))
        >>> list(res.layers["layer"])
        ['input', '0', '2']
    """
    if mask not in (None, "nonzero"):
        raise UsageError(f'mask must be None or "nonzero" for windowed analysis, got {mask!r}', argument="mask")
    config = AnalysisConfig(
        readout=Readout(output=output, target=target, output_key=output_key),
        scoring=Scoring(guide=guide, units=units, mask=mask, empty=empty, chunk_size=chunk_size),
        capture=Capture(layers=layers),
        windows=Windows(roi_size=tuple(roi_size) if isinstance(roi_size, (list, tuple)) else roi_size,
                        overlap=overlap, sw_batch_size=sw_batch_size),
    )  # fmt: skip
    return WindowRun(model, config, device=device).run(image, label, image_id)


class WindowRun:
    """One model and configuration, applied to volumes one at a time (see :func:`analyze_windows`)."""

    def __init__(self, model: nn.Module, config: AnalysisConfig, *, device: str | torch.device | None = None):
        if config.windows is None:
            raise UsageError("config.windows must be set for a windowed analysis", argument="windows")
        self.model = hookable(model)
        self.config = config
        self.names = layer_names(model, config.capture.layers)
        self.device, self.dtype = model_device(model, device)

    def _roi(self, image: Any, label: Any) -> tuple[int, ...]:
        if not isinstance(image, torch.Tensor) or not 2 <= image.ndim <= 4:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise UsageError(f"image must be a tensor (C, *spatial) with 1-3 spatial dims, got {shape}", argument="image")
        spatial = tuple(image.shape[1:])
        if label is not None:
            if not isinstance(label, torch.Tensor):
                raise UsageError(f"label must be a tensor (1, *spatial) or (*spatial), got {type(label).__name__}", argument="label")
            lab_spatial = tuple(label.shape[1:]) if label.ndim == image.ndim else tuple(label.shape)
            if lab_spatial != spatial:
                raise UsageError(f"label {tuple(label.shape)} does not match the image {tuple(image.shape)}", argument="label")
        if self.config.scoring.guide == "label" and label is None:
            raise UsageError('guide="label" needs a label', argument="label")
        roi = self.config.windows.roi_size
        if len(roi) != len(spatial):
            raise UsageError(f"roi_size must give one window size per spatial dim ({len(spatial)}), got {roi!r}", argument="roi_size")
        # Windows never exceed the volume (so MONAI pads nothing); a size <= 0 means the whole axis.
        return tuple(s if r <= 0 or r > s else r for r, s in zip(roi, spatial, strict=True))

    @torch.no_grad()
    def run(self, image: torch.Tensor, label: torch.Tensor | None, image_id: str) -> SAResult:
        from monai.inferers import sliding_window_inference

        roi = self._roi(image, label)
        cfg, dev, names, model = self.config, self.device, self.names, self.model
        x = image.unsqueeze(0).to(self.dtype)
        spatial = tuple(x.shape[2:])
        window = dict(roi_size=roi, sw_batch_size=cfg.windows.sw_batch_size, overlap=cfg.windows.overlap,
                      mode="constant", with_coord=True)  # fmt: skip

        # n(x): how many of MONAI's windows cover each voxel (a dry run on a one-channel volume).
        coverage = torch.zeros((1, 1, *spatial), dtype=torch.float64)

        def count(win: torch.Tensor, locations: list) -> torch.Tensor:
            for loc in locations:
                coverage[(slice(None), slice(None), *loc[2:])] += 1
            return torch.zeros_like(win)

        sliding_window_inference(torch.zeros((1, 1, *spatial)), predictor=count, **window)
        inv_cover = (1.0 / coverage).float()

        shapes: dict[str, str] = {INPUT: shape_text((x.shape[1], *roi))}
        channels: dict[str, int] = {INPUT: int(x.shape[1])}
        why_not: dict[str, str] = {}
        calls: dict[str, int] = {}
        first: dict[str, Any] = {}

        def stitch(win: torch.Tensor, locations: list) -> torch.Tensor:
            win = win.to(dev)
            describe = not first

            def note(name: str, t: torch.Tensor) -> None:
                if describe:
                    calls[name] = calls.get(name, 0) + 1
                    feats, why = layer_features(t, win.shape[0], tuple(win.shape[2:]), cfg.capture.reshape)
                    shapes[name], channels[name] = shape_text(t.shape[1:]), 0 if feats is None else int(feats.shape[1])
                    if feats is None:
                        why_not[name] = why
                    else:
                        why_not.pop(name, None)

            with FeatureRecorder(model, names, callback=note) as rec:
                out = output_tensor(model(win), cfg.readout.output_key)
            if tuple(out.shape[2:]) != tuple(win.shape[2:]):
                raise UsageError(f"the model output {tuple(out.shape)} is not on the window's grid {tuple(win.shape[2:])}",
                                 argument="model")  # fmt: skip
            if describe:
                first["order"], first["calls"] = list(rec.order), dict(rec.calls)
            return out

        r = cfg.readout
        with eval_mode(model):
            stitched = sliding_window_inference(x, predictor=stitch, sw_device=dev, device=x.device, **window)
            depth = {INPUT: 0, **{n: d for d, n in enumerate(first["order"], start=1)}}
            for name in names:
                depth.setdefault(name, len(depth))
            skipped: dict[str, tuple[Status, str]] = {}
            for name in names:
                if name not in first["order"]:
                    skipped[name] = (Status.NOT_CALLED, Status.NOT_CALLED.message)
                elif calls.get(name, 0) == 0:
                    skipped[name] = (Status.NOT_FEATURES, "the layer's output holds no tensor")
                elif name in why_not:
                    skipped[name] = (Status.NOT_FEATURES, why_not[name])
            reused = sorted(n for n, c in first["calls"].items() if c > 1)
            if reused:
                warnings.warn(f"layers called more than once per forward pass (their last call is scored): {reused}", stacklevel=3)

            prob, pred, k = model_probabilities(stitched, r.output, r.target_index, r.output_key)
            del stitched
            valid = bool(torch.isfinite(prob).all())
            prob = torch.nan_to_num(prob.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
            pred = pred.float() * float(valid)
            label_t = None
            if label is not None:
                lab = (label if label.ndim == image.ndim else label.unsqueeze(0)).unsqueeze(0).to(prob.device, torch.float32)
                label_t = label_target(lab, k, r.target_index, r.target is not None).float()
            g = label_t if cfg.scoring.guide == "label" else prob
            m = (x != 0).any(dim=1, keepdim=True).float() if cfg.scoring.mask == "nonzero" else None
            refs = pred if label_t is None else torch.cat([label_t, pred], dim=1)
            scored = [n for n in names if n not in skipped]
            s = cfg.scoring
            metric = SegmentationAbility(units=s.units, empty=s.empty, chunk_size=s.chunk_size)
            protos: dict[str, PrototypeCounts] = {}

            def run_hooked(win: torch.Tensor, each: Callable[[str, torch.Tensor], None]) -> None:
                """Forward ``win``; hand every scored layer's last output, as features, to ``each``."""
                seen: dict[str, int] = {}

                def on(name: str, t: torch.Tensor) -> None:
                    seen[name] = seen.get(name, 0) + 1
                    if seen[name] == calls[name]:
                        feats, _ = layer_features(t, win.shape[0], tuple(win.shape[2:]), cfg.capture.reshape)
                        if feats is not None:
                            each(name, feats.float())

                each(INPUT, win.float())
                with FeatureRecorder(model, scored, callback=on):
                    model(win)

            def prototype_pass(win: torch.Tensor, locations: list) -> torch.Tensor:
                win = win.to(dev)
                g_w, w_w = _crop(g, locations, dev), _crop(inv_cover, locations, dev)
                m_w = None if m is None else _crop(m, locations, dev)

                def each(name: str, feats: torch.Tensor) -> None:
                    counts = prototype_update(feats, g_w, m_w, weights=w_w)
                    total = PrototypeCounts(counts.sums.sum(0, keepdim=True), counts.total.sum(0, keepdim=True))
                    protos[name] = total if name not in protos else protos[name] + total

                run_hooked(win, each)
                return torch.zeros((win.shape[0], 1, *win.shape[2:]), device=win.device)

            def overlap_pass(win: torch.Tensor, locations: list) -> torch.Tensor:
                win = win.to(dev)
                b = win.shape[0]
                inputs = dict(guide=_crop(g, locations, dev), references=_crop(refs, locations, dev),
                              mask=None if m is None else _crop(m, locations, dev))  # fmt: skip
                weights = _crop(inv_cover, locations, dev)
                cache: dict = {}

                def each(name: str, feats: torch.Tensor) -> None:
                    p = protos[name].prototypes().to(dev).expand(b, -1, -1)
                    metric.update(
                        {name: feats}, **inputs, ids=[image_id] * b, weights=weights, prototypes={name: p},
                        output_finite=torch.full((b,), valid, dtype=torch.bool), prediction=refs.shape[1] - 1,
                        validate=False, cache=cache,
                    )  # fmt: skip

                run_hooked(win, each)
                return torch.zeros((b, 1, *win.shape[2:]), device=win.device)

            if valid:
                sliding_window_inference(x, predictor=prototype_pass, sw_device=dev, device=x.device, **window)
                sliding_window_inference(x, predictor=overlap_pass, sw_device=dev, device=x.device, **window)

        settings = {
            **cfg.settings(), "roi_size": list(roi), "model": type(model).__name__,
            "layers": [INPUT, *sorted(names, key=lambda n: depth[n])], "spatial_dims": len(spatial), "device": str(dev),
            "n_images": 1,
        }  # fmt: skip
        return _result(metric, image_id, [INPUT, *names], depth, shapes, channels, skipped, valid, label_t, pred, settings)


def _result(metric, image_id, names, depth, shapes, channels, skipped, valid, label_t, pred, settings) -> SAResult:
    has_label = label_t is not None
    scores = metric.scores()
    empty_rule = metric.empty
    layer_rows, unit_frames = [], []
    for name in names:
        row = {"image": image_id, "layer": name, "depth": depth[name], "shape": shapes.get(name, "")}
        if name in skipped or name not in scores:
            status, why = skipped.get(name, (Status.OUTPUT_NOT_FINITE, Status.OUTPUT_NOT_FINITE.message))
            layer_rows.append({**row, "channels": 0 if name in skipped else channels.get(name, 0),
                               "sa": math.nan, "sa_pred": math.nan, "status": status.value, "reason": why})  # fmt: skip
            continue
        s = scores[name]
        sa = s.sa[0].double().cpu().numpy()
        layer_rows.append({**row, "channels": channels[name], "sa": float(sa[0]) if has_label else math.nan,
                           "sa_pred": float(sa[-1]), "status": s.status[0].value, "reason": s.status[0].message})  # fmt: skip
        if s.units is not None:
            u = s.units[0].double().cpu().numpy()  # (R, C)
            c = u.shape[1]
            unit_frames.append(pd.DataFrame({
                "image": [image_id] * c, "layer": name, "unit": np.arange(c),
                "sa": u[0] if has_label else np.full(c, math.nan), "sa_pred": u[-1],
            }))  # fmt: skip
    layers_df = typed(pd.DataFrame(layer_rows), LAYERS)
    if has_label and valid:
        p, lab = pred.flatten().double(), label_t.flatten().double()
        dice = float(dice_from_counts((p * lab).sum(), p.sum(), lab.sum(), empty_rule))
    else:
        dice = math.nan
    status = Status.OK if valid else Status.OUTPUT_NOT_FINITE
    if valid and float(pred.sum()) == 0:
        status = Status.EMPTY_PREDICTION
    images_df = pd.DataFrame([{"image": image_id, "dice": dice, "status": status.value, "reason": status.message}])
    images_df = typed(images_df.join(layer_means(layers_df), on="image"), IMAGES)
    units_df = None
    if settings.get("units"):
        units_df = typed(pd.concat(unit_frames, ignore_index=True), UNITS) if unit_frames else empty_table(UNITS)
    from segability import __version__

    settings = {**settings, "version": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return SAResult(layers=layers_df, images=images_df, units=units_df, settings=settings)
