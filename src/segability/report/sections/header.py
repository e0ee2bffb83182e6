"""The top of the page: the title and the run's facts (model, images, layers, labels, ...)."""

from __future__ import annotations

from datetime import datetime, timezone

from segability import __version__
from segability.report.folder import ResultFolder
from segability.report.html import Html, join, tag
from segability.report.sections.settings import _setting_text


def _header(folder: ResultFolder, title: str, n_layers: int) -> Html:
    s = folder.settings
    facts = [
        ("images", str(folder.images["image"].nunique())),
        ("layers", str(n_layers)),
        ("labels", "yes" if folder.has_labels else "no"),
        ("units", "yes" if folder.units is not None else "no"),
    ]
    if folder.errors is not None:
        facts.insert(1, ("failed", str(len(folder.errors))))
    if "model" in s:
        facts.insert(0, ("model", _setting_text(s["model"])))
    if "date" in s:
        facts.append(("run", _setting_text(s["date"])))
    items = join(
        tag("li", tag("span", k, class_="k"), " ", tag("span", v, class_="v")) for k, v in facts
    )
    built = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return tag(
        "header",
        tag("h1", title),
        tag("ul", items, class_="facts"),
        tag(
            "p",
            "Result folder ",
            tag("code", str(folder.root.resolve())),
            f" · report built {built} with segability {__version__}",
            class_="meta",
        ),
    )
