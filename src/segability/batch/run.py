"""A batch run: check everything up front, analyse every file on an engine, merge the shards.

:func:`analyze_files` is what ``segability analyze`` runs. It builds the options once
(:class:`~segability.analysis.AnalysisConfig`, :class:`~segability.batch.config.ModelSource`,
:class:`~segability.batch.config.FilesConfig`) and hands them to :func:`run_files`, which

1. finds and pairs the files, loads the model and resolves the layers (a bad argument is a
   :class:`~segability.errors.UsageError` before anything is written);
2. compares the run's fingerprint with the earlier run's on ``resume`` (and refuses, naming each
   change, when they differ) or deletes the earlier results on ``force``;
3. analyses the files not done yet, writing each image's shards as it finishes;
4. merges the shards into the result folder (``layers.parquet``, ``images.parquet``,
   ``units.parquet``, ``settings.json``, ``maps.npz``, ``errors.csv``), also when every image
   failed (then the tables are empty), and builds ``report.html``.

A run killed at any moment, in the analysis or in the merge, is finished by running it again with
``resume=True``: the shards are the state, the merged files are rebuilt from them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
from torch import nn

from segability.analysis.config import AnalysisConfig, Capture, Readout, Scoring, Windows
from segability.analysis.features import layer_names
from segability.analysis.results import (
    ERRORS,
    INPUT,
    QC,
    RESULT_FILES,
    SHARD_DIR,
    SAResult,
    write_atomic,
    write_table,
)
from segability.batch.config import EngineKind, FilesConfig, ModelSource
from segability.batch.engines import Task, Worker, run_local, run_ray
from segability.batch.fingerprint import changes, run_fingerprint
from segability.batch.shards import Item, ShardStore, merge
from segability.errors import UsageError, as_usage_error
from segability.io import find_images, load_item, load_model, load_preprocess, pair_labels
from segability.progress import progress_bar

__all__ = ["BatchSummary", "analyze_files", "run_files"]

REPORT_FILE = "report.html"
# What a run writes or derives from its tables: force deletes these (and the shards), nothing else.
RUN_OUTPUTS = (*RESULT_FILES, ERRORS.file, REPORT_FILE, QC.file)
TARGET_PROBES = 5  # label files read up front to check a given target


@dataclass
class BatchSummary:
    """What a batch run did (the command line turns ``n_failed`` into its exit code).

    Attributes:
        out: the run folder.
        n_images: input images.
        n_ok: images analysed (now or by the earlier run resumed).
        n_failed: images that could not be analysed (see ``errors``).
        n_resumed: images skipped because an earlier run had finished them.
        errors: ``errors.csv``: ``file``, ``stage``, ``error``, ``traceback`` per failed image.
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
    classes: Sequence[int] | str | None = None,
    class_names: Mapping[int, str] | None = None,
    mask: Literal["nonzero"] | None = None,
    output_key: str | None = None,
    preprocess: Any = None,
    label_suffix: str = "",
    roi_size: Sequence[int] | None = None,
    overlap: float = 0.25,
    sw_batch_size: int = 1,
    memory_budget: int = 512 * 2**20,
    keep_maps: int = 0,
    engine: EngineKind = "local",
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

    Each image is read, preprocessed and analysed on its own (sliding windows when ``roi_size`` is
    given); its tables are written to ``out/shards`` as soon as it is done. A file that cannot be
    read or fails in the model is recorded in ``errors.csv`` (with its stage and traceback) and the
    run goes on. At the end the shards are merged, in input order, into the files that
    :meth:`segability.SAResult.save` writes; ``images.parquet`` also has ``file`` and
    ``label_file`` columns. The image id is the file (or DICOM folder) name.

    Args:
        model, weights, model_args, trust_pickle: see :class:`~segability.batch.config.ModelSource`.
        images, labels, out, label_suffix, preprocess, engine, ray_address, workers,
            gpus_per_worker, device, resume, force, report, progress: see
            :class:`~segability.batch.config.FilesConfig`.
        layers: "auto" (each stage of the network: :func:`segability.capture.default_layers`; every convolution of a plain conv net) or layer names / glob patterns.
        units, guide, output, target, classes, class_names, mask, output_key, empty: as in
            :func:`segability.analyze`;
            ``mask`` is None or "nonzero". A given ``target`` must be a value of the labels: it is
            checked against the first labels (see :func:`run_files`).
        memory_budget: bytes of layer outputs kept between steps (see :class:`~segability.analysis.Capture`
            and :func:`~segability.analysis.analyze_windows`); speed and memory only.
        roi_size, overlap, sw_batch_size: sliding windows (see :class:`~segability.analysis.Windows`);
            None analyses whole images.
        keep_maps: keep the feature segmentation maps of the files at the first ``keep_maps``
            positions of the input order (a file there that fails keeps none; whole-image analysis
            only), so every engine and a resumed run keep the same ones.

    Returns:
        A :class:`BatchSummary`.

    Raises:
        UsageError: a bad argument, file, model or layer, or ``resume`` over a run with another
            fingerprint (a ``ValueError`` naming the Python argument).
        FileExistsError: ``out`` holds results and neither ``resume`` nor ``force`` is set.
        RuntimeError: the Ray engine failed (images finished so far keep their shards; resume).
        OSError: a write failed (a full disk says so).

    Example:
        >>> summary = analyze_files("nets.py:tiny_unet", "scans/", "masks/", out="runs/a")  # doctest: +SKIP
        >>> summary.n_ok, summary.n_failed, summary.paths["layers"].name  # doctest: +SKIP
        (12, 1, 'layers.parquet')
    """
    config = AnalysisConfig(
        readout=Readout(output=output, target=target, output_key=output_key, classes=classes, class_names=class_names),
        scoring=Scoring(guide=guide, units=units, mask=mask, empty=empty, keep_maps=keep_maps),
        capture=Capture(layers=[layers] if isinstance(layers, str) and layers != "auto" else layers, memory_budget=memory_budget),
        windows=None if roi_size is None else Windows(
            roi_size=tuple(roi_size) if isinstance(roi_size, (list, tuple)) else roi_size, overlap=overlap, sw_batch_size=sw_batch_size
        ),
    )  # fmt: skip
    source = ModelSource(model, weights, {} if model_args is None else model_args, trust_pickle)
    files = FilesConfig(
        images=images, out=out, labels=labels, label_suffix=label_suffix, preprocess=preprocess, engine=engine,
        ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker, device=device, resume=resume,
        force=force, report=report, progress=progress,
    )  # fmt: skip
    return run_files(source, files, config)




def run_files(source: ModelSource, files: FilesConfig, config: AnalysisConfig) -> BatchSummary:
    """Run a batch analysis from validated options (see :func:`analyze_files`).

    A given ``target`` is checked up front: when some of the first labels are not empty but none
    holds the value ``target`` (e.g. ``target=5`` with 0/1 labels), every Dice would be 0, so the
    run is refused. Empty labels (an image without the structure) say nothing and are skipped.
    """
    start = time.perf_counter()
    if config.scoring.mask not in (None, "nonzero"):
        raise UsageError(f'mask must be None or "nonzero" for image files, got {config.scoring.mask!r}', argument="mask")
    if config.scoring.guide == "label" and files.labels is None:
        raise UsageError("labels must be given with guide='label' (its prototypes come from the labels)", argument="labels")
    with as_usage_error("images"):
        found = find_images(files.images, argument="images")
    with as_usage_error("labels"):
        pairing = pair_labels(found, files.labels, label_suffix=files.label_suffix, argument="labels")
    items = _items(pairing.pairs, pairing.channels)
    with as_usage_error("preprocess"):
        preprocess = load_preprocess(files.preprocess, argument="preprocess")

    out = Path(files.out)
    store = ShardStore(out)
    earlier = [f for f in RUN_OUTPUTS if (out / f).exists()]
    if (earlier or store.own_files()) and not (files.resume or files.force):
        raise FileExistsError(
            f"out: {out} already holds results ({', '.join(earlier) or SHARD_DIR + '/'}); pass resume=True to continue "
            "that run or force=True to replace it"
        )
    spec = _absolute_spec(source.model)
    # Load once here: a bad model, weights file or layer is a usage error before any work starts.
    with as_usage_error("model"):
        local_model = load_model(spec, source.weights, trust_pickle=source.trust_pickle, device="cpu", model_args=source.model_args)
    with as_usage_error("layers"):
        names = layer_names(local_model, config.capture.layers)
    _check_target(config.readout, items, preprocess)
    fingerprint = run_fingerprint(
        config=config, layers=names, model=spec, model_args=source.model_args, weights=source.weights,
        preprocess=files.preprocess, items=items, labels=files.labels, label_suffix=files.label_suffix,
    )  # fmt: skip
    if files.resume:
        _check_resume(store, fingerprint, out, earlier)
    if files.force:  # only now: a bad argument must not cost the earlier results
        store.clear()
        for name in RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)
    store.dir.mkdir(parents=True, exist_ok=True)
    store.drop_partial()
    write_atomic(store.run_file, json.dumps(fingerprint, indent=2).encode())

    local_device = files.device or ("cuda" if torch.cuda.is_available() else "cpu")
    task = Task(
        model=spec, weights=None if source.weights is None else str(Path(source.weights).resolve()),
        model_args=dict(source.model_args), trust_pickle=source.trust_pickle,
        device=local_device if files.engine == "local" else ("cuda" if files.gpus_per_worker > 0 else "cpu"),
        config=dataclasses.replace(config, capture=dataclasses.replace(config.capture, layers=names)),
        preprocess=files.preprocess if not isinstance(files.preprocess, os.PathLike) else os.fspath(files.preprocess),
    )  # fmt: skip
    todo = [it for it in items if not (files.resume and store.done(it.image_id))]
    n_resumed = len(items) - len(todo)
    if todo:
        if files.engine == "local":
            outcomes = run_local(Worker(task, local_model), todo)
        else:
            del local_model
            outcomes = run_ray(task, todo, files.workers, files.ray_address, files.gpus_per_worker)
        with contextlib.closing(outcomes), progress_bar(files.progress, len(items), done=n_resumed, failures=True) as advance:
            for outcome in outcomes:
                store.write(outcome)
                advance(1, failed=int(outcome.failed))

    result, errors = merge(store, items, config.scoring.units)
    result.settings = {
        **config.settings(), "model": _describe(spec), "model_file": fingerprint["model_file"], "weights": task.weights,
        "weights_sha256": None if fingerprint["weights"] is None else fingerprint["weights"]["sha256"],
        "model_args": fingerprint["model_args"], "layers": result.settings.get("layers", [INPUT, *names]),
        "target": config.readout.target_index, "spatial_dims": result.settings.get("spatial_dims"),
        "preprocess": _describe(task.preprocess), "engine": files.engine, "workers": files.workers, "device": task.device,
        "n_images": len(items), "n_failed": len(errors), "unpaired_images": [p.name for p in pairing.unpaired_images],
        "unpaired_labels": [p.name for p in pairing.unpaired_labels], "version": _version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "data": os.fspath(files.images) if isinstance(files.images, (str, os.PathLike)) else f"{len(items)} files",
        "labels": fingerprint["labels"], "label_suffix": files.label_suffix,
    }  # fmt: skip
    paths = write_result(out, result, errors)
    report_error = None
    if files.report:
        paths, report_error = _report(out, paths)
    return BatchSummary(
        out=out, n_images=len(items), n_ok=len(items) - len(errors), n_failed=len(errors), n_resumed=n_resumed,
        errors=errors, unpaired_images=[str(p) for p in pairing.unpaired_images],
        unpaired_labels=[str(p) for p in pairing.unpaired_labels], paths=paths, report_error=report_error,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


def write_result(out: Path, result: SAResult, errors: pd.DataFrame) -> dict[str, Path]:
    """Write the merged tables and ``errors.csv``; returns the files written, by name.

    The earlier ``report.html`` goes first: a report always describes the tables beside it. Every
    file is written atomically, so a run killed here leaves whole files, and running it again with
    ``resume=True`` rebuilds all of them from the shards.
    """
    (out / REPORT_FILE).unlink(missing_ok=True)
    result.save(out, overwrite=True)
    write_table(errors, out / ERRORS.file, ERRORS)
    return {name.split(".")[0]: out / name for name in (*RESULT_FILES, ERRORS.file) if (out / name).exists()}


def _report(out: Path, paths: dict[str, Path]) -> tuple[dict[str, Path], str | None]:
    try:
        from segability.report import build_report
    except ImportError:
        return paths, None
    try:
        return {**paths, "report": Path(build_report(out))}, None
    except Exception as exc:  # the tables are written; a report problem must not lose them
        return paths, f"{type(exc).__name__}: {exc}"


def _check_resume(store: ShardStore, fingerprint: dict[str, Any], out: Path, earlier: list[str]) -> None:
    if store.run_file.is_file():
        changed = changes(json.loads(store.run_file.read_text()), fingerprint)
        if changed:
            raise UsageError(
                f"resume: the run in {out} was made with other inputs or settings ({'; '.join(changed)}); "
                "give force=True to start over",
                argument="resume",
            )
    elif earlier or store.own_files():
        raise UsageError(
            f"resume: {out} holds results but no record of the run that made them ({SHARD_DIR}/run.json), so "
            "they cannot be checked against this one; give force=True to start over",
            argument="resume",
        )


def _check_target(readout: Readout, items: Sequence[Item], preprocess: Any) -> None:
    """Refuse a ``target`` that none of the first non-empty labels holds (see :func:`run_files`)."""
    if readout.target is None:
        return
    target, lacking = int(readout.target), []
    for item in [it for it in items if it.label][:TARGET_PROBES]:
        try:
            _, label = load_item(item.file, item.label, preprocess)
        except Exception:  # an unreadable pair is recorded when its turn comes
            continue
        if label.shape[0] > 1:  # one-hot labels: the target is a channel
            if target >= label.shape[0]:
                raise UsageError(f"target {target} is not a channel of the one-hot labels of {item.image_id} "
                                 f"({label.shape[0]} channels)", argument="target")  # fmt: skip
            return
        values = torch.unique(label)
        if bool((values == target).any()):
            return
        if bool((values != 0).any()):
            lacking.append(f"{item.image_id} holds {[int(v) if float(v).is_integer() else float(v) for v in values[:8]]}")
    if lacking:
        raise UsageError(
            f"target {target} is a value of none of the first labels ({'; '.join(lacking[:3])}): every Dice "
            "would be 0; give the label value of the class of interest",
            argument="target",
        )


def _version() -> str:
    from segability import __version__

    return __version__


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


def _items(paths: list[tuple[Path, Path | None]], channels: Mapping[Path, list[Path]]) -> list[Item]:
    seen: dict[str, Path] = {}
    items = []
    for index, (image, label) in enumerate(paths):
        image_id = image.name
        if image_id in seen:
            raise UsageError(f"images: {seen[image_id]} and {image} have the same name {image_id!r}; image ids must be unique",
                             argument="images")  # fmt: skip
        seen[image_id] = image
        others = "\n".join(str(p) for p in channels.get(image, [])[1:])
        items.append(Item(index, image_id, str(image), "" if label is None else str(label), others))
    return items
