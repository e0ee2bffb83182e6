"""SA over training (history.csv), one line per layer."""

from __future__ import annotations

from segability.report.figures import charts
from segability.report.folder import ResultFolder
from segability.report.html import _absent, _figure_block
from segability.report.page import Section


def _history_section(folder: ResultFolder, order: list[str]) -> Section:
    title = "SA over training"
    if folder.history is None:
        return Section(
            "history",
            title,
            _absent("no history.csv (SA was not recorded during training)."),
            False,
        )
    n = folder.history["layer"].nunique()
    png = charts.history_figure(folder.history, order)
    caption = (
        f"One line per layer ({n}), coloured from the first (dark) to the last (yellow) in forward order: "
        "the SA of each layer after each epoch, averaged over the images scored."
    )
    return Section("history", title, _figure_block(png, "SA over epochs", caption, class_="chart"))
