"""Large volumes in sliding windows: the same scores, accumulated over the windows of a volume.

Forward hooks fire once per window, so each layer's counts are accumulated over the windows of the
volume, inside the hooks, through the one reduction (:class:`segability.SegmentationAbility`, all
windows under one image id). With ``n(x)`` the number of windows covering voxel ``x``:

1. The network output is stitched over MONAI's windows (constant blending) — or given: the
   caller's own inference (nnU-Net's Gaussian sliding window, say) with its own windows (tiles).
   Each class's probability is its guide ``g`` (or the label), its binarised map the prediction.
2. Per layer and class, the volume prototypes ``p_k = sum_w sum_x W_k(x) F_w(x) / n(x) / sum_x W_k(x)``
   (:func:`~segability.core.reduction.prototype_update` with per-pixel weights ``1 / n(x)``).
3. Each window's features go to the nearer volume prototype; intersections and sizes are counted
   with the weights ``1 / n(x)``, so every voxel counts once over the volume; SA from the sums.

A volume smaller than the window is padded with zeros (half before, half after, as MONAI and
nnU-Net pad); padded voxels weigh 0, so they shape no prototype and count in no score. Layer
outputs of a window are kept (up to ``memory_budget`` bytes, at the layer's own resolution) from
the pass that first computes them, so later steps reuse them instead of running the window again:
with a large enough budget the network runs once per window besides the stitching pass.

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
from segability.analysis.readout import class_probabilities, label_targets, output_tensor
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
from segability.core.functional import class_logits, dice_from_counts
from segability.core.metric import SegmentationAbility
from segability.core.reduction import PrototypeCounts, Status, prototype_update
from segability.errors import UsageError

__all__ = ["analyze_windows"]


Tile = tuple[slice, ...]


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
    classes: Sequence[int] | str | None = None,
    class_names: dict[int, str] | None = None,
    mask: str | None = None,
    output_key: str | None = None,
    image_id: str = "0",
    empty: EmptyRule = "one",
    keep_maps: bool = False,
    chunk_size: int | None = None,
    memory_budget: int = 512 * 2**20,
    device: str | torch.device | None = None,
    logits: torch.Tensor | None = None,
    tiles: Sequence[Tile] | None = None,
) -> SAResult:
    """SA of every chosen layer of ``model`` on one large volume, processed in sliding windows.

    Args:
        model: a network returning (B, K, *S) output on the window's grid.
        image: (C, *S) volume (1-3 spatial dims), kept where it is; windows go to ``device``.
        label: (1, *S) or (*S) label, or None.
        roi_size, overlap, sw_batch_size: see :class:`~segability.analysis.config.Windows`; a size
            <= 0 takes the whole axis; a volume smaller than the window is padded (see above).
        layers, units, guide, output, target, classes, class_names, output_key, empty, chunk_size:
            as in :func:`segability.analyze`.
        mask: None or ``"nonzero"`` (voxels where some image channel is non-zero shape the prototypes).
        image_id: the image's id in the tables.
        keep_maps: keep the volume's maps (image, label, prediction, each layer's feature
            segmentation, stitched over the windows) in ``result.maps``.
        memory_budget: bytes of layer outputs kept between the steps (see above).
        device: where the model runs; default the model's device.
        logits: the stitched network output (1, K, *S) or (K, *S) on the image grid, from the
            caller's own inference; then the model is not run for the prediction.
        tiles: the windows to score, as tuples of spatial slices on the padded grid (all of one
            size, covering the volume); default MONAI's windows for ``roi_size`` and ``overlap``.

    Returns:
        :class:`segability.SAResult` with one image. The ``shape`` column is a layer's output shape
        for one window.

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
        readout=Readout(output=output, target=target, output_key=output_key,
                        classes=classes, class_names=class_names),
        scoring=Scoring(guide=guide, units=units, mask=mask, empty=empty, chunk_size=chunk_size, keep_maps=int(keep_maps)),
        capture=Capture(layers=layers, memory_budget=memory_budget),
        windows=Windows(roi_size=tuple(roi_size) if isinstance(roi_size, (list, tuple)) else roi_size,
                        overlap=overlap, sw_batch_size=sw_batch_size),
    )  # fmt: skip
    return WindowRun(model, config, device=device).run(image, label, image_id, logits=logits, tiles=tiles)


