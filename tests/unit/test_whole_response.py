"""A replica's HTTP server sends each response in one write (``send_each_response_whole``),
so a replica killed mid-answer leaves HAProxy either the whole response or none of it
(which HAProxy retries on another replica), never headers without their body.

uvicorn as Serve runs it in a replica, on a loopback socket, read by a raw client."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from serve_app.ray_internals import send_each_response_whole

BODY = b'{"score": 0.5}'


async def slow_body(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Headers, then the body after a pause: the gap in which a replica can die."""
    if scope["type"] != "http":
        return
    await receive()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(BODY))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await asyncio.sleep(0.3)
    if scope["path"] == "/fails":
        raise RuntimeError("the app failed after its headers")
    await send({"type": "http.response.body", "body": BODY})


@pytest.fixture(params=["httptools", "h11"])
def server(request: pytest.FixtureRequest) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)  # a client may connect before the server runs: it waits in the backlog
    config = uvicorn.Config(
        slow_body, http=request.param, lifespan="off", log_level="critical", access_log=False
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def first_read(port: int, path: str) -> tuple[bytes, bytes]:
    """What the first read of the answer to ``GET path`` returns, and all of it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode())
        first = client.recv(65536)
        rest = b""
        while chunk := client.recv(65536):
            rest += chunk
        return first, first + rest


def test_the_headers_and_the_body_arrive_in_one_piece(server: int) -> None:
    send_each_response_whole()
    first, whole = first_read(server, "/")
    assert first.startswith(b"HTTP/1.1 200"), first
    assert first.endswith(b"\r\n\r\n" + BODY), f"the first read was {first!r}, not the whole answer"
    assert whole == first


def test_an_app_that_fails_after_its_headers_sends_nothing(server: int) -> None:
    """HAProxy retries a request whose connection closed with no answer at all; it could
    not retry one whose headers it had passed on."""
    send_each_response_whole()
    first, whole = first_read(server, "/fails")
    assert (first, whole) == (b"", b"")
