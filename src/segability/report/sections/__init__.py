"""The views of the report, one module each, in page order.

``findings`` (what this run shows), ``layers`` (SA per layer), ``maps`` (segmentation ability maps
of kept images), ``units``, ``quality`` (the quality gate), ``failures`` (failed files, or a run in
which nothing was analysed), ``history`` (SA over training) and ``settings``; ``header`` is the
title and the run's facts above them. Each returns a :class:`~segability.report.page.Section`,
with ``present=False`` and a note when the folder lacks its data.
"""
