"""Engines of a batch run: the worker that turns one item into an outcome, run here or on Ray.

:class:`Worker` loads the model once and analyses one file at a time through the analysis
package's :class:`~segability.analysis.Engine` (or :class:`~segability.analysis.windows.WindowRun`
for sliding windows). A failure is an :class:`~segability.batch.shards.Outcome` with its stage
(``read``: the file or its label could not be read or preprocessed; ``model``: the forward pass
raised; ``analysis``: the scoring raised), the error and the traceback; the run goes on. Both
engines call the same worker, so they give the same tables. Ray is imported only by
:func:`run_ray`: the local engine never needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import nn

from segability.analysis.config import AnalysisConfig
from segability.analysis.engine import Engine
from segability.analysis.inputs import batches
from segability.analysis.results import IMAGES, LAYERS, UNITS, encode_maps, table_bytes
from segability.analysis.windows import WindowRun
from segability.batch.shards import SHARD_KINDS, Item, Outcome
from segability.io import load_item, load_model, load_preprocess

__all__ = ["Task", "Worker", "run_local", "run_ray"]


@dataclass(frozen=True)
class Task:
    """Everything a worker needs (plain, picklable data: it travels to Ray actors).

    ``config.capture.layers`` holds the resolved layer names, so every worker scores the same layers.
    """

    model: Any
    weights: str | None
    model_args: dict[str, Any]
    trust_pickle: bool
    device: str
    config: AnalysisConfig
    preprocess: Any


def _failure(item: Item, stage: str, exc: Exception) -> Outcome:
    why = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return Outcome(item.index, item.image_id, item.file, stage, why, "".join(traceback.format_exception(exc)))  # type: ignore[arg-type]


class Worker:
    """Loads the model once and turns one item into an outcome (tables as shard bytes, or a failure)."""

    def __init__(self, task: Task, model: nn.Module | None = None):
        self.task = task
        if model is None:
            model = load_model(task.model, task.weights, trust_pickle=task.trust_pickle, device=task.device, model_args=task.model_args)
        self.model = model.to(task.device)
        self.preprocess = load_preprocess(task.preprocess)
        scoring = task.config.scoring
        self.without_maps = dataclasses.replace(task.config, scoring=dataclasses.replace(scoring, keep_maps=0))
        self.with_maps = dataclasses.replace(task.config, scoring=dataclasses.replace(scoring, keep_maps=1))

    def process(self, item: Item) -> Outcome:
        try:
            image, label = load_item(item.image_files, item.label or None, self.preprocess)
        except Exception as exc:  # a file that cannot be read is recorded, the run goes on
            return _failure(item, "read", exc)
        try:
            keep = item.index < self.task.config.scoring.keep_maps
            if self.task.config.windows is not None:
                config = self.with_maps if keep else self.without_maps
                result = WindowRun(self.model, config, device=self.task.device).run(image, label, item.image_id)
            else:
                engine = Engine(self.model, self.with_maps if keep else self.without_maps, device=self.task.device)
                engine.run(batches([image], None if label is None else [label], [item.image_id], self.task.config.scoring.mask, 1))
                if engine.failed:  # the engine records a failing forward pass instead of raising
                    exc = engine.first_error
                    why = f"{type(exc).__name__}: {exc}".replace("\n", " ")
                    return Outcome(item.index, item.image_id, item.file, "model", why, engine.failed[0][1])
                result = engine.result()
        except Exception as exc:  # a failure in the scoring is recorded, the run goes on
            return _failure(item, "analysis", exc)
        images = result.images.assign(file=item.file, label_file=item.label)
        shards = {"layers.parquet": table_bytes(result.layers, LAYERS), "images.parquet": table_bytes(images, IMAGES)}
        if result.units is not None:
            shards["units.parquet"] = table_bytes(result.units, UNITS)
        if item.image_id in result.maps:
            shards["maps.npz"] = encode_maps({item.image_id: result.maps[item.image_id]})
        return Outcome(item.index, item.image_id, item.file, shards=shards)


def run_local(worker: Worker, items: Sequence[Item]) -> Iterator[Outcome]:
    """This process, one image at a time."""
    for item in items:
        yield worker.process(item)


# -------------------------------------------------------------------------------------------- Ray
_ROW = ("index", "image_id", "file", "stage", "error", "traceback")


class _RayWorker:
    """Ray Data actor: one model per actor; a batch of items in, a batch of outcomes out."""

    def __init__(self, task: Task):
        self.worker = Worker(task)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list[Any]] = {k: [] for k in (*_ROW, *SHARD_KINDS)}
        for i in range(len(batch["index"])):
            item = Item(int(batch["index"][i]), str(batch["image_id"][i]), str(batch["file"][i]), str(batch["label"][i]),
                        str(batch["channels"][i]))  # fmt: skip
            outcome = self.worker.process(item)
            for key in _ROW:
                rows[key].append(getattr(outcome, key))
            for kind in SHARD_KINDS:
                rows[kind].append(outcome.shards.get(kind, b""))
        out = {k: np.array(v, dtype=object) for k, v in rows.items()}
        out["index"] = np.array(rows["index"], dtype=np.int64)
        return out


@contextlib.contextmanager
def _ray_session(address: str | None, workers: int | None) -> Iterator[Any]:
    """Ray, started for the run (and shut down after it) unless a session is already running."""
    import ray

    started = not ray.is_initialized()
    if started:
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, **quiet)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


@contextlib.contextmanager
def _no_ray_progress_bars() -> Iterator[None]:
    """Hide Ray Data's own progress bars for the run, then give the global context its setting back."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.enable_progress_bars
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def run_ray(task: Task, items: Sequence[Item], workers: int | None, address: str | None, gpus_per_worker: float) -> Iterator[Outcome]:
    """Ray Data ``map_batches`` over an actor pool (one model per actor), outcomes as they finish.

    Raises:
        ImportError: Ray is not installed.
        RuntimeError: the Ray run failed (the outcomes yielded so far are complete).
    """
    try:
        import ray.data
        import ray.exceptions
    except ImportError:
        raise ImportError("engine='ray' needs Ray: pip install 'segability[ray]'") from None
    with _ray_session(address, workers) as ray, _no_ray_progress_bars():
        if workers is None:
            resources = ray.cluster_resources()
            workers = max(1, int(resources.get("GPU", 0) / gpus_per_worker) if gpus_per_worker > 0 else int(resources.get("CPU", 1)))
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
                yield Outcome(int(row["index"]), str(row["image_id"]), str(row["file"]), str(row["stage"]),  # type: ignore[arg-type]
                              str(row["error"]), str(row["traceback"]), shards)  # fmt: skip
        except ray.exceptions.RayError as exc:
            raise RuntimeError(
                f"the Ray run failed ({type(exc).__name__}: {exc}); the images finished so far are kept: "
                "run again with resume=True to continue"
            ) from exc