class WindowRun:
    """One model and configuration, applied to volumes one at a time (see :func:`analyze_windows`)."""

    def __init__(self, model: nn.Module, config: AnalysisConfig, *, device: str | torch.device | None = None):
        if config.windows is None:
            raise UsageError("config.windows must be set for a windowed analysis", argument="windows")
        self.model = hookable(model)
        self.config = config
        self.names = layer_names(model, config.capture.layers)
        self.device, self.dtype = model_device(model, device)

    def _check(self, image: Any, label: Any) -> tuple[int, ...]:
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
        if len(self.config.windows.roi_size) != len(spatial):
            raise UsageError(
                f"roi_size must give one window size per spatial dim ({len(spatial)}), got {self.config.windows.roi_size!r}",
                argument="roi_size",
            )
        return spatial

    def _tiles(self, padded: tuple[int, ...], roi: tuple[int, ...], tiles: Sequence[Tile] | None) -> list[Tile]:
        """MONAI's windows over the padded grid, or the caller's, checked."""
        if tiles is None:
            from monai.inferers import sliding_window_inference

            found: list[Tile] = []

            def note(win: torch.Tensor, locations: list) -> torch.Tensor:
                found.extend(tuple(loc[2:]) for loc in locations)
                return torch.zeros((win.shape[0], 1, *win.shape[2:]))

            sliding_window_inference(torch.zeros((1, 1, *padded)), roi_size=roi, sw_batch_size=64, predictor=note,
                                     overlap=self.config.windows.overlap, mode="constant", with_coord=True)  # fmt: skip
            return found
        out = []
        for t in tiles:
            t = tuple(t)
            if len(t) != len(padded) or not all(isinstance(s, slice) for s in t):
                raise UsageError(f"tiles must be tuples of {len(padded)} slices, got {t!r}", argument="tiles")
            sizes = tuple(len(range(*s.indices(n))) for s, n in zip(t, padded, strict=True))
            if sizes != roi or any(s.stop is not None and s.stop > n for s, n in zip(t, padded, strict=True)):
                raise UsageError(f"tile {t} is not a window of size {roi} inside the padded volume {padded}", argument="tiles")
            out.append(t)
        if not out:
            raise UsageError("tiles is empty", argument="tiles")
        return out

    @torch.no_grad()
    def run(
        self,
        image: torch.Tensor,
        label: torch.Tensor | None,
        image_id: str,
        *,
        logits: torch.Tensor | None = None,
        tiles: Sequence[Tile] | None = None,
    ) -> SAResult:
        """Analyse one volume (see :func:`analyze_windows` for ``logits`` and ``tiles``)."""
        spatial = self._check(image, label)
        cfg, dev, names, model = self.config, self.device, self.names, self.model
        r = cfg.readout
        if tiles is not None:
            first_tile = tuple(tiles)[0] if len(tiles) else ()
            roi = tuple(s.stop - s.start for s in first_tile) if first_tile else ()
        else:
            roi = tuple(s if w <= 0 else w for w, s in zip(cfg.windows.roi_size, spatial, strict=True))
        padded = tuple(max(w, s) for w, s in zip(roi, spatial, strict=True)) if roi else spatial
        before = [(p - s) // 2 for p, s in zip(padded, spatial, strict=True)]
        inside = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))

        def pad(t: torch.Tensor) -> torch.Tensor:  # (N, C, *spatial) -> (N, C, *padded), zeros around
            if padded == spatial:
                return t
            out = t.new_zeros((*t.shape[:2], *padded))
            out[(slice(None), slice(None), *inside)] = t
            return out

        tile_list = self._tiles(padded, roi, tiles)
        x = pad(image.unsqueeze(0).to(self.dtype))
        coverage = torch.zeros((1, 1, *padded), dtype=torch.float64)
        for t in tile_list:
            coverage[(slice(None), slice(None), *t)] += 1
        if bool((coverage[(slice(None), slice(None), *inside)] == 0).any()):
            raise UsageError("tiles do not cover the whole volume", argument="tiles")
        weight = torch.zeros_like(coverage)
        weight[(slice(None), slice(None), *inside)] = 1.0
        weight = (weight / coverage.clamp(min=1)).float()  # 1 / n(x) inside the volume, 0 in the padding

        size = cfg.windows.sw_batch_size
        groups = [list(range(i, min(i + size, len(tile_list)))) for i in range(0, len(tile_list), size)]
        store = _FeatureStore(cfg.capture.keep_bytes)
        shapes: dict[str, str] = {INPUT: shape_text((x.shape[1], *roi))}
        channels: dict[str, int] = {INPUT: int(x.shape[1])}
        why_not: dict[str, str] = {}
        first: dict[str, Any] = {}

        def crop(volume: torch.Tensor, group: list[int]) -> torch.Tensor:
            return torch.cat([volume[(slice(None), slice(None), *tile_list[i])] for i in group]).to(dev)

        def forward(gi: int, each: Callable[[str, torch.Tensor], None] | None) -> Any:
            """Run the windows of group ``gi``; hand each chosen layer's last output, as features, to
            ``each`` (inside its hook: a later in-place change cannot reach it) and keep the outputs
            not changed in place while the budget lasts. Returns the model output."""
            win = crop(x, groups[gi])
            describe = not first
            seen: dict[str, int] = {}
            last: dict[str, tuple[torch.Tensor, int]] = {}

            def on(name: str, t: torch.Tensor) -> None:
                seen[name] = seen.get(name, 0) + 1
                last[name] = (t, t._version)
                if describe:
                    feats, why = layer_features(t, win.shape[0], tuple(win.shape[2:]), cfg.capture.reshape)
                    shapes[name], channels[name] = shape_text(t.shape[1:]), 0 if feats is None else int(feats.shape[1])
                    if feats is None:
                        why_not[name] = why
                    else:
                        why_not.pop(name, None)
                elif each is not None and seen[name] == first["calls"].get(name):
                    feats, _ = layer_features(t, win.shape[0], tuple(win.shape[2:]), cfg.capture.reshape)
                    if feats is not None:
                        each(name, feats.float())

            if each is not None:
                each(INPUT, win.float())
            with eval_mode(model), FeatureRecorder(model, names, callback=on) as rec:
                out = model(win)
            if describe:
                first["order"], first["calls"] = list(rec.order), dict(rec.calls)
            kept = {INPUT: win.float()}
            for name, (t, version) in last.items():
                if t._version == version:  # not changed in place after its layer
                    feats, _ = layer_features(t, win.shape[0], tuple(win.shape[2:]), cfg.capture.reshape)
                    if feats is not None:
                        kept[name] = feats.float()
            store.offer(gi, kept)
            return out

        def features(gi: int, each: Callable[[str, torch.Tensor], None]) -> None:
            kept = store.get(gi)
            if kept is None or not scored.issubset(kept):
                forward(gi, each)
            else:
                for name in scored:
                    each(name, kept[name])

        # 1. the output: the caller's, or stitched over the windows (constant blending)
        if logits is None:
            total: torch.Tensor | None = None
            for gi, group in enumerate(groups):
                out = output_tensor(forward(gi, None), r.output_key)
                if tuple(out.shape[2:]) != roi:
                    raise UsageError(f"the model output {tuple(out.shape)} is not on the window's grid {roi}", argument="model")
                if total is None:
                    total = torch.zeros((1, out.shape[1], *padded), dtype=torch.float32)
                for j, i in enumerate(group):
                    total[(slice(None), slice(None), *tile_list[i])] += out[j : j + 1].float().cpu()
            stitched = (total / coverage.clamp(min=1))[(slice(None), slice(None), *inside)]
        else:
            stitched = logits.unsqueeze(0) if logits.ndim == image.ndim else logits
            if tuple(stitched.shape[2:]) != spatial or stitched.ndim != image.ndim + 1:
                raise UsageError(f"logits {tuple(logits.shape)} must be (1, K, *spatial) on the image grid {spatial}", argument="logits")
            forward(0, None)  # learn the layers' order, shapes and calls (kept for the next steps)
        depth = {INPUT: 0, **{n: d for d, n in enumerate(first["order"], start=1)}}
        for name in names:
            depth.setdefault(name, len(depth))
        skipped: dict[str, tuple[Status, str]] = {}
        for name in names:
            if name not in first["order"]:
                skipped[name] = (Status.NOT_CALLED, Status.NOT_CALLED.message)
            elif first["calls"].get(name, 0) == 0 or name not in shapes:
                skipped[name] = (Status.NOT_FEATURES, "the layer's output holds no tensor")
            elif name in why_not:
                skipped[name] = (Status.NOT_FEATURES, why_not[name])
        reused = sorted(n for n, c in first["calls"].items() if c > 1)
        if reused:
            warnings.warn(f"layers called more than once per forward pass (their last call is scored): {reused}", stacklevel=3)

        k = int(stitched.shape[1])
        kind = r.output if r.output != "auto" else ("sigmoid" if k == 1 else "softmax")
        classes = r.resolve_classes(k, kind)
        prob, pred, _ = class_probabilities(stitched, r.output, classes, r.output_key)
        del stitched
        valid = bool(torch.isfinite(prob).all())
        prob = torch.nan_to_num(prob.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
        pred = pred.float() * float(valid)
        label_t = None
        if label is not None:
            lab = (label if label.ndim == image.ndim else label.unsqueeze(0)).unsqueeze(0).to(prob.device, torch.float32)
            label_t = label_targets(lab, k, classes, r.target is not None or r.multi).float()
        g_all = pad(label_t if cfg.scoring.guide == "label" else prob)
        pred_p = pad(pred)
        label_p = None if label_t is None else pad(label_t)
        m = (x != 0).any(dim=1, keepdim=True).float() if cfg.scoring.mask == "nonzero" else None
        s = cfg.scoring
        metrics = {c: SegmentationAbility(units=s.units, empty=s.empty, chunk_size=s.chunk_size) for c in classes}
        protos: dict[tuple[int, str], PrototypeCounts] = {}
        scored = {INPUT, *(n for n in names if n not in skipped)}
        votes: dict[tuple[int, str], torch.Tensor] = {}

        def prototype_step(gi: int) -> None:
            group = groups[gi]
            w_w, m_w = crop(weight, group), None if m is None else crop(m, group)
            guides = [crop(g_all[:, j : j + 1], group) for j in range(len(classes))]

            def add(name: str, feats: torch.Tensor) -> None:
                if name not in scored:
                    return
                for j, c in enumerate(classes):
                    counts = prototype_update(feats, guides[j], m_w, weights=w_w)
                    summed = PrototypeCounts(counts.sums.sum(0, keepdim=True), counts.total.sum(0, keepdim=True))
                    protos[(c, name)] = summed if (c, name) not in protos else protos[(c, name)] + summed

            features(gi, add)

        def count_step(gi: int) -> None:
            group = groups[gi]
            b = len(group)
            w_w, m_w = crop(weight, group), None if m is None else crop(m, group)
            per_class = []
            for j in range(len(classes)):
                refs = crop(pred_p[:, j : j + 1], group)
                if label_p is not None:
                    refs = torch.cat([crop(label_p[:, j : j + 1], group), refs], dim=1)
                per_class.append((crop(g_all[:, j : j + 1], group), refs, {}))
            finite = torch.full((b,), valid, dtype=torch.bool)

            def add(name: str, feats: torch.Tensor) -> None:
                if name not in scored:
                    return
                for j, c in enumerate(classes):
                    g_w, refs, cache = per_class[j]
                    p = protos[(c, name)].prototypes().to(dev).expand(b, -1, -1)
                    metrics[c].update(
                        {name: feats}, g_w, refs, m_w, ids=[image_id] * b, weights=w_w, prototypes={name: p},
                        output_finite=finite, prediction=refs.shape[1] - 1, validate=False, cache=cache,
                    )  # fmt: skip
                    if s.keep_maps:
                        seg = class_logits(feats, p, roi)
                        seg = (seg[:, 1] > seg[:, 0]).float().unsqueeze(1) * w_w
                        vote = votes.setdefault((c, name), torch.zeros((1, 1, *padded)))
                        for jj, i in enumerate(group):
                            vote[(slice(None), slice(None), *tile_list[i])] += seg[jj : jj + 1].cpu()

            features(gi, add)

        if valid:
            for gi in range(len(groups)):  # 2. the volume prototypes of every layer and class
                prototype_step(gi)
            for gi in range(len(groups)):  # 3. each window's features to the nearer prototype, counted with 1 / n(x)
                count_step(gi)
        store.clear()

        maps: dict[str, Any] = {}
        if s.keep_maps:
            maps[image_id] = _volume_maps(image, label_t, prob, votes, classes, names, inside, r.multi)
        settings = {
            **cfg.settings(), "roi_size": list(roi), "model": type(model).__name__,
            "layers": [INPUT, *sorted(names, key=lambda n: depth[n])], "spatial_dims": len(spatial), "device": str(dev),
            "n_images": 1, "classes": list(classes), "padded": list(padded) if padded != spatial else None,
        }  # fmt: skip
        rows = _Result(metrics, image_id, [INPUT, *names], depth, shapes, channels, skipped, valid, r)
        return rows.result(label_t, pred, settings, maps)


class _FeatureStore:
    """Layer outputs of window groups kept between the steps, while ``budget`` bytes last."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.kept: dict[int, dict[str, torch.Tensor]] = {}

    def offer(self, group: int, feats: dict[str, torch.Tensor]) -> None:
        if group in self.kept:
            return
        size = sum(f.nelement() * f.element_size() for f in feats.values())
        if self.used + size <= self.budget:
            self.kept[group] = feats
            self.used += size

    def get(self, group: int) -> dict[str, torch.Tensor] | None:
        return self.kept.get(group)

    def clear(self) -> None:
        self.kept.clear()
        self.used = 0


def _volume_maps(image, label_t, prob, votes, classes, names, inside, multi) -> dict[str, Any]:
    """The kept maps of a volume: a layer's map is the windows' majority (weights 1 / n(x))."""
    per_class = {}
    for j, c in enumerate(classes):
        per_class[c] = {
            "label": None if label_t is None else label_t[0, j].to(torch.uint8).cpu().numpy(),
            "prediction": prob[0, j].float().cpu().numpy(),
            "layers": {n: (votes[(c, n)][(0, 0, *inside)] > 0.5).to(torch.uint8).numpy() for n in [INPUT, *names] if (c, n) in votes},
            "units": {},
        }
    entry = {"image": image.float().cpu().numpy(), **per_class[classes[0]]}
    if multi:
        entry["classes"] = per_class
    return entry


class _Result:
    """The tables of one windowed volume."""

    def __init__(self, metrics, image_id, names, depth, shapes, channels, skipped, valid, readout: Readout):
        self.metrics, self.image_id, self.names, self.depth = metrics, image_id, names, depth
        self.shapes, self.channels, self.skipped, self.valid, self.readout = shapes, channels, skipped, valid, readout

    def result(self, label_t, pred, settings, maps) -> SAResult:
        has_label = label_t is not None
        image_id = self.image_id
        layer_rows, unit_frames, image_rows = [], [], []
        for j, (c, metric) in enumerate(self.metrics.items()):
            scores = metric.scores()
            for name in self.names:
                row = {"image": image_id, **self.readout.class_columns(c), "layer": name, "depth": self.depth[name], "shape": self.shapes.get(name, "")}
                if name in self.skipped or name not in scores:
                    status, why = self.skipped.get(name, (Status.OUTPUT_NOT_FINITE, Status.OUTPUT_NOT_FINITE.message))
                    layer_rows.append({**row, "channels": 0 if name in self.skipped else self.channels.get(name, 0),
                                       "sa": math.nan, "sa_pred": math.nan, "status": status.value, "reason": why})  # fmt: skip
                    continue
                sc = scores[name]
                sa = sc.sa[0].double().cpu().numpy()
                layer_rows.append({**row, "channels": self.channels[name], "sa": float(sa[0]) if has_label else math.nan,
                                   "sa_pred": float(sa[-1]), "status": sc.status[0].value, "reason": sc.status[0].message})  # fmt: skip
                if sc.units is not None:
                    u = sc.units[0].double().cpu().numpy()  # (R, C)
                    n = u.shape[1]
                    unit_frames.append(pd.DataFrame({
                        "image": [image_id] * n, **{k: [v] * n for k, v in self.readout.class_columns(c).items()}, "layer": name,
                        "unit": np.arange(n), "sa": u[0] if has_label else np.full(n, math.nan), "sa_pred": u[-1],
                    }))  # fmt: skip
            pj = pred[:, j]
            if has_label and self.valid:
                p, lab = pj.flatten().double(), label_t[:, j].flatten().double()
                dice = float(dice_from_counts((p * lab).sum(), p.sum(), lab.sum(), metric.empty))
            else:
                dice = math.nan
            status = Status.OK if self.valid else Status.OUTPUT_NOT_FINITE
            if self.valid and float(pj.sum()) == 0:
                status = Status.EMPTY_PREDICTION
            image_rows.append({"image": image_id, **self.readout.class_columns(c), "dice": dice, "status": status.value, "reason": status.message})
        layers_df = typed(pd.DataFrame(layer_rows), LAYERS)
        keys = ["image", "class"] if self.readout.multi else ["image"]
        images_df = typed(pd.DataFrame(image_rows).join(layer_means(layers_df), on=keys), IMAGES)
        units_df = None
        if settings.get("units"):
            units_df = typed(pd.concat(unit_frames, ignore_index=True), UNITS) if unit_frames else empty_table(UNITS)
        from segability import __version__

        settings = {**settings, "version": __version__, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        return SAResult(layers=layers_df, images=images_df, units=units_df, settings=settings, maps=maps)
