"""The HTML report: one self-contained page that shows a result folder.

``build_report(result_dir)`` reads the folder's files (see ``docs/architecture.md``, "The result
folder") and writes ``report.html``: SA per layer, segmentation ability maps, units, the quality
gate, failed files, SA over training and the run's settings, each view shown when its data exists.
A folder whose run has not merged its tables raises :class:`IncompleteRunError` (a ValueError).
"""

from __future__ import annotations

from segability.report.data import IncompleteRunError
from segability.report.html import build_report

__all__ = ["build_report", "IncompleteRunError"]
