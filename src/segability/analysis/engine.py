"""The engine: runs batches through a model and reduces every chosen layer to scores at once.

Each batch first runs once for the prediction (the guide). Layer outputs seen in that pass are kept
at their own resolution up to ``memory_budget`` bytes and scored when the guide exists; the other
layers (beyond the budget, or changed in place after the layer) are scored in a second forward pass
inside their hooks, so their features never outlive their layer's step. Scores go through the one
reduction, :class:`segability.SegmentationAbility`. A batch that fails in either pass is recorded
(status ``failed``) and the run goes on.
"""

from __future__ import annotations

import datetime as _dt
import math
import traceback
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis.config import AnalysisConfig
from segability.analysis.features import (
    batch_mask,
    hookable,
    layer_features,
    layer_names,
    model_device,
    shape_text,
)
from segability.analysis.inputs import Batch, IdBook
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
from segability.core.functional import (
    UndefinedPrototypeWarning,
    class_logits,
    class_weights,
    dice_from_counts,
    protoseg_units,
    prototypes_from_weights,
)
from segability.core.metric import ImageScores, SegmentationAbility
from segability.core.reduction import Status
from segability.errors import UsageError

__all__ = ["Engine", "BEST_UNITS_KEPT", "model_device"]

BEST_UNITS_KEPT = 3
Progress = Callable[[int], None]


@dataclass
class _Context:
    """What every layer of one batch is scored against: per class scored, its guide and references."""

    ids: list[str]
    classes: tuple[int, ...]
    guides: list[torch.Tensor]  # per class (B, 1, *S)
    refs: list[torch.Tensor]  # per class (B, R, *S): [label,] prediction
    has_label: bool
    mask: torch.Tensor | None
    output_finite: torch.Tensor  # (B,) bool
    spatial: tuple[int, ...]  # the input grid
    caches: list[dict] = field(default_factory=list)  # per class, shared by the batch's layers
    channels: dict[str, int] = field(default_factory=dict)  # channels of each scored layer's features

    def __post_init__(self) -> None:
        self.caches = [{} for _ in self.classes]

    @property
    def guide(self) -> torch.Tensor:
        return self.guides[0]

    @property
    def prediction(self) -> int:
        return self.refs[0].shape[1] - 1


@dataclass
class _FirstPass:
    """What the prediction pass saw of the chosen layers."""

    calls: dict[str, int]  # calls per layer
    order: list[str]  # layers in the order first called
    tensor_calls: dict[str, int] = field(default_factory=dict)  # calls whose output held a tensor
    kept: dict[str, tuple[torch.Tensor, int]] = field(default_factory=dict)  # last output, its version
    kept_bytes: int = 0


