"""The "What this run shows" view: the statements, each with the images it is about."""

from __future__ import annotations

from collections.abc import Sequence

from segability.report.folder import Finding, ResultFolder
from segability.report.html import join, tag
from segability.report.page import Section
from segability.report.summaries import describe_images, select_images

MAX_SUBSET_CHARTS = 3  # SA-per-layer charts of image subsets the findings quote


def _selector_text(selector: dict[str, tuple[str, ...]]) -> str:
    if not selector:
        return "every image"
    return "; ".join(f"{col} {', '.join(values)}" for col, values in selector.items())


def _finding_subsets(
    folder: ResultFolder, findings: Sequence[Finding]
) -> list[tuple[dict[str, tuple[str, ...]], list[str]]]:
    """The distinct image subsets the findings quote that are neither empty nor every image."""
    out: list[tuple[dict[str, tuple[str, ...]], list[str]]] = []
    total = folder.images["image"].nunique()
    for f in findings:
        if f.images is None or any(sel == f.images for sel, _ in out):
            continue
        if any(c not in folder.images.columns for c in f.images):
            continue
        ids = folder.images.loc[select_images(folder.images, f.images), "image"].unique().tolist()
        if 0 < len(ids) < total:
            out.append((f.images, [str(i) for i in ids]))
    return out[:MAX_SUBSET_CHARTS]


def _findings_section(findings: Sequence[Finding], folder: ResultFolder) -> Section | None:
    if not findings:
        return None
    items = []
    for f in findings:
        note = None
        if f.images is not None:
            missing = [c for c in f.images if c not in folder.images.columns]
            if missing:
                note = (
                    f"about the images with {_selector_text(f.images)}; images.parquet has no "
                    f"column {', '.join(missing)}, so the report cannot check them"
                )
            else:
                ids = folder.images.loc[select_images(folder.images, f.images), "image"]
                note = f"over {describe_images(ids, folder.images)}"
        items.append(tag("li", f.text, tag("span", f" — {note}", class_="scope") if note else None))
    body = [tag("ul", join(items), class_="findings")]
    if any(f.images is None for f in findings) and any(f.images is not None for f in findings):
        body.append(
            tag(
                "p",
                "Statements without a note after a dash do not say which images they are about.",
                class_="caption",
            )
        )
    return Section("findings", "What this run shows", join(body))
