"""The review pages as HTML: the queue and a case, plus their one style sheet and one script.

Every string that comes from the run (image ids, layer names, reasons, classes) or from a person
(notes, reviewer names) goes through the report's escaping element builder
(:mod:`segability.report.html`); pictures are ``<img>`` elements whose address the app serves.
The script and the style sheet are served by the app itself (``/static/...``), and the
Content-Security-Policy the app sends allows nothing else: no inline script, no other origin.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlencode

from segability.report.html import Html, join, tag
from segability.review.queue import CLASS_COLUMN, Filters, ReviewRun
from segability.review.render import AXIS_NAMES, panels_of, slice_defaults
from segability.review.store import DECISIONS, Decision

__all__ = ["queue_page", "case_page", "CSS", "SCRIPT", "DECISION_WORDS", "MAPS_SHOWN"]

MAPS_SHOWN = 4  # layers shown as maps: those whose sa_pred is lowest
DECISION_WORDS = {"accept": "accepted", "reject": "rejected", "needs_label": "needs a label"}
KEYS = {"accept": "a", "reject": "r", "needs_label": "l"}
BUTTON_WORDS = {"accept": "Accept", "reject": "Reject", "needs_label": "Needs label"}


def _void(element: str, **attrs: Any) -> Html:
    """A void element (``input``, ``link``): attributes escaped, no end tag."""
    return Html(tag(element, **attrs)[: -len(f"</{element}>")])


def _fmt(x: Any, digits: int = 3) -> str:
    try:
        value = float(x)
    except (TypeError, ValueError):
        return "—"
    return f"{value:.{digits}f}" if math.isfinite(value) else "—"


def _url(path: str, **params: Any) -> str:
    params = {k: v for k, v in params.items() if v is not None}
    return path + ("?" + urlencode(params) if params else "")


def _page(title: str, body: Html, *, token: str, kind: str, data: Mapping[str, Any] | None = None) -> str:
    attrs = {f"data_{k}": v for k, v in (data or {}).items()}
    return (
        "<!doctype html>\n"
        + tag(
            "html",
            tag(
                "head",
                Html('<meta charset="utf-8">'),
                Html('<meta name="viewport" content="width=device-width, initial-scale=1">'),
                tag("meta", name="csrf-token", content=token),
                tag("title", title),
                _void("link", rel="stylesheet", href="/static/review.css"),
                tag("script", src="/static/review.js", defer=True),
            ),
            tag("body", body, data_page=kind, **attrs),
            lang="en",
        )
    )


def _decision_badge(decision: Decision | None) -> Html:
    if decision is None:
        return tag("span", "not reviewed", class_="badge none", data_decision="")
    return tag("span", DECISION_WORDS[decision.decision], class_=f"badge {decision.decision}",
               data_decision=decision.decision)  # fmt: skip


def _select(name: str, label: str, options: Sequence[tuple[str, str]], chosen: str | None) -> Html:
    opts = [tag("option", "all", value="")]
    opts += [tag("option", words, value=value, selected=value == chosen) for value, words in options]
    return tag("label", label + " ", tag("select", join(opts), name=name))


def queue_page(run: ReviewRun, filters: Filters, decisions: Mapping[str, Decision], *, token: str) -> str:
    """The queue: the filtered cases least trusted first, progress, and the filters."""
    shown = run.queue(filters, decisions)
    total, done = len(run.cases), sum(1 for i in run.cases["image"] if i in decisions)
    counts = {d: sum(1 for x in decisions.values() if x.decision == d and x.image in run) for d in DECISIONS}
    progress = tag(
        "div",
        tag("progress", value=done, max=max(total, 1)),
        tag("span", f"{done} of {total} reviewed", id="progress-text"),
        tag("span", " · ".join(f"{counts[d]} {DECISION_WORDS[d]}" for d in DECISIONS), class_="muted"),
        class_="progress",
    )
    reasons = dict(zip(run.cases["status"], run.cases["reason"], strict=True))
    controls = []
    if run.has_qc:
        controls.append(_select("flagged", "flagged", [("yes", "flagged"), ("no", "not flagged")],
                                filters.query().get("flagged")))  # fmt: skip
    controls.append(_select("status", "status", [(s, f"{s}: {reasons[s]}" if reasons[s] else s) for s in run.statuses],
                            filters.status))  # fmt: skip
    if run.classes:
        controls.append(_select("class", "class", [(c, c) for c in run.classes], filters.class_))
    controls.append(_select("reviewed", "reviewed", [("no", "not reviewed"), ("yes", "reviewed")], filters.reviewed))
    controls.append(_select("decision", "decision", [(d, DECISION_WORDS[d]) for d in DECISIONS], filters.decision))
    controls.append(tag("button", "Filter", type="submit"))
    form = tag("form", join(controls), method="get", action="/", class_="filters", id="filters")

    has_class = CLASS_COLUMN in run.cases.columns
    has_dice = bool(run.cases["dice"].notna().any())
    headers = ["#", "image", "estimated Dice", "interval", "flag", "status", "reason"]
    headers += ["class"] * has_class + ["Dice"] * has_dice + ["mean SA (pred.)", "decision"]
    query = filters.query()
    rows = []
    for case in shown.to_dict("records"):
        image = case["image"]
        cells = [
            tag("td", case["rank"], class_="num"),
            tag("td", tag("a", image, href=_url("/case", image=image, **query), class_="case-link")),
            tag("td", _fmt(case["estimated_dice"]), class_="num"),
            tag("td", "—" if not run.has_qc else f"[{_fmt(case['lower'], 2)}, {_fmt(case['upper'], 2)}]", class_="num"),
            tag("td", "flagged" if case["flag"] else "", class_="flag" if case["flag"] else None),
            tag("td", case["status"]),
            tag("td", case["reason"]),
        ]
        if has_class:
            cells.append(tag("td", case[CLASS_COLUMN]))
        if has_dice:
            cells.append(tag("td", _fmt(case["dice"]), class_="num"))
        cells += [tag("td", _fmt(case["mean_sa_pred"]), class_="num"), tag("td", _decision_badge(decisions.get(image)))]
        rows.append(tag("tr", join(cells), data_image=image))
    table = tag(
        "table",
        tag("thead", tag("tr", join(tag("th", h, scope="col") for h in headers))),
        tag("tbody", join(rows)),
        id="queue",
    )
    first_open = next((c for c in shown["image"] if c not in decisions), None)
    empty = None if rows else tag("p", "No case passes these filters.", class_="absent")
    report = (
        tag("p", tag("a", "The run's report", href="/files/report.html"), class_="muted")
        if (run.run_dir / "report.html").is_file() else None
    )  # fmt: skip
    body = tag(
        "main",
        tag("h1", "Review queue: ", tag("span", run.run_dir.name, class_="run")),
        tag("p", run.order_note, id="order-note", class_="note" + ("" if run.has_qc else " warn")),
        progress,
        form,
        tag("p", f"{len(shown)} of {total} cases shown. Keys: n opens the next case not reviewed.", class_="muted"),
        empty,
        table,
        report,
    )
    next_url = _url("/case", image=first_open, **query) if first_open is not None else ""
    return _page("segability review", body, token=token, kind="queue", data={"next": next_url})


def _fact(key: str, value: Any, class_: str | None = None) -> Html:
    return tag("li", tag("span", key + " ", class_="k"), tag("span", value, class_="v"), class_=class_)


def case_page(
    run: ReviewRun,
    image: str,
    filters: Filters,
    decisions: Mapping[str, Decision],
    history: Sequence[Decision],
    *,
    token: str,
) -> str:
    """One case: its scores, the decision controls, its pictures and its layers."""
    case = run.case(image)
    query = filters.query()
    after = run.neighbour(image, filters, decisions, +1)
    before = run.neighbour(image, filters, decisions, -1)
    nav = tag(
        "nav",
        tag("a", "← queue", href=_url("/", **query), id="to-queue"),
        tag("a", "‹ previous", href=_url("/case", image=before, **query), id="prev") if before else None,
        tag("a", "next ›", href=_url("/case", image=after, **query), id="next") if after else None,
        tag("span", f"case {case['rank']} of {len(run.cases)} (least trusted first)", class_="muted"),
        class_="case-nav",
    )
    interval = f"[{_fmt(case['lower'], 2)}, {_fmt(case['upper'], 2)}]"
    facts = [
        _fact("estimated Dice", f"{_fmt(case['estimated_dice'])} {interval}" if run.has_qc else "— (no qc.csv)"),
        _fact("flag", "flagged for review" if case["flag"] else ("not flagged" if run.has_qc else "—"),
              "flagged" if case["flag"] else None),  # fmt: skip
        _fact("status", case["status"]),
        _fact("reason", case["reason"] or "—"),
        _fact("mean SA (pred.)", _fmt(case["mean_sa_pred"])),
        _fact("input SA (pred.)", _fmt(case["input_sa_pred"])),
    ]
    if math.isfinite(float(case["dice"])):
        facts.append(_fact("Dice (label)", _fmt(case["dice"])))
    if CLASS_COLUMN in case:
        facts.append(_fact("class", case[CLASS_COLUMN]))

    current = decisions.get(image)
    buttons = [
        tag("button", BUTTON_WORDS[d] + " ", tag("kbd", KEYS[d]), type="button", class_=f"decide {d}", data_decision=d)
        for d in DECISIONS
    ]
    buttons.append(tag("button", "Next ", tag("kbd", "n"), type="button", id="go-next", disabled=after is None))
    past = [
        tag("li", tag("span", DECISION_WORDS[d.decision], class_=f"badge {d.decision}"), " ",
            tag("span", d.decided_at, class_="muted"), " ", tag("span", d.reviewer, class_="who"),
            tag("div", d.note, class_="note-text") if d.note else None)  # fmt: skip
        for d in reversed(history)
    ]
    decide = tag(
        "section",
        tag("h2", "Decision: ", tag("span", _decision_badge(current), id="current-decision")),
        tag("div", join(buttons), class_="buttons"),
        tag("label", "note ", tag("textarea", current.note if current else "", id="note", rows=2, maxlength=4000)),
        tag("label", "reviewer ", _void("input", type="text", id="reviewer", maxlength=200, autocomplete="name")),
        tag("p", "", id="save-status", class_="muted", role="status"),
        tag("ol", join(past), id="history", reversed=True),
        class_="decide",
    )

    layers = run.layer_scores(image)
    entry = run.maps.get(image)
    pictures: list[Html] = []
    slicer = None
    if entry is None:
        pictures.append(tag("p", run.maps_note(image), class_="absent", id="no-maps"))
    else:
        defaults = slice_defaults(entry)
        axis = 2
        if defaults is not None:
            depth, chosen = defaults[axis]
            slicer = tag(
                "div",
                tag("label", "orientation ", tag("select", join(
                    tag("option", f"{AXIS_NAMES[a]} ({n} slices)", value=a, selected=a == axis, data_depth=n, data_default=s)
                    for a, (n, s) in enumerate(defaults)), id="axis")),  # fmt: skip
                tag("label", "slice ", _void("input", type="range", id="slice", min=0, max=depth - 1, value=chosen)),
                tag("output", f"{chosen + 1} / {depth}", id="slice-value", for_="slice"),
                class_="slicer",
            )
        views = [(p, None, {"image": "image", "prediction": "prediction (filled)", "label": "label (filled)"}[p])
                 for p in panels_of(entry)]  # fmt: skip
        worst = layers[layers["kept"]].head(MAPS_SHOWN)
        views += [("layer", row["layer"], f"{row['layer']} · SA (pred.) {_fmt(row['sa_pred'])}") for _, row in worst.iterrows()]
        for panel, layer, caption in views:
            params = {"image": image, "panel": panel, "layer": layer}
            if defaults is not None:
                params.update(axis=axis, slice=defaults[axis][1])
            pictures.append(tag(
                "figure",
                tag("img", src=_url("/png", **params), alt=caption, class_="view", data_panel=panel),
                tag("figcaption", caption),
                class_="view",
            ))  # fmt: skip
        if worst.empty:
            pictures.append(tag("p", "No layer map of this image was kept.", class_="absent"))
    outline = "label" if entry is not None and entry.get("label") is not None else "prediction"
    maps = tag(
        "section",
        tag("h2", "Image, output and the layers that disagree most"),
        tag("p", f"Maps of the {MAPS_SHOWN} layers whose SA against the prediction is lowest; the "
                 f"{outline} is outlined on every picture.", class_="muted"),  # fmt: skip
        slicer,
        tag("div", join(pictures), class_="views"),
    )
    rows = [
        tag("tr", tag("td", r["layer"]), tag("td", r["depth"], class_="num"), tag("td", _fmt(r["sa_pred"]), class_="num"),
            tag("td", _fmt(r["sa"]), class_="num"), tag("td", r["status"]))  # fmt: skip
        for _, r in layers.iterrows()
    ]
    table = tag(
        "section",
        tag("h2", "Layers, lowest SA against the prediction first"),
        tag("table", tag("thead", tag("tr", join(tag("th", h) for h in ("layer", "depth", "SA (pred.)", "SA (label)", "status")))),
            tag("tbody", join(rows)), id="layers"),  # fmt: skip
    )
    body = tag(
        "main",
        nav,
        tag("h1", image, id="image-id"),
        tag("ul", join(facts), class_="facts"),
        decide,
        maps,
        table,
    )
    data = {"image": image, "next": _url("/case", image=after, **query) if after else "", "prev":
            _url("/case", image=before, **query) if before else ""}  # fmt: skip
    return _page(f"review: {image}", body, token=token, kind="case", data=data)


CSS = """
:root{--fg:#1d2125;--muted:#5c6670;--line:#dde1e5;--bg:#f5f6f8;--card:#fff;--accent:#0072B2;--flag:#b3261e}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
main{max-width:1400px;margin:0 auto;padding:20px 28px 60px}
h1{font-size:22px;margin:6px 0 10px;overflow-wrap:anywhere}
h2{font-size:17px;margin:0 0 10px}
a{color:var(--accent)}
.muted{color:var(--muted);font-size:13.5px}
p.note{background:#eef5fb;border-left:4px solid var(--accent);padding:6px 12px;margin:6px 0}
p.note.warn{background:#fff6e5;border-left-color:#e69f00}
.absent{color:var(--muted);font-style:italic}
.progress{display:flex;align-items:center;gap:12px;margin:10px 0}
.progress progress{width:260px;height:14px}
form.filters{display:flex;flex-wrap:wrap;gap:10px 16px;align-items:center;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:8px 12px;margin:8px 0}
table{border-collapse:collapse;background:var(--card);width:100%;font-size:13.5px}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
td a.case-link{overflow-wrap:anywhere}
th{background:#eef0f3;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.flag,li.flagged .v{color:var(--flag);font-weight:600}
td.flag{white-space:nowrap}
.badge{display:inline-block;white-space:nowrap;border-radius:999px;padding:0 9px;font-size:12.5px;border:1px solid var(--line);background:#f0f0f0}
.badge.accept{background:#e3f4ea;border-color:#5cb27e}
.badge.reject{background:#fde8e6;border-color:#d0685f}
.badge.needs_label{background:#fff3d6;border-color:#d9a531}
.case-nav{display:flex;gap:16px;align-items:baseline;margin-bottom:4px}
ul.facts{list-style:none;padding:0;margin:0 0 10px;display:flex;flex-wrap:wrap;gap:8px}
ul.facts li{background:var(--card);border:1px solid var(--line);border-radius:999px;padding:2px 12px;font-size:13.5px}
ul.facts .k{color:var(--muted)}
ul.facts .v{font-weight:600;overflow-wrap:anywhere}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 18px;margin:14px 0}
section.decide .buttons{display:flex;gap:8px;margin-bottom:8px}
section.decide button{font-size:14px;padding:5px 12px;border-radius:6px;border:1px solid var(--line);background:#fafafa;cursor:pointer}
section.decide button.accept{border-color:#5cb27e}
section.decide button.reject{border-color:#d0685f}
section.decide button.needs_label{border-color:#d9a531}
section.decide label{display:block;margin:4px 0}
section.decide textarea{width:100%;max-width:700px;font:inherit;vertical-align:top}
kbd{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:11px;border:1px solid #bbb;border-radius:3px;padding:0 4px;background:#fff}
#history{font-size:13px;margin:4px 0 0;padding-left:22px}
.note-text{white-space:pre-wrap;overflow-wrap:anywhere}
.slicer{display:flex;gap:18px;align-items:center;margin:6px 0 10px}
.slicer input[type=range]{width:300px}
.views{display:flex;flex-wrap:wrap;gap:12px}
figure.view{margin:0;width:min-content}
figure.view img{display:block;image-rendering:pixelated;border:1px solid var(--line);border-radius:4px;min-width:256px;min-height:64px}
figure.view figcaption{font-size:12px;overflow-wrap:anywhere;margin-top:3px}
span.run{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
"""

SCRIPT = r"""
"use strict";
(function () {
  const body = document.body;
  const token = document.querySelector('meta[name="csrf-token"]').content;
  const typing = (e) => e.target && (e.target.tagName === "INPUT" || e.target.tagName === "TEXTAREA" || e.target.tagName === "SELECT");
  const modified = (e) => e.ctrlKey || e.metaKey || e.altKey;

  if (body.dataset.page === "queue") {
    const form = document.getElementById("filters");
    form.querySelectorAll("select").forEach((s) => s.addEventListener("change", () => form.submit()));
    document.addEventListener("keydown", (e) => {
      if (typing(e) || modified(e)) return;
      if (e.key === "n" && body.dataset.next) { window.location.href = body.dataset.next; }
    });
    return;
  }
  if (body.dataset.page !== "case") return;

  const words = {accept: "accepted", reject: "rejected", needs_label: "needs a label"};
  const keys = {a: "accept", r: "reject", l: "needs_label"};
  const reviewer = document.getElementById("reviewer");
  const note = document.getElementById("note");
  const status = document.getElementById("save-status");
  try { reviewer.value = window.localStorage.getItem("segability-reviewer") || ""; } catch (err) { /* storage off */ }
  reviewer.addEventListener("change", () => {
    try { window.localStorage.setItem("segability-reviewer", reviewer.value); } catch (err) { /* storage off */ }
  });

  function badge(decision) {
    const span = document.createElement("span");
    span.className = "badge " + decision;
    span.dataset.decision = decision;
    span.textContent = words[decision];
    return span;
  }

  let pending = null;
  async function decide(decision) {
    if (pending) await pending.catch(() => null);
    status.textContent = "saving…";
    pending = fetch("/api/decide", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": token},
      body: JSON.stringify({image: body.dataset.image, decision: decision, note: note.value, reviewer: reviewer.value}),
      credentials: "same-origin",
    }).then(async (r) => {
      const answer = await r.json().catch(() => ({}));
      if (!r.ok) throw new Error(answer.error || ("HTTP " + r.status));
      return answer;
    });
    try {
      const saved = await pending;
      const holder = document.getElementById("current-decision");
      holder.replaceChildren(badge(saved.decision));
      const li = document.createElement("li");
      const when = document.createElement("span");
      when.className = "muted"; when.textContent = " " + saved.decided_at + " ";
      const who = document.createElement("span");
      who.className = "who"; who.textContent = saved.reviewer;
      li.append(badge(saved.decision), when, who);
      if (saved.note) { const n = document.createElement("div"); n.className = "note-text"; n.textContent = saved.note; li.append(n); }
      document.getElementById("history").prepend(li);
      status.textContent = "saved (" + words[saved.decision] + ")";
      body.dataset.saved = String(saved.id);
    } catch (err) {
      status.textContent = "not saved: " + err.message;
    }
  }

  document.querySelectorAll("button.decide").forEach((b) => b.addEventListener("click", () => decide(b.dataset.decision)));
  const next = () => { if (body.dataset.next) window.location.href = body.dataset.next; };
  document.getElementById("go-next").addEventListener("click", next);
  document.addEventListener("keydown", (e) => {
    if (typing(e) || modified(e)) return;
    if (keys[e.key]) { e.preventDefault(); decide(keys[e.key]); }
    else if (e.key === "n") { e.preventDefault(); next(); }
    else if (e.key === "p" && body.dataset.prev) { window.location.href = body.dataset.prev; }
  });

  const slider = document.getElementById("slice");
  const axis = document.getElementById("axis");
  if (slider && axis) {
    const output = document.getElementById("slice-value");
    const redraw = () => {
      output.textContent = (Number(slider.value) + 1) + " / " + (Number(slider.max) + 1);
      document.querySelectorAll("img.view").forEach((img) => {
        const url = new URL(img.getAttribute("src"), window.location.href);
        url.searchParams.set("axis", axis.value);
        url.searchParams.set("slice", slider.value);
        img.src = url.pathname + url.search;
      });
    };
    slider.addEventListener("input", redraw);
    axis.addEventListener("change", () => {
      const option = axis.options[axis.selectedIndex];
      slider.max = Number(option.dataset.depth) - 1;
      slider.value = option.dataset.default;
      redraw();
    });
  }
})();
"""
