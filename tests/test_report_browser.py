"""The report in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

One report (with a malicious image id, layer name and settings value) is loaded once from a
``file://`` URL; the tests then read the page: console errors, decoded images, a table sorted by a
real mouse click on its header, no dialog opened. A full-page screenshot is saved to
``test-artifacts/report-screenshot.png``.

Without Chromium (or websocket-client) the tests skip, except under CI (``CI`` set) where they
fail: CI must run them.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from browser import DevTools
from browser import chromium as _chromium
from browser import page_errors as _errors
from browser import unavailable as _unavailable
from report_fixtures import MALICIOUS_IMAGE, MALICIOUS_LAYER, MALICIOUS_SETTING, write_result
from segability.report import build_report

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOT = ROOT / "test-artifacts" / "report-screenshot.png"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = write_result(
        tmp_path_factory.mktemp("browser") / "run",
        n_images=9,
        n_layers=8,
        names="encdec",
        keep_maps=3,
        malicious=True,
        findings=[
            "Mean SA against the prediction ranks the images as Dice does.",
            "Decoder layers segment better than encoder layers.",
        ],
    )
    build_report(root)
    return root


@pytest.fixture(scope="module")
def page(run_dir, tmp_path_factory):
    exe = _chromium()
    if exe is None:
        _unavailable("Chromium is not installed (apt-get install chromium)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        _unavailable("websocket-client is not installed (pip install -e '.[test]')")
    tools = DevTools(exe, tmp_path_factory.mktemp("chromium-profile"))
    try:
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable")
        tools.send(
            "Emulation.setDeviceMetricsOverride",
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )
        tools.send("Page.navigate", url=(run_dir / "report.html").resolve().as_uri())
        tools.wait_event("Page.loadEventFired")
        yield tools
    finally:
        tools.close()


def test_no_console_error_and_no_dialog(page):
    page.js("1 + 1")  # drain events that arrived with the load
    assert _errors(page.events) == []
    assert page.dialogs == []


def test_every_image_is_decoded(page, run_dir):
    sizes = page.js(
        "Promise.all(Array.from(document.images).map(i => i.decode().then("
        "() => [i.naturalWidth, i.naturalHeight], () => [0, 0])))",
        await_promise=True,
    )
    n_tags = (run_dir / "report.html").read_text(encoding="utf-8").count("<img ")
    assert len(sizes) == n_tags > 20
    assert all(w > 0 and h > 0 for w, h in sizes)


def _column(page, table: str, header: str) -> list[str]:
    return page.js(
        f"""(() => {{
        const t = document.getElementById({json.dumps(table)});
        const col = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent.trim().startsWith({json.dumps(header)}));
        return Array.from(t.tBodies[0].rows).map(r => {{
            const c = r.cells[col]; const v = c.getAttribute('data-sort'); return v === null ? c.textContent : v; }});
        }})()"""
    )


def _click_header(page, table: str, header: str) -> None:
    box = page.js(
        f"""(() => {{
        const t = document.getElementById({json.dumps(table)});
        const th = Array.from(t.tHead.rows[0].cells).find(c => c.textContent.trim().startsWith({json.dumps(header)}));
        th.scrollIntoView({{block: 'center', behavior: 'instant'}});
        const r = th.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];
        }})()"""
    )
    page.click(*box)


def test_quality_table_sorts_by_a_clicked_numeric_header(page, run_dir):
    expected = pd.read_parquet(run_dir / "images.parquet")["dice"].to_numpy(float)
    before = [float(v) for v in _column(page, "table-quality", "Dice")]
    assert sorted(before) == sorted(expected.tolist())
    assert before != sorted(before), "the fixture must start in another order than Dice's"
    _click_header(page, "table-quality", "Dice")
    ascending = [float(v) for v in _column(page, "table-quality", "Dice")]
    assert ascending == sorted(before)
    _click_header(page, "table-quality", "Dice")
    descending = [float(v) for v in _column(page, "table-quality", "Dice")]
    assert descending == sorted(before, reverse=True)
    assert page.js("document.querySelector('#table-quality th[aria-sort]').textContent").startswith(
        "Dice"
    )


def test_layer_table_sorts_text_naturally(page):
    _click_header(page, "table-layers", "layer")
    names = [s.strip() for s in _column(page, "table-layers", "layer")]
    # natural, case-insensitive order (as localeCompare numeric), checked by hand on a few pairs
    assert (
        names.index("decoder.0")
        < names.index("decoder.2")
        < names.index("down_1")
        < names.index("encoder.0")
    )
    assert names.index("input") < names.index(MALICIOUS_LAYER) < names.index("upcat_1")
    _click_header(page, "table-layers", "depth")
    depths = [int(float(v)) for v in _column(page, "table-layers", "depth")]
    assert depths == list(range(len(depths)))


def test_layer_maps_are_large_and_their_names_whole(page):
    """Every layer map is shown at >= 192 px on its long side, and no caption is clipped: the
    whole layer name is on the page (wrapped at dots), never cut with an ellipsis."""
    boxes = page.js(
        """Array.from(document.querySelectorAll('#maps figure.map')).map(f => {
            const img = f.querySelector('img'), name = f.querySelector('.name');
            return [img.getBoundingClientRect().width, img.getBoundingClientRect().height,
                    name.scrollWidth - name.clientWidth, name.title, name.textContent];
        })"""
    )
    assert len(boxes) == 3 * (3 + 8)
    for width, height, overflow, title, text in boxes:
        assert max(width, height) >= 192
        assert overflow <= 0
        assert text.strip().endswith(title)  # "<depth> <name>" or the panel's own name


def test_malicious_strings_show_as_text_and_run_nothing(page):
    text = page.js("document.body.innerText")
    for s in (MALICIOUS_IMAGE, MALICIOUS_LAYER, MALICIOUS_SETTING):
        assert s in text
    assert page.js("document.scripts.length") == 1
    assert (
        page.js("document.querySelectorAll('img:not([src^=\"data:image/png;base64,\"])').length")
        == 0
    )
    assert page.js("document.querySelectorAll('[onerror], [onmouseover], b').length") == 0
    assert page.js("document.title") == f"segability report: {MALICIOUS_SETTING}"
    assert page.dialogs == []


def test_screenshot(page):
    # the last test: it resizes the viewport to the whole page
    from PIL import Image

    height = min(int(page.js("document.documentElement.scrollHeight")), 16000)
    # a viewport as tall as the page: the sticky contents sit where a reader sees them
    page.send(
        "Emulation.setDeviceMetricsOverride",
        width=1280,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )
    page.js("window.scrollTo(0, 0)")
    shot = page.send(
        "Page.captureScreenshot",
        format="png",
        clip={"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
    )
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
    with Image.open(SCREENSHOT) as img:
        assert img.size == (1280, height)
        # not a blank page: the figures give it many distinct colours
        rgb = np.asarray(img.convert("RGB")).astype(np.uint32)
        assert np.unique((rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]).size > 500


def test_missing_browser_skips_locally_and_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        _unavailable("no Chromium")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        _unavailable("no Chromium")
