"""Analyse folders of image files, resumably, on a local engine or on Ray.

:func:`analyze_files` is what ``segability analyze`` runs: it finds and pairs the files, loads the
model once per worker, analyses every image on its own and writes its tables as soon as it is done
(Parquet shards under ``RUN_DIR/shards``, each written to a temporary name and renamed), then merges
the shards into the result folder of :meth:`segability.SAResult.save` (``layers.parquet``,
``images.parquet``, ``units.parquet``, ``settings.json``, optional ``maps.npz``) plus ``errors.csv``
(``file``, ``error``) and, when the report package is importable, ``report.html``.

A run killed at any moment leaves only complete shards: an image is done when its
``<name>.images.parquet`` shard exists, and that shard is renamed into place last. ``resume=True``
skips the images already done (failed images are retried) and gives the same final tables as an
uninterrupted run. The local engine never imports Ray.

Large volumes go through :func:`analyze_windows` (sliding windows, MONAI
``sliding_window_inference``), which accumulates each layer's scores over the windows.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from segability.analysis import INPUT, RESULT_FILES, SAResult, analyze, analyze_windows, layer_names
from segability.analysis.results import (
    IMAGES,
    LAYERS,
    RUN_FILE,
    SHARD_DIR,
    UNITS,
    decode_maps,
    empty_table,
    encode_maps,
    table_bytes,
    typed,
    write_atomic,
)
from segability.io.images import find_images, load_item, load_preprocess, pair_labels
from segability.io.models import load_model
from segability.progress import progress_bar

__all__ = ["BatchSummary", "analyze_files", "analyze_windows", "safe_name"]

Engine = Literal["local", "ray"]
ERRORS_FILE = "errors.csv"
# Shard kinds in the order they are written; "images" last, so it marks the image as done.
SHARD_KINDS = ("layers.parquet", "units.parquet", "maps.npz", "images.parquet")
ERROR_KIND = "error.json"
# Settings that must match for a resumed run to add to the same tables.
FINGERPRINT_KEYS = (
    "model", "weights", "model_args", "layers", "units", "guide", "output", "target", "mask",
    "output_key", "empty", "preprocess", "roi_size", "overlap",
)  # fmt: skip


# ----------------------------------------------------------------------------------- file names
def safe_name(image_id: str) -> str:
    """A file-name-safe, collision-resistant shard name for an image id.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``, leading dots and
    dashes go, the rest is cut to 64 characters, and a hash of the full id is appended, so no id
    (``../../x.nii.gz``, ``a/b``) can name a path outside the shard folder or collide with another.

    Example:
        >>> safe_name("../../etc/passwd").startswith("etc_passwd-")
        True
    """
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(image_id)).lstrip("._-")[:64] or "image"
    digest = hashlib.sha256(str(image_id).encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{base}-{digest}"


# --------------------------------------------------------------------------------- the run state
@dataclass
class _Item:
    index: int
    image_id: str
    file: str
    label: str  # "" when the image has no label


@dataclass
class _Outcome:
    index: int
    image_id: str
    file: str
    error: str  # "" on success
    shards: dict[str, bytes] = field(default_factory=dict)


class _Shards:
    """The per-image shard files of a run folder."""

    def __init__(self, out: Path):
        self.dir = out / SHARD_DIR

    def path(self, image_id: str, kind: str) -> Path:
        path = self.dir / f"{safe_name(image_id)}.{kind}"
        if path.parent != self.dir:  # safe_name never lets this happen; keep the guarantee explicit
            raise ValueError(f"unsafe shard name for image id {image_id!r}")
        return path

    def own_files(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        kinds = (*SHARD_KINDS, ERROR_KIND)
        return [p for p in self.dir.iterdir() if p.name == RUN_FILE or p.name.endswith(".tmp") or p.name.endswith(kinds)]

    def clear(self) -> None:
        for p in self.own_files():
            p.unlink()

    def drop_partial(self) -> None:
        for p in self.own_files():
            if p.name.endswith(".tmp"):
                p.unlink()

    def done(self, image_id: str) -> bool:
        return self.path(image_id, "images.parquet").is_file()

    def write(self, outcome: _Outcome) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        error_path = self.path(outcome.image_id, ERROR_KIND)
        if outcome.error:
            for kind in SHARD_KINDS[::-1]:
                self.path(outcome.image_id, kind).unlink(missing_ok=True)
            payload = {"file": outcome.file, "image": outcome.image_id, "error": outcome.error}
            write_atomic(error_path, json.dumps(payload).encode())
            return
        for kind in SHARD_KINDS:
            path = self.path(outcome.image_id, kind)
            if kind in outcome.shards:
                write_atomic(path, outcome.shards[kind])
            elif kind != "images.parquet":
                path.unlink(missing_ok=True)
        error_path.unlink(missing_ok=True)

    def error(self, image_id: str) -> str | None:
        path = self.path(image_id, ERROR_KIND)
        return json.loads(path.read_text())["error"] if path.is_file() else None

    def read(self, image_id: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for kind in ("layers", "images", "units"):
            path = self.path(image_id, f"{kind}.parquet")
            out[kind] = pd.read_parquet(path) if path.is_file() else None
        maps_path = self.path(image_id, "maps.npz")
        out["maps"] = next(iter(decode_maps(maps_path.read_bytes()).values())) if maps_path.is_file() else None
        return out


# ------------------------------------------------------------------------------------- workers
@dataclass
class _Task:
    """Everything a worker needs to analyse images (plain data, sent to Ray actors)."""

    model: Any
    weights: str | None
    model_args: dict[str, Any]
    trust_pickle: bool
    device: str
    layers: list[str]
    units: bool
    guide: str
    output: str
    target: int | None
    mask: str | None
    output_key: str | None
    empty: str
    preprocess: Any
    roi_size: tuple[int, ...] | None
    overlap: float
    sw_batch_size: int
    keep_maps: int


class _Worker:
    """Loads the model once and turns one item into an outcome (tables as shard bytes, or an error)."""

    def __init__(self, task: _Task, model: nn.Module | None = None):
        self.task = task
        if model is None:
            model = load_model(task.model, task.weights, trust_pickle=task.trust_pickle, device=task.device, model_args=task.model_args)
        self.model = model.to(task.device)
        self.preprocess = load_preprocess(task.preprocess)

    def process(self, item: _Item) -> _Outcome:
        task = self.task
        fail = _Outcome(item.index, item.image_id, item.file, "")
        try:
            image, label = load_item(item.file, item.label or None, self.preprocess)
        except Exception as exc:  # a file that cannot be read is recorded, the run goes on
            fail.error = f"reading failed: {type(exc).__name__}: {exc}"
            return fail
        try:
            if task.roi_size is not None:
                result = analyze_windows(
                    self.model, image, label, roi_size=task.roi_size, overlap=task.overlap, sw_batch_size=task.sw_batch_size,
                    layers=task.layers, units=task.units, guide=task.guide, output=task.output, target=task.target,
                    mask=task.mask, output_key=task.output_key, image_id=item.image_id, empty=task.empty, device=task.device,
                )  # fmt: skip
            else:
                result = analyze(
                    self.model, [image], None if label is None else [label], ids=[item.image_id], layers=task.layers,
                    units=task.units, guide=task.guide, output=task.output, target=task.target, mask=task.mask,
                    batch_size=1, device=task.device, keep_maps=1 if item.index < task.keep_maps else 0,
                    output_key=task.output_key, empty=task.empty,
                )  # fmt: skip
        except Exception as exc:  # a failure in the model is recorded, the run goes on
            cause = exc.__cause__ if isinstance(exc, RuntimeError) and exc.__cause__ is not None else exc
            fail.error = f"analysis failed: {type(cause).__name__}: {cause}"
            return fail
        images = result.images.assign(file=item.file, label_file=item.label)
        shards = {"layers.parquet": table_bytes(result.layers, LAYERS), "images.parquet": table_bytes(images, IMAGES)}
        if result.units is not None:
            shards["units.parquet"] = table_bytes(result.units, UNITS)
        if item.image_id in result.maps:
            shards["maps.npz"] = encode_maps({item.image_id: result.maps[item.image_id]})
        return _Outcome(item.index, item.image_id, item.file, "", shards)


class _RayWorker:
    """Ray Data actor: one model per actor; a batch of items in, a batch of outcomes out."""

    def __init__(self, task: _Task):
        self.worker = _Worker(task)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list[Any]] = {k: [] for k in ("index", "image_id", "file", "error", *SHARD_KINDS)}
        for i in range(len(batch["index"])):
            item = _Item(int(batch["index"][i]), str(batch["image_id"][i]), str(batch["file"][i]), str(batch["label"][i]))
            outcome = self.worker.process(item)
            rows["index"].append(outcome.index)
            rows["image_id"].append(outcome.image_id)
            rows["file"].append(outcome.file)
            rows["error"].append(outcome.error)
            for kind in SHARD_KINDS:
                rows[kind].append(outcome.shards.get(kind, b""))
        out = {k: np.array(v, dtype=object) for k, v in rows.items()}
        out["index"] = np.array(rows["index"], dtype=np.int64)
        return out


def _run_local(worker: _Worker, items: Sequence[_Item]) -> Iterator[_Outcome]:
    for item in items:
        yield worker.process(item)


def _run_ray(task: _Task, items: Sequence[_Item], workers: int | None, address: str | None, gpus_per_worker: float) -> Iterator[_Outcome]:
    try:
        import ray
        import ray.data
        import ray.exceptions
    except ImportError:
        raise ValueError("--engine ray needs Ray: pip install 'segability[ray]'") from None
    started = False
    if not ray.is_initialized():
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, **quiet)
        started = True
    try:
        if workers is None:
            resources = ray.cluster_resources()
            workers = max(1, int(resources.get("GPU", 0) / gpus_per_worker) if gpus_per_worker > 0 else int(resources.get("CPU", 1)))
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ds = ray.data.from_items([asdict(item) for item in items], override_num_blocks=max(1, len(items)))
        ds = ds.map_batches(
            _RayWorker,
            fn_constructor_kwargs={"task": task},
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=1,
            num_gpus=gpus_per_worker or None,
            batch_format="numpy",
        )
        try:
            for row in ds.iter_rows():
                shards = {kind: bytes(row[kind]) for kind in SHARD_KINDS if row[kind]}
                yield _Outcome(int(row["index"]), str(row["image_id"]), str(row["file"]), str(row["error"]), shards)
        except ray.exceptions.RayError as exc:
            raise RuntimeError(
                f"the Ray run failed ({type(exc).__name__}: {exc}); the images finished so far are kept, "
                "rerun with --resume to continue"
            ) from exc
    finally:
        if started:
            ray.shutdown()


# --------------------------------------------------------------------------------------- summary
@dataclass
class BatchSummary:
    """What :func:`analyze_files` did.

    Attributes:
        out: the run folder.
        n_images: images in the input.
        n_ok: images with results (including those done by an earlier, resumed run).
        n_failed: images that could not be read or failed in the model (see ``errors``).
        n_resumed: images skipped because an earlier run had finished them.
        errors: ``file``, ``error`` per failed image.
        unpaired_images: images without a label (analysed without one).
        unpaired_labels: labels without an image (ignored).
        paths: the written files by name (``layers``, ``images``, ``units``, ``settings``,
            ``errors``, ``maps``, ``report``).
        report_error: why the report could not be built, when it could not.
        seconds: wall time.
    """

    out: Path
    n_images: int
    n_ok: int
    n_failed: int
    n_resumed: int
    errors: pd.DataFrame
    unpaired_images: list[str]
    unpaired_labels: list[str]
    paths: dict[str, Path]
    report_error: str | None = None
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        """0 when every image succeeded, 1 when some failed."""
        return 0 if self.n_failed == 0 else 1


# ------------------------------------------------------------------------------------ analyze_files
def _describe(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, nn.Module):
        return type(value).__name__
    return getattr(value, "__qualname__", None) or type(value).__name__


def _absolute_spec(spec: Any) -> Any:
    """Make a ``file.py:name`` spec absolute, so workers started elsewhere find the file."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = os.fspath(spec)
    target, sep, name = text.rpartition(":")
    if sep and (target.endswith(".py") or os.sep in target or "/" in target) and Path(target).is_file():
        return f"{Path(target).resolve()}:{name}"
    if not sep and Path(text).is_file():
        return str(Path(text).resolve())
    return text


