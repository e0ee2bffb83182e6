"""The page around the report's sections: contents, style sheet, table sorter and security policy.

Every figure is an embedded PNG (``data:`` URI); the only script is a small table sorter and the
only style sheet is inline. A Content-Security-Policy in the page allows nothing else: no network,
no other script (the sorter is allowed by its hash), so even a string that slipped past escaping
could not run.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from segability import __version__
from segability.report.html import Html, join, tag

__all__ = ["Section", "GENERATOR"]

GENERATOR = "segability report"


@dataclass
class Section:
    """One view of the report: its anchor, title, body, and whether its data was there."""

    id: str
    title: str
    body: Html
    present: bool = True


_CSS = """
:root{--fg:#1d2125;--muted:#5c6670;--line:#dde1e5;--bg:#f5f6f8;--card:#fff;--accent:#0072B2;--flag:#fdecea}
*{box-sizing:border-box}
html{scroll-behavior:smooth}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.55 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
code{font-family:ui-monospace,"SF Mono",Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:.86em;overflow-wrap:anywhere}
.layout{display:grid;grid-template-columns:230px minmax(0,1fr);max-width:1480px;margin:0 auto}
nav.toc{position:sticky;top:0;align-self:start;max-height:100vh;overflow:auto;padding:28px 18px 28px 24px}
nav.toc .brand{font-weight:650;font-size:15px;margin:0 0 14px;color:var(--accent)}
nav.toc h2{font-size:11px;text-transform:uppercase;letter-spacing:.08em;color:var(--muted);margin:0 0 8px}
nav.toc ol{list-style:none;margin:0;padding:0;counter-reset:s}
nav.toc li{counter-increment:s;margin:2px 0}
nav.toc a{display:block;padding:5px 8px;border-radius:6px;color:var(--fg);text-decoration:none;font-size:14px}
nav.toc a::before{content:counter(s) ". ";color:var(--muted)}
nav.toc a:hover{background:#e8edf2}
nav.toc li.missing a{color:var(--muted)}
nav.toc li.missing a::after{content:" (no data)";font-size:12px}
main{padding:28px 36px 60px;min-width:0;border-left:1px solid var(--line);min-height:100vh}
header h1{font-size:26px;line-height:1.25;margin:0 0 10px;font-weight:680;overflow-wrap:anywhere}
ul.facts{list-style:none;padding:0;margin:0 0 8px;display:flex;flex-wrap:wrap;gap:8px}
ul.facts li{background:var(--card);border:1px solid var(--line);border-radius:999px;padding:2px 12px;font-size:13px}
ul.facts .k{color:var(--muted)}
ul.facts .v{font-weight:600;overflow-wrap:anywhere}
p.meta{color:var(--muted);font-size:13px;margin:4px 0 10px;overflow-wrap:anywhere}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:20px 24px;margin:22px 0;scroll-margin-top:12px}
section h2{font-size:19px;margin:0 0 12px;font-weight:650}
section h3{font-size:15px;margin:22px 0 4px;font-weight:620}
ul.findings{margin:0;padding-left:20px}
ul.findings li{margin:4px 0}
ul.findings .scope{color:var(--muted);font-size:13px}
#findings{border-left:4px solid var(--accent)}
figure{margin:0}
figure.chart{margin:8px 0 18px}
figure.chart img{max-width:100%;height:auto;display:block}
figure.chart.wide img{width:100%}
figure.chart figcaption,p.caption{color:var(--muted);font-size:13.5px;margin:6px 0 10px;max-width:80ch}
.map-grid{display:flex;flex-wrap:wrap;gap:10px 8px;margin:6px 0 12px}
figure.map{width:min-content}
figure.map img{display:block;max-width:none;image-rendering:pixelated;border-radius:4px;border:1px solid var(--line)}
figure.map figcaption{font-size:11.5px;line-height:1.35;margin-top:3px;color:var(--fg)}
figure.map .name{display:block;overflow-wrap:break-word}
figure.map .score{display:block;color:var(--muted)}
figure.map .num-tag{color:var(--muted);font-variant-numeric:tabular-nums}
.unit-grid{display:flex;flex-wrap:wrap;gap:4px 30px;margin-top:6px}
.unit-group{border-top:1px solid var(--line);padding-top:6px}
.unit-layer{font-size:13px;max-width:420px;overflow-wrap:break-word}
.num-tag{color:var(--muted);font-variant-numeric:tabular-nums}
.table-wrap{overflow:auto;max-height:640px;border:1px solid var(--line);border-radius:8px;margin:4px 0 14px}
table{border-collapse:collapse;width:100%;font-size:12.5px}
table.sortable th{position:sticky;top:0;background:#eef1f4;text-align:left;font-weight:600;padding:7px 8px;border-bottom:1px solid var(--line);vertical-align:bottom;cursor:pointer;user-select:none}
table.sortable th.nosort{cursor:default}
table.sortable th:not(.nosort)::after{content:"\\00a0\\2195";color:#9aa4ad;font-weight:400}
table.sortable th[aria-sort=ascending]::after{content:"\\00a0\\25B2";color:var(--accent)}
table.sortable th[aria-sort=descending]::after{content:"\\00a0\\25BC";color:var(--accent)}
table.sortable th:focus-visible{outline:2px solid var(--accent);outline-offset:-2px}
td{padding:4px 8px;border-bottom:1px solid #eef0f2;vertical-align:middle}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td code{overflow-wrap:break-word}
td.layer{min-width:26ch;max-width:48ch}
td.na{color:#a0a7ae}
table.sortable tbody tr:nth-child(even){background:#fafbfc}
tbody tr:hover{background:#eef5fb}
tr.flagged,tr.flagged:nth-child(even){background:var(--flag)}
td.thumb-cell{padding:3px 6px;width:80px}
img.thumb{display:block;image-rendering:pixelated;border-radius:3px}
td.error{overflow-wrap:anywhere;min-width:30ch}
table.kv{width:auto;max-width:100%}
table.kv th{text-align:left;color:var(--muted);font-weight:600;padding:5px 18px 5px 0;vertical-align:top;white-space:nowrap}
table.kv td{overflow-wrap:anywhere;padding:5px 0}
table.kv tr{border-bottom:1px solid #eef0f2}
p.absent{background:#f3f4f6;border:1px dashed #c9ced4;border-radius:8px;padding:10px 14px;color:var(--muted);margin:6px 0}
footer{color:var(--muted);font-size:12px;margin-top:30px}


@media (max-width:900px){.layout{display:block}nav.toc{position:static;max-height:none;border-bottom:1px solid var(--line)}main{padding:18px;border-left:0}}
@media print{nav.toc{display:none}.layout{display:block}section{break-inside:avoid-page}.table-wrap{max-height:none}}
"""

# Sorts a table by a clicked header: numbers by value (a cell's data-sort, else its text), text in
# natural order, empty cells last in both directions; rows keep their order on ties.
_JS = """
(function () {
  "use strict";
  function key(row, col) {
    var cell = row.cells[col];
    if (!cell) { return ""; }
    var v = cell.getAttribute("data-sort");
    return (v === null ? cell.textContent : v).trim();
  }
  function isNumber(s) { return s !== "" && isFinite(Number(s)); }
  function compare(a, b) {
    var an = isNumber(a), bn = isNumber(b);
    if (an && bn) { return Number(a) - Number(b); }
    if (an !== bn) { return an ? -1 : 1; }
    return a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }
  function sortBy(th) {
    var table = th.closest("table"), body = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
    table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
    var rows = Array.prototype.map.call(body.rows, function (r, i) { return [key(r, col), i, r]; });
    rows.sort(function (x, y) {
      if ((x[0] === "") !== (y[0] === "")) { return x[0] === "" ? 1 : -1; }
      return dir * compare(x[0], y[0]) || x[1] - y[1];
    });
    rows.forEach(function (r) { body.appendChild(r[2]); });
  }
  document.querySelectorAll("table.sortable thead th:not(.nosort)").forEach(function (th) {
    th.tabIndex = 0;
    th.addEventListener("click", function () { sortBy(th); });
    th.addEventListener("keydown", function (e) {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(th); }
    });
  });
})();
"""


def _csp_hash(text: str) -> str:
    return (
        "'sha256-"
        + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")
        + "'"
    )


def _page(title: str, header: Html, sections: list[Section]) -> str:
    csp = (
        f"default-src 'none'; img-src data:; style-src {_csp_hash(_CSS)}; "
        f"script-src {_csp_hash(_JS)}; base-uri 'none'; form-action 'none'"
    )
    toc = tag(
        "ol",
        join(
            tag("li", tag("a", s.title, href=f"#{s.id}"), class_=None if s.present else "missing")
            for s in sections
        ),
    )
    nav = tag(
        "nav",
        tag("p", "segability", class_="brand"),
        tag("h2", "Contents"),
        toc,
        class_="toc",
        aria_label="Contents",
    )
    body = join(tag("section", tag("h2", s.title), s.body, id=s.id) for s in sections)
    footer = tag(
        "footer",
        "Segmentation ability after He et al., Medical Image Analysis (2023). "
        "SA: Dice of a layer's prototype segmentation against a reference.",
    )
    head = join(
        [
            Html('<meta charset="utf-8">'),
            tag("meta", name="viewport", content="width=device-width, initial-scale=1"),
            tag("meta", name="generator", content=f"{GENERATOR} {__version__}"),
            tag("meta", http_equiv="Content-Security-Policy", content=csp),
            tag("title", title),
            Html(f"<style>{_CSS}</style>"),
        ]
    )
    page = join(
        [
            Html("<!DOCTYPE html>\n"),
            Html('<html lang="en">'),
            tag("head", head),
            tag(
                "body",
                tag("div", nav, tag("main", header, body, footer), class_="layout"),
                Html(f"<script>{_JS}</script>"),
            ),
            Html("</html>\n"),
        ]
    )
    return str(page)


def _made_by_report(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    return f'<meta name="generator" content="{GENERATOR}' in head