class Engine:
    """Streams batches through ``model`` and keeps the rows of the result tables.

    Args:
        model: any ``nn.Module`` (not TorchScript: it takes no forward hooks).
        config: the validated options.
        device: where to run; default the model's device.

    Example:
        >>> import torch
        >>> from monai.networks.nets import UNet
        >>> from segability.analysis.inputs import batches
        >>> net = UNet(2, 1, 1, channels=(4, 8), strides=(2,))
        >>> engine = Engine(net, AnalysisConfig())
        >>> engine.run(batches(torch.rand(2, 1, 16, 16), None, None, None, 8))
        >>> engine.result().layers["status"].unique().tolist()
        ['ok']
    """

    def __init__(self, model: nn.Module, config: AnalysisConfig, *, device: str | torch.device | None = None):
        self.model = hookable(model)
        self.config = config
        self.names = layer_names(model, config.capture.layers)
        self.device, self.dtype = model_device(model, device)
        r = config.readout
        # the classes scored: known now unless classes="all" (then from the first output)
        self.classes: tuple[int, ...] | None = None if r.classes == "all" else (r.classes or (r.target_index,))
        self.metrics: dict[int, SegmentationAbility] = {}
        if self.classes is not None:
            self._make_metrics(self.classes)
        self.depth: dict[str, int] = {INPUT: 0}
        self.order_known = False
        self.book = IdBook()
        self.image_order: list[str] = []
        self.layer_rows = _Rows()
        self.unit_rows = _Rows()
        self.image_rows: list[dict[str, Any]] = []
        self.maps: dict[str, dict[str, Any]] = {}
        self.failed: list[tuple[str, str]] = []
        self.reused: set[str] = set()
        self.first_error: Exception | None = None
        self.spatial_dims: int | None = None

    @property
    def metric(self) -> SegmentationAbility:
        """The reduction of the (first) class scored; one per class in :attr:`metrics`."""
        if self.classes is None:
            raise RuntimeError('classes="all" is resolved on the first batch; no metric before it')
        return self.metrics[self.classes[0]]

    def _make_metrics(self, classes: tuple[int, ...]) -> None:
        s = self.config.scoring
        self.classes = classes
        self.metrics = {c: SegmentationAbility(units=s.units, empty=s.empty, chunk_size=s.chunk_size) for c in classes}

    # ---------------------------------------------------------------------------------- run
    def run(self, batches: Iterable[Batch], progress: Progress | None = None) -> None:
        """Process every batch (``progress(n)`` is called after each with its image count)."""
        # inference_mode off: its tensors have no version counter, which tells outputs changed in place
        with eval_mode(self.model), torch.inference_mode(False), torch.no_grad():
            for batch in batches:
                self.process(batch)
                if progress is not None:
                    progress(len(batch.ids))

    def process(self, batch: Batch) -> None:
        """Score one batch; a failure in the model is recorded for its images and the run goes on."""
        given = batch.given or [False] * len(batch.ids)
        batch.ids = [self.book.add(i, g) for i, g in zip(batch.ids, given, strict=True)]
        self.image_order.extend(batch.ids)
        x = self._input(batch)
        try:
            out, first = self._first_pass(x)
        except Exception as exc:  # one failing batch of many is recorded, the run goes on
            self._fail(batch.ids, "model failed", exc)
            return
        ctx, label, pred, shapes, skipped = self._reduce(batch, x, out, first, strict=False)
        self._rows(ctx, shapes, skipped)
        self.image_rows.extend(self._image_rows(ctx, label, pred))

    def score(self, batch: Batch) -> None:
        """Add the counts of every layer on one batch to :attr:`metric`, and write no rows.

        For callers that keep the scores themselves (the training integrations read
        ``metric.state_tensors()`` and reset it): the ids of ``batch`` are used as given, and a
        failure in either forward pass raises instead of being recorded.
        """
        x = self._input(batch)
        out, first = self._first_pass(x)
        self._reduce(batch, x, out, first, strict=True)

    def _input(self, batch: Batch) -> torch.Tensor:
        if self.config.scoring.guide == "label" and batch.labels is None:
            raise UsageError(f'guide="label" needs labels, but images {batch.ids} came without them', argument="labels")
        x = batch.images.to(device=self.device, dtype=self.dtype)
        self.spatial_dims = self.spatial_dims or x.ndim - 2
        return x

    def _reduce(self, batch: Batch, x: torch.Tensor, out: Any, first: _FirstPass, *, strict: bool):
        """Score the input and every chosen layer of a batch whose first pass has run."""
        self._learn_order(first)
        ctx, label, pred, prob = self._context(batch, x, out)
        del out
        self._start_maps(ctx, batch.images, label, prob)
        shapes: dict[str, str] = {INPUT: shape_text(x.shape[1:])}
        skipped: dict[str, tuple[Status, str]] = {}
        self._score(INPUT, x, ctx)
        pending = []
        for name in self.names:
            if first.calls.get(name, 0) == 0:
                skipped[name] = (Status.NOT_CALLED, Status.NOT_CALLED.message)
            elif first.tensor_calls.get(name, 0) == 0:
                skipped[name] = (Status.NOT_FEATURES, "the layer's output holds no tensor")
            elif name in first.kept and first.kept[name][0]._version == first.kept[name][1]:
                self._layer(name, first.kept.pop(name)[0], ctx, shapes, skipped)
            else:  # low_memory, or the output was changed in place after the layer
                pending.append(name)
        first.kept.clear()
        if pending:
            try:
                self._second_pass(pending, x, first.tensor_calls, ctx, shapes, skipped)
            except Exception as exc:  # the layers scored so far are kept; the others are recorded
                if strict:
                    raise
                why = f"second forward pass failed: {type(exc).__name__}: {exc}".replace("\n", " ")
                self.first_error = self.first_error or exc
                for name in pending:
                    skipped.setdefault(name, (Status.FAILED, why))
        return ctx, label, pred, shapes, skipped

    # ------------------------------------------------------------------------------ passes
    def _first_pass(self, x: torch.Tensor) -> tuple[Any, _FirstPass]:
        """Run the model once; count the chosen layers' calls and keep their last outputs while
        they fit in the memory budget (the others are scored in a second pass)."""
        seen = _FirstPass(calls={}, order=[])
        budget = self.config.capture.keep_bytes

        def on_output(name: str, t: torch.Tensor) -> None:
            seen.tensor_calls[name] = seen.tensor_calls.get(name, 0) + 1
            old = seen.kept.pop(name, None)
            if old is not None:
                seen.kept_bytes -= old[0].nbytes
            size = t.nelement() * t.element_size()
            if seen.kept_bytes + size <= budget:
                seen.kept[name] = (t, t._version)
                seen.kept_bytes += size

        out, seen.calls, seen.order = self.run_model(x, self.names, on_output)
        return out, seen

    def _second_pass(self, names, x, tensor_calls, ctx, shapes, skipped) -> None:
        """Run the model again and score each layer inside its hook, on the call the first pass saw last."""
        seen: dict[str, int] = {}
        done: set[str] = set()

        def on_output(name: str, t: torch.Tensor) -> None:
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == tensor_calls[name]:
                self._layer(name, t, ctx, shapes, skipped)
                done.add(name)

        self.run_model(x, names, on_output)
        for name in names:
            if name not in done:
                skipped[name] = (Status.NOT_CALLED, "not called in the second forward pass (the model is not deterministic)")

    def run_model(
        self, x: torch.Tensor, names: list[str], on_output: Callable[[str, torch.Tensor], None]
    ) -> tuple[Any, dict[str, int], list[str]]:
        """One forward pass with ``on_output(name, output)`` called inside the hooks of ``names``.

        The one place the engine runs the model. Returns the output, the calls per layer and the
        layers in the order first called. Callers that keep their own hooks registered and their
        own forward callable (the training integrations) override it.
        """
        with FeatureRecorder(self.model, names, callback=on_output) as rec:
            out = self.model(x)
        return out, dict(rec.calls), list(rec.order)

    def _learn_order(self, first: _FirstPass) -> None:
        if not self.order_known:
            for d, name in enumerate(first.order, start=1):
                self.depth[name] = d
            for name in self.names:
                self.depth.setdefault(name, len(self.depth))
            self.order_known = True
        self.reused.update(n for n, c in first.calls.items() if c > 1)

    def _context(self, batch: Batch, x: torch.Tensor, out: Any):
        r = self.config.readout
        if self.classes is None:
            t = output_tensor(out, r.output_key)
            kind = r.output if r.output != "auto" else ("sigmoid" if t.shape[1] == 1 else "softmax")
            self._make_metrics(r.resolve_classes(int(t.shape[1]), kind))
        classes = self.classes
        prob, pred, k = class_probabilities(out, r.output, classes, r.output_key)
        spatial = tuple(x.shape[2:])
        label = None
        if batch.labels is not None:
            if tuple(prob.shape[2:]) != spatial:
                raise UsageError(
                    f"the model output {tuple(prob.shape)} is not on the image grid {spatial}: labels cannot be compared "
                    "with it (for volumes the model cannot take whole, use sliding windows: roi_size)",
                    argument="labels",
                )
            lab = batch.labels.to(device=self.device, dtype=torch.float32)
            lab = lab.unsqueeze(1) if lab.ndim == x.ndim - 1 else lab
            label = label_targets(lab, k, classes, r.target is not None or r.multi)
        finite = torch.isfinite(prob.flatten(1)).all(dim=1)
        prob = torch.nan_to_num(prob.float(), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
        pred = pred.float() * finite.view(-1, *([1] * (pred.ndim - 1)))
        guide = label if self.config.scoring.guide == "label" else prob
        each = range(len(classes))
        ctx = _Context(
            ids=batch.ids,
            classes=classes,
            guides=[guide[:, j : j + 1] for j in each],
            refs=[pred[:, j : j + 1] if label is None else torch.cat([label[:, j : j + 1], pred[:, j : j + 1]], dim=1) for j in each],
            has_label=label is not None,
            mask=batch_mask(self.config.scoring.mask, batch, self.device, tuple(guide.shape[2:])),
            output_finite=finite,
            spatial=spatial,
        )
        return ctx, label, pred, prob

    # ----------------------------------------------------------------------------- scoring
    def _layer(self, name: str, output: torch.Tensor, ctx: _Context, shapes: dict, skipped: dict) -> None:
        shapes[name] = shape_text(output.shape[1:])
        feats, why = layer_features(output, len(ctx.ids), ctx.spatial, self.config.capture.reshape)
        if feats is None:
            skipped[name] = (Status.NOT_FEATURES, why)
            return
        self._score(name, feats, ctx)

    def _score(self, name: str, feats: torch.Tensor, ctx: _Context) -> None:
        ctx.channels[name] = int(feats.shape[1])
        for j, c in enumerate(ctx.classes):
            self.metrics[c].update(
                {name: feats}, ctx.guides[j], ctx.refs[j], ctx.mask, ids=ctx.ids, output_finite=ctx.output_finite,
                prediction=ctx.prediction, validate=False, cache=ctx.caches[j],
            )  # fmt: skip
        if any(i in self.maps for i in ctx.ids):
            self._keep_layer_maps(name, feats, ctx)

    def _rows(self, ctx: _Context, shapes: dict[str, str], skipped: dict[str, tuple[Status, str]]) -> None:
        for c in ctx.classes:
            scores = self.metrics[c].scores()
            self.metrics[c].reset()
            for name in [INPUT, *self.names]:
                if name in scores:
                    self._scored_rows(name, scores[name], ctx, shapes[name], c)
                else:
                    status, why = skipped[name]
                    self._skipped_rows(ctx.ids, name, status, why, shapes.get(name, ""), c)

    def _scored_rows(self, name: str, s: ImageScores, ctx: _Context, shape: str, c: int) -> None:
        sa = s.sa.detach().double().cpu().numpy()
        n = len(ctx.ids)
        self.layer_rows.add(
            n, image=ctx.ids, **self.config.readout.class_columns(c), layer=name, depth=self.depth[name], channels=ctx.channels[name],
            shape=shape, sa=sa[:, 0] if ctx.has_label else np.full(n, math.nan), sa_pred=sa[:, -1],
            status=[st.value for st in s.status], reason=[st.message for st in s.status],
        )  # fmt: skip
        if s.units is not None:
            u = s.units.detach().double().cpu().numpy()  # (B, R, C)
            k = u.shape[2]
            self.unit_rows.add(
                n * k, image=np.repeat(np.array(ctx.ids, dtype=object), k), **self.config.readout.class_columns(c), layer=name,
                unit=np.tile(np.arange(k), n), sa=u[:, 0].reshape(-1) if ctx.has_label else np.full(n * k, math.nan),
                sa_pred=u[:, -1].reshape(-1),
            )  # fmt: skip

    def _skipped_rows(self, ids: list[str], name: str, status: Status, why: str, shape: str, c: int) -> None:
        n = len(ids)
        self.layer_rows.add(
            n, image=ids, **self.config.readout.class_columns(c), layer=name, depth=self.depth.get(name, 0), channels=0, shape=shape,
            sa=np.full(n, math.nan), sa_pred=np.full(n, math.nan), status=status.value, reason=why,
        )  # fmt: skip

    def _image_rows(self, ctx: _Context, label: torch.Tensor | None, pred: torch.Tensor) -> list[dict[str, Any]]:
        n = len(ctx.ids)
        finite = ctx.output_finite.cpu().tolist()
        rows = []
        for j, c in enumerate(ctx.classes):
            pj = pred[:, j : j + 1]
            if label is None:
                dice = [math.nan] * n
            else:
                p, lab = pj.flatten(1).double(), label[:, j].flatten(1).double()
                dice = dice_from_counts((p * lab).sum(1), p.sum(1), lab.sum(1), self.config.scoring.empty).cpu().tolist()
            empty_pred = (pj.flatten(1).sum(1) == 0).cpu().tolist()
            for i, image in enumerate(ctx.ids):
                status = Status.OK if finite[i] else Status.OUTPUT_NOT_FINITE
                if finite[i] and empty_pred[i]:
                    status = Status.EMPTY_PREDICTION
                rows.append({"image": image, **self.config.readout.class_columns(c), "dice": dice[i] if finite[i] else math.nan,
                             "status": status.value, "reason": status.message})  # fmt: skip
        return rows

    def _fail(self, ids: list[str], what: str, exc: Exception) -> None:
        self.first_error = self.first_error or exc
        why = f"{what}: {type(exc).__name__}: {exc}{_hint(exc)}".replace("\n", " ")
        detail = "".join(traceback.format_exception(exc))
        classes = self.classes if self.classes is not None else (-1,)  # classes="all" before any output
        for image in ids:
            self.failed.append((image, detail))
            for c in classes:
                self.image_rows.append({"image": image, **self.config.readout.class_columns(c), "dice": math.nan,
                                        "status": Status.FAILED.value, "reason": why})  # fmt: skip
                for name in (INPUT, *self.names):
                    self._skipped_rows([image], name, Status.FAILED, why, "", c)

    # -------------------------------------------------------------------------------- maps
    def _start_maps(self, ctx: _Context, images: torch.Tensor, label: torch.Tensor | None, prob: torch.Tensor) -> None:
        for i, image in enumerate(ctx.ids):
            if len(self.maps) < self.config.scoring.keep_maps:
                per_class = {
                    c: {
                        "label": None if label is None else label[i, j].to(torch.uint8).cpu().numpy(),
                        "prediction": prob[i, j].float().cpu().numpy(),
                        "layers": {},
                        "units": {},
                    }
                    for j, c in enumerate(ctx.classes)
                }
                # the first class at the top level (a binary run's layout); every class under "classes"
                self.maps[image] = {"image": images[i].float().cpu().numpy(), **per_class[ctx.classes[0]]}
                if self.config.readout.multi:
                    self.maps[image]["classes"] = per_class

    def _keep_layer_maps(self, layer: str, feats: torch.Tensor, ctx: _Context) -> None:
        kept = [i for i, image in enumerate(ctx.ids) if image in self.maps]
        idx = torch.tensor(kept, device=feats.device)
        dtype = torch.float64 if feats.dtype == torch.float64 else torch.float32
        f = feats[idx].to(dtype)
        m = None if ctx.mask is None else ctx.mask[idx].to(dtype)
        for ci, c in enumerate(ctx.classes):
            g = ctx.guides[ci][idx].to(dtype)
            protos = prototypes_from_weights(f, class_weights(g, m))
            logits = class_logits(f, protos, tuple(g.shape[2:]))
            seg = (logits[:, 1] > logits[:, 0]).to(torch.uint8).cpu().numpy()
            units = self.metrics[c].scores([layer])[layer].units if self.config.scoring.units else None
            for j, i in enumerate(kept):
                entry = self.maps[ctx.ids[i]]
                entry = entry["classes"][c] if "classes" in entry else entry
                entry["layers"][layer] = seg[j]
                if units is None or not bool(torch.isfinite(protos[j]).all()):
                    continue
                scores = units[i, 0 if ctx.has_label else -1].cpu().numpy()  # this batch's images only
                order = [int(u) for u in np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable")[:BEST_UNITS_KEPT]]
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UndefinedPrototypeWarning)
                    maps = protoseg_units(f[j : j + 1, order], g[j : j + 1], None if m is None else m[j : j + 1])
                entry["units"][layer] = {u: maps[0, n].to(torch.uint8).cpu().numpy() for n, u in enumerate(order)}

    # ------------------------------------------------------------------------------ result
    def result(self, *, metadata: pd.DataFrame | None = None, settings: dict[str, Any] | None = None) -> SAResult:
        """The tables of every batch processed so far, images in the order they came.

        Raises:
            UsageError: when no image was given.
            RuntimeError: when the model failed on every image (the first error is chained).
        """
        n_images = len(self.image_order)
        if n_images == 0:
            raise UsageError("images is empty: nothing to analyse", argument="images")
        if self.first_error is not None and len(self.failed) == n_images:
            raise RuntimeError(f"the model failed on every image; first error: {self.first_error}") from self.first_error
        if self.failed:
            warnings.warn(f"{len(self.failed)} of {n_images} images failed in the model; see the 'reason' column", stacklevel=3)
        if self.reused:
            warnings.warn(
                f"layers called more than once per forward pass (their last call is scored): {sorted(self.reused)}",
                stacklevel=3,
            )
        position = {image: i for i, image in enumerate(self.image_order)}
        layers_df = self.layer_rows.frame() if self.layer_rows else empty_table(LAYERS)
        layers_df = typed(layers_df.assign(depth=layers_df["layer"].map(self.depth).fillna(0)), LAYERS)
        by_class = ["class"] if self.config.readout.multi else []
        layers_df = _in_order(layers_df, position, [*by_class, "depth"])
        columns = ["image", *(["class", "class_name"] if by_class else []), "dice", "status", "reason"]
        images_df = pd.DataFrame(self.image_rows, columns=columns)
        images_df = images_df.join(layer_means(layers_df), on=["image", *by_class])
        images_df = _in_order(typed(images_df, IMAGES), position, by_class)
        if metadata is not None:
            if "image" not in metadata.columns:
                raise UsageError("metadata must have an 'image' column with the image ids", argument="metadata")
            meta = metadata.assign(image=metadata["image"].astype(str))
            # a metadata column named like a column of the table (the class columns of a
            # multi-class run included, even when this run has none) keeps its values as NAME_meta
            taken = [c for c in metadata.columns if c != "image" and c in IMAGES.names and c not in images_df.columns]
            meta = meta.rename(columns={c: f"{c}_meta" for c in taken})
            images_df = images_df.merge(meta, on="image", how="left", suffixes=("", "_meta"))
        units_df = None
        if self.config.scoring.units:
            units_df = self.unit_rows.frame() if self.unit_rows else empty_table(UNITS)
            units_df = typed(units_df, UNITS)
            depth = units_df["layer"].map(self.depth)
            units_df = _in_order(units_df.assign(_depth=depth), position, [*by_class, "_depth", "unit"]).drop(columns="_depth")
        from segability import __version__

        all_settings = {
            **self.config.settings(),
            "layers": [INPUT, *sorted(self.names, key=lambda n: self.depth.get(n, 0))],
            "spatial_dims": self.spatial_dims,
            "n_images": n_images,
            "device": str(self.device),
            "version": __version__,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(settings or {}),
        }
        return SAResult(layers=layers_df, images=images_df, units=units_df, maps=self.maps, settings=all_settings)


class _Rows:
    """Columns of a table, added a block of rows at a time; one DataFrame at the end (a DataFrame
    per layer and batch would cost more than scoring the layer)."""

    def __init__(self) -> None:
        self._columns: dict[str, list[np.ndarray]] = {}

    def __bool__(self) -> bool:
        return bool(self._columns)

    def add(self, n: int, **columns: Any) -> None:
        """``n`` rows; a value is a sequence of ``n`` or one value for every row."""
        for name, value in columns.items():
            if isinstance(value, (str, int, float)) or value is None:
                block = np.full(n, value, dtype=object if isinstance(value, str) or value is None else None)
            else:
                block = np.asarray(value, dtype=object if isinstance(value, list) else None)
            self._columns.setdefault(name, []).append(block)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: np.concatenate(blocks) for name, blocks in self._columns.items()})


def _hint(exc: Exception) -> str:
    """What to do about a model error whose cause is the input's size (in parentheses), or ""."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and any(w in text for w in ("Sizes of tensors must match", "Expected size", "size mismatch", "shape")):
        return (" (hint: the input's size may not suit the network: a U-Net needs sizes divisible by its total stride, "
                "and a 3D volume it cannot take whole needs sliding windows: --roi-size / roi_size)")  # fmt: skip
    return ""


def _in_order(df: pd.DataFrame, position: dict[str, int], by: list[str]) -> pd.DataFrame:
    """Rows by image (in the order images came), then ``by``; a fresh index."""
    keyed = df.assign(_pos=df["image"].map(position))
    return keyed.sort_values(["_pos", *by], kind="stable").drop(columns="_pos").reset_index(drop=True)
