"""Analyse folders of image files, resumably, on a local engine or on Ray.

The package, by what its files hold:

- ``config``: the file-level options (:class:`FilesConfig`, :class:`ModelSource`), validated once.
- ``fingerprint``: what makes two runs the same run (``--resume`` refuses another, naming each change).
- ``shards``: the per-image shard store of a run folder, :func:`safe_name`, the merge.
- ``engines``: the worker that turns one file into an outcome; the local and Ray engines.
- ``run``: :func:`analyze_files` (what ``segability analyze`` runs), :func:`run_files`, :class:`BatchSummary`.

Large volumes go through :func:`analyze_windows` (sliding windows), re-exported from the analysis.
"""

from __future__ import annotations

from segability.analysis.windows import analyze_windows
from segability.batch.config import FilesConfig, ModelSource
from segability.batch.run import BatchSummary, analyze_files, run_files
from segability.batch.shards import safe_name

__all__ = ["analyze_files", "run_files", "BatchSummary", "FilesConfig", "ModelSource", "safe_name", "analyze_windows"]
