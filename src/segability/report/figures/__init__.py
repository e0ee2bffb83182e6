"""Figures of the report, as PNG bytes: matplotlib ``charts`` and map ``thumbnails``.

Charts are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``. Thumbnails are made with NumPy and Pillow. Both take their colours from ``colors``
(fixed across the report); ``labels`` shortens layer names for ticks and legends.
"""
