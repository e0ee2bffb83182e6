"""The HTML report: one self-contained page that shows a result folder.

``build_report(result_dir)`` reads the folder's files (see ``docs/architecture.md``, "The result
folder") and writes ``report.html``: SA per layer, segmentation ability maps, units, the quality
gate, failed files, SA over training and the run's settings, each view shown when its data exists.
A folder whose run has not merged its tables raises :class:`IncompleteRunError` (a ValueError).

``folder`` reads the result folder and ``summaries`` makes the tables the views show; ``figures``
draws charts and map thumbnails; ``sections`` builds one view each; ``html`` is the safe element
builder and ``page`` the page around the views; ``build`` ties them together.
"""

from __future__ import annotations

from segability.report.build import build_report
from segability.report.folder import IncompleteRunError

__all__ = ["build_report", "IncompleteRunError"]
