"""Headless Chromium for the browser tests, driven over the DevTools protocol.

:class:`DevTools` starts Debian's Chromium (``--headless --no-sandbox --disable-gpu
--disable-background-networking``, a profile of its own, DevTools on 127.0.0.1) and speaks to its
one page: commands answered in order, events kept, dialogs recorded and dismissed.
:func:`chromium` finds the browser; :func:`unavailable` skips a test without it, except under CI
(``CI`` set), where it fails: CI must run the browser tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

__all__ = ["DevTools", "FLAGS", "chromium", "unavailable", "open_page", "page_errors"]

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
]


def unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: the browser tests must run)")
    pytest.skip(reason)


def chromium() -> str | None:
    return (
        os.environ.get("SEGABILITY_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
    )


class DevTools:
    """A minimal DevTools-protocol client: one page, commands answered in order, events kept."""

    def __init__(self, executable: str, profile: Path, timeout: float = 20.0):
        import websocket

        self.events: list[dict] = []
        self.dialogs: list[dict] = []
        self._id = 0
        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        self.port, self.timeout, self.owner = port, timeout, True
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({})
        )  # localhost, never a proxy
        pages = []
        while not pages:
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=timeout) as r:
                pages = [t for t in json.load(r) if t.get("type") == "page"]
            if not pages:
                if time.monotonic() > deadline:
                    self.close()
                    raise RuntimeError("Chromium opened no page")
                time.sleep(0.05)
        self.ws = websocket.create_connection(
            pages[0]["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
        )

    def send(self, method: str, timeout: float = 20.0, **params) -> dict:
        """Send a command and wait for its answer; events that arrive meanwhile are kept."""
        self._id += 1
        mine = self._id
        self.ws.send(json.dumps({"id": mine, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if msg.get("id") == mine:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def wait_event(self, method: str, timeout: float = 20.0) -> dict:
        """Wait for an event (or return one already received)."""
        for ev in self.events:
            if ev["method"] == method:
                return ev
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if msg.get("method") == method:
                return msg

    def _recv(self, deadline: float) -> dict:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no answer from Chromium")
        self.ws.settimeout(remaining)
        msg = json.loads(self.ws.recv())
        if "method" in msg:
            self.events.append(msg)
            if msg["method"] == "Page.javascriptDialogOpening":
                # a dialog blocks the page: record it, dismiss it, answer comes later (ignored)
                self.dialogs.append(msg["params"])
                self._id += 1
                self.ws.send(
                    json.dumps(
                        {
                            "id": self._id,
                            "method": "Page.handleJavaScriptDialog",
                            "params": {"accept": False},
                        }
                    )
                )
        return msg

    def js(self, expression: str, await_promise: bool = False):
        """Evaluate JavaScript in the page and return its value."""
        res = self.send(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=await_promise,
        )
        if "exceptionDetails" in res:
            raise RuntimeError(f"JS error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def click(self, x: float, y: float) -> None:
        """A real left click (pressed + released) at page viewport coordinates."""
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def new_tab(self) -> DevTools:
        """A second tab of the same browser, with a connection of its own (closed by its
        :meth:`close`; the browser ends with the first tab's)."""
        import websocket

        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        tab = object.__new__(DevTools)
        tab.events, tab.dialogs, tab._id = [], [], 0
        tab.proc, tab.port, tab.timeout, tab.owner = self.proc, self.port, self.timeout, False
        tab.target = target
        tab.ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/devtools/page/{target}", timeout=self.timeout, suppress_origin=True
        )
        return tab

    def key(self, key: str) -> None:
        """Press and release a printable key, as a person does (keydown with its text, keyup)."""
        self.send("Input.dispatchKeyEvent", type="keyDown", key=key, text=key, unmodifiedText=key)
        self.send("Input.dispatchKeyEvent", type="keyUp", key=key)

    def close(self) -> None:
        """Close the connection and end the browser process started here."""
        ws = getattr(self, "ws", None)
        if not getattr(self, "owner", True):  # a tab of another's browser: close the tab only
            if ws is not None:
                try:
                    self.send("Page.close", timeout=5)
                finally:
                    ws.close()
            return
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def open_page(executable: str | None, profile: Path, width: int = 1280, height: int = 900) -> DevTools:
    """A started browser with the Page, Runtime and Log domains on and a fixed viewport
    (skips, or fails under CI, without Chromium or websocket-client)."""
    if executable is None:
        unavailable("Chromium is not installed (apt-get install chromium)")
    try:
        import websocket  # noqa: F401
    except ImportError:
        unavailable("websocket-client is not installed (pip install -e '.[test]')")
    tools = DevTools(executable, profile)
    try:
        for domain in ("Page", "Runtime", "Log"):
            tools.send(f"{domain}.enable")
        tools.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
    except BaseException:
        tools.close()
        raise
    return tools


def page_errors(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions and error log entries among the events."""
    out = []
    for ev in events:
        m, p = ev["method"], ev.get("params", {})
        if m == "Runtime.exceptionThrown":
            out.append(str(p.get("exceptionDetails")))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append(str(p.get("args")))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            out.append(p["entry"].get("text", ""))
    return out
