"""``/docs`` and ``/redoc`` work without internet (issue 18): each page, rendered in
headless Chromium that can reach loopback and nothing else, shows every operation of
the OpenAPI document. With FastAPI's defaults they are blank pages there: their
scripts come from a CDN.

The app is ``make_router`` served by uvicorn in a thread (no Ray), at the root and
under a route prefix, as Serve mounts it (``root_path``). The pages and their assets
stay behind the API key.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests
import uvicorn
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import ASGIApp

from serve_app.http import ApiKey
from serve_app.router import DOCS_ASSETS, make_router
from stageline.outputs import OutputContract
from stageline.service import ChainRunner, ScoringService
from stageline.spec import PipelineSpec
from tests.support.processes import spawned

pytestmark = pytest.mark.e2e

TIMEOUT = 30.0
KEY_ENV = "STAGELINE_TEST_DOCS_KEY"
API_KEY = "docs-s3cret-key-5b1f"
PREFIX = "/fraud"
"""A route prefix, as Serve mounts an app under one."""
PAGES = {"docs": "opblock-summary-method", "redoc": "http-verb"}
"""Each docs page, and the class of the element that shows an operation's method."""
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "chromium is not installed (apt-get install chromium; scripts/test does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def router(spec: PipelineSpec) -> FastAPI:
    """The app of ``spec`` with no stages behind it: the pages need no model."""
    service = ScoringService(spec, ChainRunner([], OutputContract(spec)))
    return make_router(service, ApiKey(KEY_ENV))


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + TIMEOUT
        while not server.started:
            assert thread.is_alive(), "uvicorn stopped before it served"
            assert time.monotonic() < deadline, f"uvicorn did not start in {TIMEOUT:g} s"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def render(chromium: str, url: str, folder: Path) -> str:
    """The DOM of ``url`` once its scripts have run, in a browser that reaches nothing
    but loopback: every other request goes to a proxy that is not there."""
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={folder / 'profile'}",
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=127.0.0.1",
        "--dump-dom",
        "--virtual-time-budget=10000",
        url,
    ]
    dom, log = folder / "dom.html", folder / "chromium.log"
    with spawned(argv, dom, dict(os.environ), stderr_log=log, grace_s=5) as browser:
        code = browser.wait(timeout=120)
    assert code == 0, f"chromium exited with {code}: {log.read_text()[-2000:]}"
    return dom.read_text()


class Operations(HTMLParser):
    """``(METHOD, path)`` of each operation a rendered page shows: the text of an
    element of class ``marker``, then the path (Swagger UI's ``data-path``, or the
    next text that starts with ``/``)."""

    def __init__(self, marker: str) -> None:
        super().__init__()
        self.marker = marker
        self.shown: set[tuple[str, str]] = set()
        self._in_marker = False
        self._method: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if self.marker in (found.get("class") or "").split():
            self._in_marker = True
        elif (found.get("data-path") or "").startswith("/"):
            self._path(str(found["data-path"]))

    def handle_data(self, data: str) -> None:
        text = data.strip()
        if self._in_marker and text:
            self._method, self._in_marker = text.upper(), False
        elif text.startswith("/"):
            self._path(text)

    def _path(self, path: str) -> None:
        if self._method is not None:
            self.shown.add((self._method, path))
            self._method = None


@pytest.mark.parametrize("prefix", ["", PREFIX], ids=["root", "route-prefix"])
@pytest.mark.parametrize("page", list(PAGES))
def test_docs_page_shows_every_operation_offline(
    chromium: str, fraud_spec: PipelineSpec, tmp_path: Path, page: str, prefix: str
) -> None:
    app = router(fraud_spec)
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    assert {("POST", "/predict"), ("POST", "/v2/models/{name}/infer")} <= documented
    served: ASGIApp = Starlette(routes=[Mount(prefix, app)]) if prefix else app
    with serving(served) as url:
        dom = render(chromium, f"{url}{prefix}/{page}", tmp_path)
    parser = Operations(PAGES[page])
    parser.feed(dom)
    print(f"/{page} at {prefix or '/'}: {len(parser.shown)} operations shown, offline")
    missing = sorted(documented - parser.shown)
    assert parser.shown == documented, (
        f"/{page} does not show {missing} without internet: does it load its scripts from "
        f"the app ({DOCS_ASSETS}) rather than a CDN? {dom[:2000]}"
    )


@pytest.mark.parametrize("path", ["/docs", "/redoc", *(f"{DOCS_ASSETS}/{name}" for name in ASSETS)])
def test_docs_and_their_assets_are_behind_the_api_key(
    fraud_spec: PipelineSpec, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    with serving(router(fraud_spec)) as url:
        refused = requests.get(url + path, timeout=TIMEOUT)
        served = requests.get(url + path, headers={"X-API-Key": API_KEY}, timeout=TIMEOUT)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "unauthorized"
    assert served.status_code == 200, served.text
    assert len(served.content) > 0
