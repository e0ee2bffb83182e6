"""The review web application: routes over one run folder (Starlette; served by uvicorn).

Routes:

- ``GET /`` the queue (filters as query parameters); ``GET /case?image=ID`` one case;
- ``GET /png?image=ID&panel=...&layer=...&axis=...&slice=...`` a picture of a kept case;
- ``POST /api/decide`` a decision, JSON ``{image, decision, note, reviewer}``;
- ``GET /files/report.html`` the run's report, the only file of the folder served;
- ``GET /static/review.js``, ``/static/review.css``.

Safety, for an app that serves a folder on the operator's machine:

- bound to 127.0.0.1 unless asked otherwise; on a loopback address the ``Host`` header must name
  a loopback host too (a page on another site cannot reach the app by re-pointing its own name);
- an image id, layer or panel is looked up among the run's own, never used as a path; anything
  else is 404, a malformed number 400; no file but ``report.html`` is served, and only when it is
  a regular file inside the run folder;
- every POST carries the token embedded in the page (``X-CSRF-Token``), is JSON, and, when the
  browser says where it comes from (``Origin``), comes from the app itself; a form posted from
  another site has none of these;
- the Content-Security-Policy allows this app's own script, style and pictures only.
"""

from __future__ import annotations

import functools
import hmac
import ipaddress
import json
import os
from pathlib import Path
from typing import Any

from segability.review.pages import CSS, SCRIPT, case_page, queue_page
from segability.review.queue import Filters, ReviewRun
from segability.review.render import PANELS, case_png
from segability.review.store import DECISIONS, ReviewStore

__all__ = ["create_app", "is_loopback", "LOOPBACK_HOSTS", "MAX_BODY"]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
MAX_BODY = 64 * 1024  # bytes of a decision request
SERVED_FILES = ("report.html",)  # files of the run folder the app serves
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")  # fmt: skip
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine only.

    Example:
        >>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
        (True, True, False)
    """
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def create_app(run_dir: str | os.PathLike, *, host: str = "127.0.0.1") -> Any:
    """The review app of one run folder (a Starlette ASGI application).

    Args:
        run_dir: a folder ``segability analyze`` (and ``segability qc``) wrote.
        host: the address the app will be bound to; on a loopback address only requests whose
            ``Host`` header is a loopback host are answered.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run folder.

    Example:
        >>> import uvicorn  # doctest: +SKIP
        >>> uvicorn.run(create_app("runs/ct"), host="127.0.0.1", port=8765)  # doctest: +SKIP
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import (
        FileResponse,
        HTMLResponse,
        JSONResponse,
        PlainTextResponse,
        Response,
    )
    from starlette.routing import Route

    run = ReviewRun(run_dir)
    store = ReviewStore(run.run_dir)
    token = store.token

    def refuse(status: int, message: str) -> Response:
        return JSONResponse({"error": message}, status_code=status, headers=HEADERS)

    def html(text: str) -> HTMLResponse:
        return HTMLResponse(text, headers=HEADERS)

    def queue(request: Request) -> Response:
        filters = Filters.from_query(request.query_params)
        return html(queue_page(run, filters, store.current(), token=token))

    def case(request: Request) -> Response:
        image = request.query_params.get("image")
        if image not in run:
            return refuse(404, "no such case in this run")
        filters = Filters.from_query(request.query_params)
        return html(case_page(run, image, filters, store.current(), store.history(image), token=token))

    @functools.lru_cache(maxsize=1024)
    def picture(image: str, panel: str, layer: str | None, axis: int, slice_index: int | None) -> bytes:
        return case_png(run.maps[image], panel, layer=layer, axis=axis, slice_index=slice_index)

    def png(request: Request) -> Response:
        q = request.query_params
        image, panel, layer = q.get("image"), q.get("panel", "image"), q.get("layer")
        if image not in run or image not in run.maps or panel not in PANELS:
            return refuse(404, "no such picture in this run")
        if panel == "layer" and layer not in run.maps[image]["layers"]:
            return refuse(404, "no such layer map in this run")
        try:
            axis = int(q.get("axis", "2"))
            slice_index = int(q["slice"]) if q.get("slice") not in (None, "") else None
        except ValueError:
            return refuse(400, "axis and slice must be integers")
        try:
            data = picture(image, panel, layer if panel == "layer" else None, axis, slice_index)
        except KeyError:
            return refuse(404, "no such picture in this run")
        except ValueError as err:
            return refuse(400, str(err))
        return Response(data, media_type="image/png", headers={**HEADERS, "Cache-Control": "private, max-age=3600"})

    def files(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in SERVED_FILES:
            return refuse(404, "not served")
        path = (run.run_dir / name).resolve()
        if path.parent != run.run_dir or not path.is_file():
            return refuse(404, "not served")
        # the report carries its own Content-Security-Policy (its inline sorter is allowed by hash)
        return FileResponse(path, media_type="text/html", headers={"X-Content-Type-Options": "nosniff"})

    async def decide(request: Request) -> Response:
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), token.encode()):
            return refuse(403, "missing or wrong token: reload the page")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
            return refuse(403, "cross-origin request refused")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return refuse(415, "send JSON")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return refuse(413, "request too large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return refuse(400, "not JSON")
        if not isinstance(data, dict):
            return refuse(400, "send a JSON object")
        image, decision = data.get("image"), data.get("decision")
        if image not in run:
            return refuse(404, "no such case in this run")
        if decision not in DECISIONS:
            return refuse(400, f"decision must be one of {list(DECISIONS)}")
        note, reviewer = data.get("note", ""), data.get("reviewer", "")
        if not isinstance(note, str) or not isinstance(reviewer, str):
            return refuse(400, "note and reviewer must be strings")
        try:
            saved = await run_in_threadpool(store.decide, image, decision, note=note, reviewer=reviewer)
        except ValueError as err:
            return refuse(400, str(err))
        return JSONResponse(saved.__dict__, headers=HEADERS)

    def static(content: str, media_type: str):
        def endpoint(request: Request) -> Response:
            return PlainTextResponse(content, media_type=media_type, headers=HEADERS)

        return endpoint

    routes = [
        Route("/", queue),
        Route("/case", case),
        Route("/png", png),
        Route("/api/decide", decide, methods=["POST"]),
        Route("/files/{name:path}", files),
        Route("/static/review.js", static(SCRIPT, "text/javascript")),
        Route("/static/review.css", static(CSS, "text/css")),
        Route("/favicon.ico", lambda request: Response(status_code=204, headers=HEADERS)),  # none, and no 404 logged
    ]
    middleware = []
    if is_loopback(host):
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"]))
    app = Starlette(routes=routes, middleware=middleware)
    app.state.run = run
    app.state.store = store
    app.state.token = token
    app.state.run_dir = Path(run.run_dir)
    return app
