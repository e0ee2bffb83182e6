"""The run's settings (settings.json) and timing (timing.json) as key-value tables."""

from __future__ import annotations

import json
from typing import Any

from segability.report.folder import ResultFolder
from segability.report.html import Html, _absent, join, tag
from segability.report.page import Section

SETTINGS_FIRST = (
    "model",
    "layers",
    "guide",
    "output",
    "target",
    "units",
    "spatial_dims",
    "data",
    "version",
    "date",
)


def _setting_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _key_value_table(items: dict[str, Any], id_: str) -> Html:
    keys = [k for k in SETTINGS_FIRST if k in items] + [k for k in items if k not in SETTINGS_FIRST]
    rows = [
        tag("tr", join([tag("th", k, scope="row"), tag("td", _setting_text(items[k]))]))
        for k in keys
    ]
    return tag("table", tag("tbody", join(rows)), class_="kv", id=id_)


def _settings_section(folder: ResultFolder) -> Section:
    blocks = []
    if folder.settings:
        blocks.append(
            tag("p", "The settings the run was made with (settings.json).", class_="caption")
        )
        blocks.append(_key_value_table(folder.settings, "table-settings"))
    else:
        blocks.append(_absent("no settings.json in the result folder."))
    if folder.timing is not None:
        blocks.append(tag("h3", "Timing"))
        blocks.append(_key_value_table(folder.timing, "table-timing"))
    return Section("settings", "Settings", join(blocks), bool(folder.settings))
