"""Failed files (errors.csv), and the view of a run in which no image was analysed."""

from __future__ import annotations

from segability.report.folder import ResultFolder
from segability.report.html import _absent, _table, join, tag
from segability.report.page import Section
from segability.report.sections.quality import MAX_QUALITY_ROWS


def _failed_section(folder: ResultFolder) -> Section:
    title = "Failed files"
    errors = folder.errors
    if errors is None:
        return Section(
            "failed",
            title,
            _absent(
                "no errors.csv in the result folder (runs over files record failures there).",
                "No failure recorded:",
            ),
            False,
        )
    if errors.empty:
        return Section(
            "failed", title, tag("p", "No file failed (errors.csv is empty).", class_="caption")
        )
    # the stage, when recorded, then the error; a traceback folds away under its error
    shown = ["stage"] if errors["stage"].astype(str).str.len().gt(0).any() else []
    extra = [c for c in errors.columns if c not in ("file", "stage", "error", "traceback")]
    columns = ["file", *shown, "error", *extra]

    def error_cell(r: dict) -> object:
        trace = str(r.get("traceback") or "")
        if not trace:
            return tag("td", r["error"], class_="error")
        return tag("td", join([r["error"], tag("details", join([tag("summary", "traceback"), tag("pre", trace)]))]), class_="error")

    rows = [
        tag(
            "tr",
            join(
                [tag("td", tag("code", r["file"]), class_="layer")]
                + [error_cell(r) if c == "error" else tag("td", r[c], class_="error") for c in columns[1:]]
            ),
        )
        for r in errors.head(MAX_QUALITY_ROWS).to_dict("records")
    ]
    caption = f"{len(errors)} file(s) could not be analysed (errors.csv); they are in no table or chart of this report."
    if len(errors) > MAX_QUALITY_ROWS:
        caption += f" The first {MAX_QUALITY_ROWS} are listed."
    return Section("failed", title, _table(columns, rows, id_="table-failed", caption=caption))


def _nothing_analysed_section(folder: ResultFolder) -> Section:
    n = len(folder.errors) if folder.errors is not None else 0
    text = (
        f"Every image of this run failed: {n} file(s) listed under Failed files, none analysed, "
        "so there are no SA scores, maps or quality estimates to show."
        if n
        else "This result folder holds no analysed image (its tables are empty) and no recorded failure."
    )
    return Section(
        "no-result", "No image was analysed", tag("p", tag("strong", text), class_="absent")
    )
