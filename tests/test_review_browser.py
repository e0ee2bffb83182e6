"""The review station in a real browser: Debian's headless Chromium over the DevTools protocol.

The app serves a run folder (tiny UNet, 32x32 images; a second one of 16^3 volumes) on 127.0.0.1;
the tests click and type as a person does: open the queue, open a case, decide with the keyboard,
reload and find the decision kept; decide in two tabs at once; move the slice slider of a 3D case.
Screenshots of the queue and of a case are saved in pytest's temporary folder (their paths are
printed). Without Chromium the tests skip, except under CI, where they fail.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd
import pytest

from browser import chromium, open_page, page_errors
from test_review import MALICIOUS_ID, Served, make_run

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("review-browser")
    return make_run(root / "run2d"), make_run(root / "run3d", dims=3, n=2, keep_maps=1)


@pytest.fixture(scope="module")
def servers(runs):
    started = [Served(r) for r in runs]
    yield started
    for s in started:
        s.stop()


@pytest.fixture(scope="module")
def tab(tmp_path_factory):
    tools = open_page(chromium(), tmp_path_factory.mktemp("chromium-profile"))
    yield tools
    tools.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _load(tab, url: str | None = None, action=None) -> None:
    """Navigate (or run ``action``, which navigates) and wait for the page's load event."""
    tab.events.clear()
    if url is not None:
        tab.send("Page.navigate", url=url)
    else:
        action()
    tab.wait_event("Page.loadEventFired")


def _until(tab, expression: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = tab.js(expression)
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"never true in the page: {expression}")


def _screenshot(tab, path: Path) -> Path:
    from PIL import Image

    height = min(int(tab.js("document.documentElement.scrollHeight")), 6000)
    shot = tab.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1})  # fmt: skip
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    with Image.open(path) as img:
        rgb = np.asarray(img.convert("RGB")).astype(np.uint32)
    assert np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]).size > 50  # not blank
    return path


def _decisions(run: Path) -> list[tuple[str, str]]:
    con = sqlite3.connect(run / "review.sqlite")
    try:
        return list(con.execute("SELECT image, decision FROM decisions ORDER BY id"))
    finally:
        con.close()


def _images_decoded(tab) -> list[list[int]]:
    return tab.js(
        "Promise.all(Array.from(document.querySelectorAll('img.view')).map(i => i.decode().then("
        "() => [i.naturalWidth, i.naturalHeight], () => [0, 0])))",
        await_promise=True,
    )


def test_queue_case_keyboard_decision_and_reload(tab, servers, runs, shots):
    server, run = servers[0], runs[0]
    _load(tab, server.url + "/")
    queue = pd.read_csv(run / "qc.csv").sort_values("estimated_dice")["image"].tolist()
    shown = tab.js("Array.from(document.querySelectorAll('#queue tbody tr')).map(r => r.dataset.image)")
    assert shown == queue
    assert MALICIOUS_ID in tab.js("document.body.innerText")
    _screenshot(tab, shots / "review-queue.png")

    box = tab.js("(() => { const r = document.querySelector('#queue a.case-link').getBoundingClientRect();"
                 " return [r.x + r.width / 2, r.y + r.height / 2]; })()")  # fmt: skip
    _load(tab, action=lambda: tab.click(*box))
    assert tab.js("document.getElementById('image-id').textContent") == queue[0]
    tab.key("r")
    _until(tab, "document.body.dataset.saved")
    assert tab.js("document.querySelector('#current-decision [data-decision]').dataset.decision") == "reject"

    _load(tab, action=lambda: tab.send("Page.reload", ignoreCache=True))
    assert tab.js("document.querySelector('#current-decision [data-decision]').dataset.decision") == "reject"
    assert (queue[0], "reject") in _decisions(run)

    _load(tab, action=lambda: tab.key("n"))
    assert tab.js("document.getElementById('image-id').textContent") == queue[1]

    _load(tab, server.url + "/case?" + urlencode({"image": "case_00"}))
    sizes = _images_decoded(tab)
    assert len(sizes) == 3 + 3 and all(w >= 256 for w, _ in sizes)  # image, prediction, label, 3 layers
    _screenshot(tab, shots / "review-case.png")

    _load(tab, server.url + "/case?" + urlencode({"image": MALICIOUS_ID}))
    assert tab.js("document.getElementById('image-id').textContent") == MALICIOUS_ID
    tab.key("l")
    _until(tab, "document.body.dataset.saved")
    assert (MALICIOUS_ID, "needs_label") in _decisions(run)
    assert tab.dialogs == [] and page_errors(tab.events) == []


def test_two_tabs_deciding_at_once_both_persist(tab, servers, runs):
    server, run = servers[0], runs[0]
    other = tab.new_tab()
    try:
        for domain in ("Page", "Runtime"):
            other.send(f"{domain}.enable")
        _load(tab, server.url + "/case?image=case_03")
        _load(other, server.url + "/case?image=case_04")
        # both requests are in flight together: each tab's key handler starts its fetch and returns
        tab.js("document.getElementById('note').value = 'first tab'")
        other.js("document.getElementById('note').value = 'second tab'")
        tab.key("a")
        other.key("a")
        _until(tab, "document.body.dataset.saved")
        _until(other, "document.body.dataset.saved")
    finally:
        other.close()
        tab.send("Page.bringToFront")
    stored = _decisions(run)
    assert ("case_03", "accept") in stored and ("case_04", "accept") in stored
    con = sqlite3.connect(run / "review.sqlite")
    try:
        notes = dict(con.execute("SELECT image, note FROM decisions WHERE image IN ('case_03', 'case_04')"))
    finally:
        con.close()
    assert notes == {"case_03": "first tab", "case_04": "second tab"}


def test_slice_slider_changes_the_shown_slice(tab, servers, shots):
    server = servers[1]
    _load(tab, server.url + "/case?image=case_00")
    before = tab.js("Array.from(document.querySelectorAll('img.view')).map(i => i.src)")
    start = int(tab.js("document.getElementById('slice').value"))
    tab.js("document.getElementById('slice').focus()")
    key = "ArrowLeft" if start > 0 else "ArrowRight"
    code = 37 if key == "ArrowLeft" else 39
    for kind in ("keyDown", "keyUp"):
        tab.send("Input.dispatchKeyEvent", type=kind, key=key, code=key, windowsVirtualKeyCode=code)
    moved = start - 1 if key == "ArrowLeft" else start + 1
    _until(tab, f"document.getElementById('slice').value === '{moved}'")
    after = tab.js("Array.from(document.querySelectorAll('img.view')).map(i => i.src)")
    assert all(f"slice={moved}" in src for src in after) and all(f"slice={start}" in src for src in before)
    assert tab.js("document.getElementById('slice-value').textContent") == f"{moved + 1} / 16"
    assert all(w > 0 for w, _ in _images_decoded(tab))
    pixels = tab.js(
        f"Promise.all([{json.dumps(before[2])}, {json.dumps(after[2])}].map(u => fetch(u).then(r => r.arrayBuffer())"
        ".then(b => Array.from(new Uint8Array(b)).join(','))))",
        await_promise=True,
    )
    assert pixels[0] != pixels[1]  # the label panel shows another slice
    tab.js("const a = document.getElementById('axis'); a.value = '0'; a.dispatchEvent(new Event('change'))")
    assert all("axis=0" in src for src in tab.js("Array.from(document.querySelectorAll('img.view')).map(i => i.src)"))
    _screenshot(tab, shots / "review-case-3d.png")
    assert page_errors(tab.events) == []
