"""``build_report``: read a result folder, build its views and write one self-contained HTML file."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segability.analysis.results import class_names, class_table
from segability.report.folder import (
    Finding,
    MapStore,
    ResultFolder,
    parse_findings,
    read_result_folder,
)
from segability.report.page import _made_by_report, _page
from segability.report.sections.failures import _failed_section, _nothing_analysed_section
from segability.report.sections.findings import _findings_section
from segability.report.sections.header import _header
from segability.report.sections.history import _history_section
from segability.report.sections.layers import _layers_section
from segability.report.sections.maps import _choose_images, _maps_section
from segability.report.sections.quality import _quality_section
from segability.report.sections.settings import _setting_text, _settings_section
from segability.report.sections.units import _units_section
from segability.report.summaries import layer_order, layer_summary

__all__ = ["build_report"]


def build_report(
    result_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    images: Sequence[str] | None = None,
    max_images: int = 4,
    slice_index: int | None = None,
    title: str | None = None,
    findings: Sequence[str | dict[str, Any] | Finding] | None = None,
) -> Path:
    """Write the HTML report of a result folder: one self-contained file.

    Views: what the run shows (findings), SA per layer, segmentation ability maps, units, the
    quality gate, failed files, SA over training, and the settings. A view whose data the folder
    lacks says so. Every chart says which images it averages; when findings name the images they
    quote (see :func:`segability.report.folder.parse_findings`), SA per layer is also drawn for
    those images. A run in which every image failed gives a report that says so and lists the
    failures.

    Args:
        result_dir: folder written by ``SAResult.save`` (``layers.parquet``, ``images.parquet``,
            ``settings.json``; optional ``units.parquet``, ``maps.npz``, ``qc.csv``,
            ``history.csv``, ``timing.json``, ``findings.json``).
        out: where to write; default ``result_dir/report.html``. An existing file is replaced only
            when it is an earlier report (it carries the report's generator tag).
        images: ids of kept images (in ``maps.npz``) whose maps to show; default the first
            ``max_images``.
        max_images: how many kept images to show when ``images`` is None.
        slice_index: slice (along the last axis) shown for 3D images; default the slice with the
            largest target area.
        title: page title; default from the model name.
        findings: statements for "What this run shows": strings or ``{"text": ..., "images":
            {column: [values]}}``; default ``findings.json`` of the folder.

    Returns:
        The path of the written report.

    Raises:
        FileNotFoundError: ``result_dir`` is not a result folder.
        IncompleteRunError: (a ValueError) the run has not merged its tables yet (``shards/``
            without ``images.parquet``, or a table missing): resume the run first.
        FileExistsError: ``out`` exists and was not made by this report.
        ValueError: a bad argument (unknown image id, slice_index out of range, ...) or a malformed
            file in the folder.

    Example:
        >>> from segability.report import build_report
        >>> path = build_report("runs/demo", images=["case_003"])  # doctest: +SKIP
        >>> path.name  # doctest: +SKIP
        'report.html'
    """
    if isinstance(images, str):
        raise ValueError(f"images must be a list of image ids, got the string {images!r}")
    if images is not None and len(images) == 0:
        raise ValueError("images must name at least one image id (or be None)")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"max_images must be an int >= 1, got {max_images!r}")
    if slice_index is not None and (
        isinstance(slice_index, bool) or not isinstance(slice_index, int) or slice_index < 0
    ):
        raise ValueError(f"slice_index must be an int >= 0 or None, got {slice_index!r}")
    folder = read_result_folder(result_dir)
    out_path = Path(out) if out is not None else folder.root / "report.html"
    if out_path.is_dir():
        raise ValueError(f"out must be a file path, {str(out_path)!r} is a directory")
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"out: folder {str(out_path.parent)!r} does not exist")
    if out_path.exists() and not _made_by_report(out_path):
        raise FileExistsError(
            f"out: {str(out_path)!r} exists and is not a segability report; not overwriting it"
        )
    statements = (
        parse_findings(list(findings), "findings") if findings is not None else folder.findings
    )
    if not folder.analysed:
        title_text = title or f"segability report: {folder.root.name}"
        if images is not None:
            raise ValueError(f"images={list(images)!r}: no image of this run was analysed")
        sections = [
            s
            for s in (
                _nothing_analysed_section(folder),
                _findings_section(statements, folder),
                _failed_section(folder),
                _settings_section(folder),
            )
            if s is not None
        ]
        _write(out_path, _page(title_text, _header(folder, title_text, 0), sections))
        return out_path

    order = layer_order(folder.layers)
    n_layers = sum(1 for n in order if n != "input")
    model = folder.settings.get("model")
    page_title = title or (
        f"segability report: {_setting_text(model)}"
        if model
        else f"segability report: {folder.root.name}"
    )
    maps = MapStore(folder.maps_path) if folder.maps_path is not None else None
    try:
        chosen, skipped = _choose_images(maps, images, max_images)
        layer_views, unit_views, gate_views = [], [], []  # a multi-class run: these views for every class
        for suffix, title_suffix, view in _class_views(folder):
            for views, section in ((layer_views, _layers_section(view, layer_summary(view.layers), statements)),
                                   (unit_views, _units_section(view, maps, chosen, order, slice_index)),
                                   (gate_views, _quality_section(view, maps, slice_index))):  # fmt: skip
                if section is not None:
                    views.append(dataclasses.replace(section, id=section.id + suffix, title=section.title + title_suffix))
        sections = [
            s
            for s in (
                _findings_section(statements, folder),
                *layer_views,
                _maps_section(folder, maps, chosen, skipped, order, slice_index),
                *unit_views,
                *gate_views,
                _failed_section(folder),
                _history_section(folder, order),
                _settings_section(folder),
            )
            if s is not None
        ]
    finally:
        if maps is not None:
            maps.close()
    _write(out_path, _page(page_title, _header(folder, page_title, n_layers), sections))
    return out_path


def _class_views(folder: ResultFolder) -> list[tuple[str, str, ResultFolder]]:
    """``(anchor suffix, title suffix, folder view)`` per class of a multi-class run (tables of
    that class only, without the class columns); the folder itself for a single-target run."""
    names = class_names(folder.layers)
    if not names:
        return [("", "", folder)]
    return [
        (f"-class-{c}", f" — class {c} ({name})",
         dataclasses.replace(folder, layers=class_table(folder.layers, c), images=class_table(folder.images, c),
                             units=class_table(folder.units, c), qc=class_table(folder.qc, c)))
        for c, name in names.items()
    ]  # fmt: skip


def _write(out_path: Path, page: str) -> None:
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
