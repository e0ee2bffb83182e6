"""The file-level options of a batch run, as frozen dataclasses validated once in ``__post_init__``.

The analysis options are an :class:`~segability.analysis.AnalysisConfig`; these say where the model,
the images and the results are and how the run goes. Errors are :class:`~segability.errors.UsageError`
naming the Python argument (the command line maps it to its flag).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from segability.errors import UsageError

__all__ = ["EngineKind", "ModelSource", "FilesConfig"]

EngineKind = Literal["local", "ray"]


def _flag(value: Any, argument: str) -> None:
    if not isinstance(value, bool):
        raise UsageError(f"{argument} must be True or False, got {value!r}", argument=argument)


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from (see :func:`segability.io.load_model`).

    Args:
        model: ``path/to/file.py:factory``, ``package.module:factory``, a factory callable, an
            ``nn.Module``, or a whole pickled model file (needs ``trust_pickle``).
        weights: the state dict file, or None.
        model_args: keyword arguments of the factory.
        trust_pickle: allow unpickling whole models (only for trusted files).
    """

    model: Any
    weights: str | os.PathLike | None = None
    model_args: Mapping[str, Any] = field(default_factory=dict)
    trust_pickle: bool = False

    def __post_init__(self) -> None:
        if self.model is None:
            raise UsageError("model must be a factory spec, a callable or an nn.Module, got None", argument="model")
        if self.weights is not None and not isinstance(self.weights, (str, os.PathLike)):
            raise UsageError(f"weights must be a file path or None, got {type(self.weights).__name__}", argument="weights")
        if not isinstance(self.model_args, Mapping) or not all(isinstance(k, str) for k in self.model_args):
            raise UsageError(f"model_args must be a mapping of argument names to values, got {self.model_args!r}", argument="model_args")
        object.__setattr__(self, "model_args", dict(self.model_args))
        _flag(self.trust_pickle, "trust_pickle")


@dataclass(frozen=True)
class FilesConfig:
    """The files of a batch run and how it runs.

    Args:
        images: a folder, glob pattern, file or list of files (see :func:`segability.io.find_images`).
        out: the run folder.
        labels: a folder / pattern / list of label files paired by name stem, or None.
        label_suffix: text after the image stem in label names (``"_seg"``).
        preprocess: a config mapping, a JSON/YAML file, a callable or ``file.py:fn`` (see
            :func:`segability.io.load_preprocess`); None for none.
        engine: "local" (this process, one image at a time) or "ray" (Ray Data actors, one model
            per actor).
        ray_address: an existing Ray cluster (default: a local Ray started for the run with
            ``workers`` CPUs; a Ray session already running in this process is reused).
        workers: Ray actors (default: every CPU, or every GPU / ``gpus_per_worker``).
        gpus_per_worker: GPUs per Ray actor; > 0 runs the actors on CUDA.
        device: the local engine's device (default CUDA when available).
        resume: keep the images an earlier run of the same fingerprint finished; retry the others.
        force: delete the earlier results in ``out`` first.
        report: build ``report.html`` when :mod:`segability.report` is importable.
        progress: show a progress bar.
    """

    images: Any
    out: str | os.PathLike
    labels: Any = None
    label_suffix: str = ""
    preprocess: Any = None
    engine: EngineKind = "local"
    ray_address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    device: str | None = None
    resume: bool = False
    force: bool = False
    report: bool = True
    progress: bool = False

    def __post_init__(self) -> None:
        if self.engine not in ("local", "ray"):
            raise UsageError(f'engine must be "local" or "ray", got {self.engine!r}', argument="engine")
        for name in ("resume", "force", "report", "progress"):
            _flag(getattr(self, name), name)
        if self.resume and self.force:
            raise UsageError(
                "resume=True and force=True exclude each other: resume keeps the earlier results, force deletes them",
                argument="resume",
            )
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1):
            raise UsageError(f"workers must be a positive integer or None, got {self.workers!r}", argument="workers")
        if self.engine == "local" and self.workers not in (None, 1):
            raise UsageError(
                "workers: the local engine analyses one image at a time; give engine='ray' for several workers",
                argument="workers",
            )
        if isinstance(self.gpus_per_worker, bool) or not isinstance(self.gpus_per_worker, (int, float)) or not self.gpus_per_worker >= 0:
            raise UsageError(f"gpus_per_worker must be a number >= 0, got {self.gpus_per_worker!r}", argument="gpus_per_worker")
        for name in ("ray_address", "gpus_per_worker"):
            if self.engine == "local" and getattr(self, name):
                raise UsageError(f"{name} needs engine='ray'", argument=name)
        if not isinstance(self.label_suffix, str):
            raise UsageError(f"label_suffix must be a string, got {self.label_suffix!r}", argument="label_suffix")
        if self.images is None:
            raise UsageError("images must be a folder, glob pattern, file or list of files, got None", argument="images")
        if not isinstance(self.out, (str, os.PathLike)) or not os.fspath(self.out):
            raise UsageError(f"out must be a folder path, got {self.out!r}", argument="out")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"out: {out} exists and is not a folder", argument="out")
