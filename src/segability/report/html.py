"""Safe HTML for the report: trusted fragments (:class:`Html`), escaping, elements, cells and tables.

Text that comes from the user's files goes through :func:`esc`; HTML is assembled from :class:`Html`
fragments only (:func:`tag`, :func:`join`), so an unescaped string cannot end up in the page by
accident. The page around the fragments (style, script, Content-Security-Policy) is
:mod:`segability.report.page`.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["Html", "esc", "tag", "join"]


class Html(str):
    """A fragment of trusted HTML: built by this module, never from raw user text."""

    __slots__ = ()


def esc(value: Any) -> Html:
    """Escape any value for HTML text or attribute; :class:`Html` passes through unchanged.

    Example:
        >>> esc("<script>alert(1)</script>")
        '&lt;script&gt;alert(1)&lt;/script&gt;'
    """
    if isinstance(value, Html):
        return value
    return Html(html.escape(str(value), quote=True))


def tag(element: str, /, *children: Any, **attrs: Any) -> Html:
    """An element whose children and attribute values are escaped unless already :class:`Html`.

    Attribute names take a trailing ``_`` off (``class_``) and turn ``_`` into ``-``
    (``data_sort``); ``None``/``False`` leaves the attribute out, ``True`` writes it bare.

    Example:
        >>> tag("td", "<b>", class_="num", data_sort=0.5)
        '<td class="num" data-sort="0.5">&lt;b&gt;</td>'
    """
    parts = [element]
    for key, value in attrs.items():
        if value is None or value is False:
            continue
        key = key.rstrip("_").replace("_", "-")
        parts.append(key if value is True else f'{key}="{esc(value)}"')
    open_ = "<" + " ".join(parts) + ">"
    if element in ("img", "meta", "br", "col"):
        return Html(open_)
    return Html(open_ + "".join(esc(c) for c in children if c is not None) + f"</{element}>")


def join(parts: Iterable[Any], sep: str = "") -> Html:
    """Concatenate fragments, escaping any that are not :class:`Html`."""
    return Html(sep.join(esc(p) for p in parts if p is not None))


def _img(
    png: bytes,
    alt: str,
    class_: str | None = None,
    title: str | None = None,
    size: tuple[int, int] | None = None,
) -> Html:
    """An embedded PNG; ``size`` (rows, columns) is its pixel size, shown 1:1."""
    src = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    h, w = size if size is not None else (None, None)
    return tag("img", src=src, alt=alt, class_=class_, title=title, width=w, height=h)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x: Any, digits: int = 3) -> str:
    return f"{float(x):.{digits}f}" if _finite(x) else "—"


def _num_cell(x: Any, digits: int = 3) -> Html:
    if _finite(x):
        return tag("td", _fmt(x, digits), class_="num", data_sort=repr(float(x)))
    return tag("td", "—", class_="num na", data_sort="")


def _text_cell(x: Any) -> Html:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return tag("td", "", data_sort="")
    return tag("td", x)


def _table(
    headers: Sequence[Any],
    rows: Iterable[Html],
    *,
    id_: str,
    sorted_by: int | None = None,
    nosort: Sequence[int] = (),
    caption: str | None = None,
) -> Html:
    ths = [
        tag(
            "th",
            h,
            scope="col",
            class_="nosort" if i in nosort else None,
            aria_sort="ascending" if i == sorted_by else None,
            title=None if i in nosort else "Click to sort",
        )
        for i, h in enumerate(headers)
    ]
    body = tag("tbody", join(rows))
    table = tag("table", tag("thead", tag("tr", join(ths))), body, class_="sortable", id=id_)
    cap = tag("p", caption, class_="caption") if caption else None
    return join([cap, tag("div", table, class_="table-wrap")])


def _figure_block(png: bytes, alt: str, caption: str, class_: str = "chart") -> Html:
    return tag("figure", _img(png, alt), tag("figcaption", caption), class_=class_)


def _absent(text: str, what: str = "Not shown.") -> Html:
    return tag("p", tag("strong", what + " "), text, class_="absent")


def _breakable(name: str) -> Html:
    """A name that may wrap after its dots and underscores, never cut."""
    parts = re.split(r"(?<=[._])", name)
    return join([esc(p) for p in parts], sep=Html("<wbr>"))
