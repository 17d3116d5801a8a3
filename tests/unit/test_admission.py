"""The ingress's own limit: a request over it is our JSON 503 at once, never Serve's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from serve_app.http import AdmissionMiddleware, Message, Receive, Scope, Send

LIMIT = 3


def scope(path: str, request_id: str = "rid-1") -> Scope:
    headers = [(b"x-request-id", request_id.encode())]
    return {"type": "http", "method": "POST", "path": path, "headers": headers}


async def call(app: AdmissionMiddleware, path: str, **kw: str) -> tuple[int, dict[str, str], Any]:
    """``path`` through ``app``: (status, headers, JSON body or None)."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope(path, **kw), receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, json.loads(body) if body else None


def test_a_request_over_the_limit_is_our_503_and_a_freed_slot_serves_again() -> None:
    release = asyncio.Event()

    async def slow(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/predict":
            await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario() -> None:
        app = AdmissionMiddleware(slow, limit=LIMIT)
        held = [asyncio.create_task(call(app, "/predict")) for _ in range(LIMIT)]
        await asyncio.sleep(0)
        assert app.in_flight == LIMIT

        status, headers, body = await call(app, "/predict", request_id="over")
        assert status == 503
        assert headers["retry-after"] == "1"
        assert body == {
            "error": {
                "status": 503,
                "code": "unavailable",
                "message": "the service is at capacity; retry shortly",
            },
            "request_id": "over",
        }
        # A probe is answered at capacity: a busy replica is not a dead one.
        assert (await call(app, "/readyz"))[0] == 200

        release.set()
        assert [r[0] for r in await asyncio.gather(*held)] == [200] * LIMIT
        assert app.in_flight == 0
        assert (await call(app, "/predict"))[0] == 200

    asyncio.run(scenario())