def _items(paths: list[tuple[Path, Path | None]]) -> list[_Item]:
    seen: dict[str, Path] = {}
    items = []
    for index, (image, label) in enumerate(paths):
        image_id = image.name
        if image_id in seen:
            raise ValueError(f"--images: {seen[image_id]} and {image} have the same name {image_id!r}; image ids must be unique")
        seen[image_id] = image
        items.append(_Item(index, image_id, str(image), "" if label is None else str(label)))
    return items


def analyze_files(
    model: str | os.PathLike | Callable[..., nn.Module] | nn.Module,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    labels: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    *,
    out: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    model_args: Mapping[str, Any] | None = None,
    trust_pickle: bool = False,
    layers: str | Sequence[str] = "auto",
    units: bool = False,
    guide: Literal["prediction", "label"] = "prediction",
    output: Literal["auto", "sigmoid", "softmax", "probabilities"] = "auto",
    target: int | None = None,
    mask: Literal["nonzero"] | None = None,
    output_key: str | None = None,
    preprocess: Any = None,
    label_suffix: str = "",
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    keep_maps: int = 0,
    engine: Engine = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float = 0.0,
    device: str | None = None,
    resume: bool = False,
    force: bool = False,
    report: bool = True,
    progress: bool = False,
    empty: Literal["one", "nan"] = "one",
) -> BatchSummary:
    """Analyse every image file of a folder (or glob, or list) and write a result folder.

    Each image is read, preprocessed and analysed on its own (:func:`segability.analyze`, or
    :func:`analyze_windows` when ``roi_size`` is given); its tables are written to
    ``out/shards/<safe name>.{layers,units,images}.parquet`` as soon as it is done (temporary name,
    then rename; the images shard last). A file that cannot be read or fails in the model is
    recorded (``errors.csv``) and the run goes on. At the end the shards of the input images are
    merged, in input order, into ``layers.parquet``, ``images.parquet``, ``units.parquet``,
    ``settings.json`` (and ``maps.npz`` with ``keep_maps``), exactly as
    :meth:`segability.SAResult.save` writes them; ``images.parquet`` also has ``file`` and
    ``label_file`` columns. The image id is the file (or DICOM folder) name.

    Args:
        model: ``path/to/file.py:factory``, ``package.module:factory``, a factory callable, an
            ``nn.Module``, or a whole pickled model file (needs ``trust_pickle``). See
            :func:`segability.io.load_model`.
        images: a folder, glob pattern, file or list of files (see :func:`segability.io.find_images`).
        labels: a folder / pattern / list of label files paired by name stem, or None.
        out: the run folder.
        weights: the state dict file.
        model_args: keyword arguments of the factory.
        trust_pickle: allow unpickling whole models (only for trusted files).
        layers: "auto" (every convolution) or layer names / glob patterns.
        units, guide, output, target, mask, output_key, empty: as in :func:`segability.analyze`.
        preprocess: a config mapping, a JSON/YAML file, a callable or ``file.py:fn`` (see
            :func:`segability.io.load_preprocess`); None for none.
        label_suffix: text after the image stem in label names (``"_seg"``).
        roi_size: sliding-window size per spatial dim for large volumes; None analyses whole images.
        overlap: window overlap in [0, 1).
        sw_batch_size: windows per forward pass.
        keep_maps: keep the feature segmentation maps of the files at the first ``keep_maps``
            positions of the input order (a file there that fails keeps none; whole-image
            analysis only), so every engine and a resumed run keep the same ones.
        engine: "local" (this process, one image at a time) or "ray" (Ray Data actors, one model
            per actor).
        ray_address: an existing Ray cluster (default: a local Ray started for the run with
            ``workers`` CPUs; a Ray session already running in this process is reused).
        workers: Ray actors (default: every CPU, or every GPU / ``gpus_per_worker``).
        gpus_per_worker: GPUs per Ray actor; > 0 runs the actors on CUDA.
        device: the local engine's device (default CUDA when available).
        resume: keep the images an earlier run of the same settings finished; retry the others.
        force: delete earlier results in ``out`` first.
        report: build ``report.html`` when :mod:`segability.report` is importable.
        progress: show a progress bar.

    Returns:
        A :class:`BatchSummary` (counts, errors, paths; ``exit_code``).

    Raises:
        ValueError: bad arguments, files or model (named as the CLI flag).
        FileExistsError: ``out`` holds results and neither ``resume`` nor ``force`` is set.
        RuntimeError: the Ray engine failed (images finished so far keep their shards; resume).

    Example:
        >>> summary = analyze_files("nets.py:tiny_unet", "scans/", "masks/", out="runs/a")  # doctest: +SKIP
        >>> summary.n_ok, summary.n_failed, summary.paths["layers"].name  # doctest: +SKIP
        (12, 1, 'layers.parquet')
    """
    start = time.perf_counter()
    if engine not in ("local", "ray"):
        raise ValueError(f'--engine must be "local" or "ray", got {engine!r}')
    if resume and force:
        raise ValueError("--resume and --force exclude each other: resume keeps earlier results, force deletes them")
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be a positive integer, got {workers}")
    if engine == "local" and workers not in (None, 1):
        raise ValueError("--workers: the local engine analyses one image at a time; use --engine ray for several workers")
    if engine == "local" and (ray_address or gpus_per_worker):
        raise ValueError("--ray-address and --gpus-per-worker need --engine ray")
    if gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    if guide not in ("prediction", "label"):
        raise ValueError(f'--guide must be "prediction" or "label", got {guide!r}')
    if guide == "label" and labels is None:
        raise ValueError('--guide label needs --labels')
    if mask not in (None, "nonzero"):
        raise ValueError(f'--mask must be "nonzero" or not given, got {mask!r}')
    if output not in ("auto", "sigmoid", "softmax", "probabilities"):
        raise ValueError(f'--output must be "auto", "sigmoid", "softmax" or "probabilities", got {output!r}')
    if empty not in ("one", "nan"):
        raise ValueError(f'empty must be "one" or "nan", got {empty!r}')
    if not 0 <= overlap < 1:
        raise ValueError(f"--overlap must be in [0, 1), got {overlap}")
    if keep_maps < 0:
        raise ValueError(f"--keep-maps must be >= 0, got {keep_maps}")
    if sw_batch_size < 1:
        raise ValueError(f"--sw-batch-size must be a positive integer, got {sw_batch_size}")
    if roi_size is not None:
        roi_size = tuple(int(r) for r in roi_size)
        if not 1 <= len(roi_size) <= 3:
            raise ValueError(f"--roi-size must give 1-3 window sizes, got {roi_size}")

    pairing = pair_labels(find_images(images), labels, label_suffix=label_suffix)
    items = _items(pairing.pairs)
    load_preprocess(preprocess)  # a bad config is a usage error before anything runs

    out_path = Path(out)
    store = _Shards(out_path)
    earlier = [f for f in (*RESULT_FILES, ERRORS_FILE) if (out_path / f).exists()]
    if out_path.exists() and not out_path.is_dir():
        raise ValueError(f"--out: {out_path} exists and is not a folder")
    if (earlier or store.own_files()) and not (resume or force):
        raise FileExistsError(
            f"{out_path} already holds results ({', '.join(earlier) or SHARD_DIR + '/'}); pass --resume to continue "
            "that run or --force to replace it"
        )
    model_spec = _absolute_spec(model)
    run_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # Load once here: a bad --model / --weights / --layers is a usage error before any work starts.
    local_model = load_model(model_spec, weights, trust_pickle=trust_pickle, device="cpu", model_args=model_args)
    names = layer_names(local_model, layers if layers == "auto" or not isinstance(layers, str) else [layers])
    task = _Task(
        model=model_spec, weights=None if weights is None else str(Path(weights).resolve()), model_args=dict(model_args or {}),
        trust_pickle=trust_pickle, device=run_device if engine == "local" else ("cuda" if gpus_per_worker > 0 else "cpu"),
        layers=names, units=units, guide=guide, output=output, target=target, mask=mask, output_key=output_key,
        empty=empty, preprocess=preprocess if not isinstance(preprocess, os.PathLike) else os.fspath(preprocess),
        roi_size=roi_size, overlap=overlap, sw_batch_size=sw_batch_size, keep_maps=keep_maps,
    )  # fmt: skip
    fingerprint = {
        "model": _describe(model_spec), "weights": task.weights, "model_args": task.model_args, "layers": names,
        "units": units, "guide": guide, "output": output, "target": target, "mask": mask, "output_key": output_key,
        "empty": empty, "preprocess": _describe(task.preprocess), "roi_size": None if roi_size is None else list(roi_size),
        "overlap": overlap if roi_size is not None else None,
    }  # fmt: skip
    fingerprint = json.loads(json.dumps(fingerprint, default=str))
    run_file = store.dir / RUN_FILE
    if resume and run_file.is_file():
        earlier_run = json.loads(run_file.read_text())
        changed = [k for k in FINGERPRINT_KEYS if earlier_run.get(k) != fingerprint.get(k)]
        if changed:
            detail = "; ".join(f"{k}: {earlier_run.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed)
            raise ValueError(f"--resume: the run in {out_path} was made with other settings ({detail}); use --force to start over")
    if force:  # only now: a bad --model or --layers must not cost the earlier results
        store.clear()
        for name in (*RESULT_FILES, ERRORS_FILE):
            (out_path / name).unlink(missing_ok=True)
    store.dir.mkdir(parents=True, exist_ok=True)
    store.drop_partial()
    write_atomic(run_file, json.dumps(fingerprint, indent=2).encode())

    todo = [it for it in items if not (resume and store.done(it.image_id))]
    n_resumed = len(items) - len(todo)
    if todo:
        if engine == "local":
            outcomes = _run_local(_Worker(task, local_model), todo)
        else:
            del local_model
            outcomes = _run_ray(task, todo, workers, ray_address, gpus_per_worker)
        with progress_bar(progress, len(items), done=n_resumed, failures=True) as advance:
            for outcome in outcomes:
                store.write(outcome)
                advance(1, failed=int(bool(outcome.error)))

    result, errors = _merge(store, items, units)
    result.settings = {
        "model": _describe(model_spec), "weights": task.weights, "model_args": task.model_args,
        "layers": result.settings.get("layers", [INPUT, *names]), "guide": guide, "output": output,
        "target": 1 if target is None else int(target), "units": units, "spatial_dims": result.settings.get("spatial_dims"),
        "mask": mask, "empty": empty, "output_key": output_key, "preprocess": _describe(task.preprocess),
        "roi_size": None if roi_size is None else list(roi_size), "overlap": overlap if roi_size is not None else None,
        "sw_batch_size": sw_batch_size if roi_size is not None else None, "engine": engine,
        "workers": workers, "device": task.device, "n_images": len(items), "n_failed": len(errors),
        "unpaired_images": [p.name for p in pairing.unpaired_images],
        "unpaired_labels": [p.name for p in pairing.unpaired_labels],
        "version": _version(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": os.fspath(images) if isinstance(images, (str, os.PathLike)) else f"{len(items)} files",
        "labels": os.fspath(labels) if isinstance(labels, (str, os.PathLike)) else None,
    }  # fmt: skip
    result.save(out_path, overwrite=True)
    tmp = out_path / f".{ERRORS_FILE}.tmp"
    errors.to_csv(tmp, index=False)
    os.replace(tmp, out_path / ERRORS_FILE)
    paths = {name.split(".")[0]: out_path / name for name in (*RESULT_FILES, ERRORS_FILE) if (out_path / name).exists()}

    report_error = None
    if report:
        try:
            from segability.report import build_report
        except ImportError:
            build_report = None
        if build_report is not None:
            try:
                paths["report"] = Path(build_report(out_path))
            except Exception as exc:  # the tables are written; a report problem must not lose them
                report_error = f"{type(exc).__name__}: {exc}"
    return BatchSummary(
        out=out_path, n_images=len(items), n_ok=len(items) - len(errors), n_failed=len(errors), n_resumed=n_resumed,
        errors=errors, unpaired_images=[str(p) for p in pairing.unpaired_images],
        unpaired_labels=[str(p) for p in pairing.unpaired_labels], paths=paths, report_error=report_error,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def _version() -> str:
    from segability import __version__

    return __version__


def _merge(store: _Shards, items: Sequence[_Item], units: bool) -> tuple[SAResult, pd.DataFrame]:
    """The shards of ``items``, in input order, as one result; and the errors table."""
    layer_frames, image_frames, unit_frames, errors = [], [], [], []
    maps: dict[str, dict[str, Any]] = {}
    for item in items:
        if store.done(item.image_id):
            tables = store.read(item.image_id)
            layer_frames.append(tables["layers"])
            image_frames.append(tables["images"])
            if tables["units"] is not None:
                unit_frames.append(tables["units"])
            if tables["maps"] is not None:
                maps[item.image_id] = tables["maps"]
        else:
            error = store.error(item.image_id)
            errors.append({"file": item.file, "error": error if error is not None else "not analysed (the run stopped)"})
    layers_df = typed(pd.concat(layer_frames, ignore_index=True), LAYERS) if layer_frames else empty_table(LAYERS)
    extra = ["file", "label_file"]
    images_df = pd.concat(image_frames, ignore_index=True) if image_frames else empty_table(IMAGES).assign(file="", label_file="")
    images_df = typed(images_df, IMAGES).astype({c: str for c in extra})
    units_df = None
    if units:
        units_df = typed(pd.concat(unit_frames, ignore_index=True), UNITS) if unit_frames else empty_table(UNITS)
    order = layers_df.drop_duplicates("layer").sort_values("depth", kind="stable")
    settings: dict[str, Any] = {}
    if len(order):
        settings["layers"] = [str(n) for n in order["layer"]]
        shape = layers_df.loc[layers_df["layer"] == INPUT, "shape"]
        settings["spatial_dims"] = len(str(shape.iloc[0]).split("x")) - 1 if len(shape) else None
    result = SAResult(layers=layers_df, images=images_df, units=units_df, maps=maps, settings=settings)
    return result, pd.DataFrame(errors, columns=["file", "error"])
