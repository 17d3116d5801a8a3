"""HAProxy's own errors, and a replica's plain-text 503, in our JSON shape; a request
whose replica dies under it tried again on another one.

The real HAProxy, started through ``stageline serve``'s wrapper on the config Ray Serve
writes (Ray's own template, rendered by Ray's code), in front of stand-in replicas on
loopback: one that sheds load as a Serve replica does (plain text), one that dies with
the request, one that answers late, one that answers."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import requests

from serve_app.local import HAPROXY_REQUEST_TIMEOUT_S, serve_env
from tests.conftest import free_port
from tests.support.processes import spawned

pytestmark = pytest.mark.e2e

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


def answer(status: int, body: bytes, content_type: str) -> Handler:
    def handle(h: http.server.BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        h.send_header("content-type", content_type)
        h.send_header("content-length", str(len(body)))
        if status == 503:
            h.send_header("retry-after", "1")
        h.end_headers()
        h.wfile.write(body)

    return handle


def die(h: http.server.BaseHTTPRequestHandler) -> None:
    """What HAProxy sees of a replica killed with the request on it: the connection
    closes, and no answer came."""
    h.close_connection = True
    h.connection.shutdown(socket.SHUT_RDWR)


def late(h: http.server.BaseHTTPRequestHandler) -> None:
    time.sleep(3)
    answer(200, b"{}", "application/json")(h)


OK = answer(200, b'{"predictions":[]}', "application/json")
# What a Serve replica answers over its queue limit (replica.py, direct ingress).
SHED = answer(503, b"Request dropped due to backpressure", "text/plain; charset=utf-8")


class Replica:
    """A stand-in Serve replica on loopback: ``/-/healthz`` is 200 (HAProxy's check);
    a POST is handled by ``handle``; ``posts`` counts them."""

    def __init__(self, handle: Handler) -> None:
        replica = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                answer(200, b"success", "text/plain")(self)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                replica.posts += 1
                with contextlib.suppress(ConnectionError):  # HAProxy gave up on it
                    handle(self)

            def log_message(self, *args: object) -> None:
                pass

        self.posts = 0
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


REPLICAS: dict[str, Replica] = {}
BACKENDS: dict[str, list[Handler | None]] = {
    "busy": [SHED],  # Serve's own queue limit
    "flaky": [die, OK],  # one replica dies under every request; the other answers
    "gone": [die, die],  # every replica dies under the request
    "down": [None],  # nothing listens
    "slow": [late],  # no answer within HAProxy's server timeout
}


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """HAProxy, started through the wrapper on the config Ray writes for these apps."""
    from ray.serve._private.haproxy import (
        BackendConfig,
        HAProxyApi,
        HAProxyConfig,
        ServerConfig,
    )
    from ray.serve.config import HTTPOptions

    tmp = tmp_path_factory.mktemp("haproxy")
    env = {**os.environ, **serve_env(tmp / "run")}
    port = free_port()
    backends = {}
    for app, handlers in BACKENDS.items():
        servers = []
        for i, handle in enumerate(handlers):
            if handle is None:
                replica_port = free_port()
            else:
                REPLICAS[f"{app}-{i}"] = replica = Replica(handle)
                replica_port = replica.port
            servers.append(
                ServerConfig(f"SERVE_REPLICA_{app}-ingress-{i}", "127.0.0.1", replica_port)
            )
        backends[app] = BackendConfig(
            name=f"http-{app}",
            path_prefix=f"/{app}",
            servers=servers,
            app_name=app,
            ingress_deployment_name="ingress",
            timeout_server_s=1 if app == "slow" else None,
        )
    config = HAProxyConfig(
        socket_path=str(tmp / "admin.sock"),
        server_state_base=str(tmp),
        server_state_file=str(tmp / "server-state"),
        http_options=HTTPOptions(host="127.0.0.1", port=port),
        metrics_enabled=False,
        has_received_routes=True,
        has_received_servers=True,
        retry_on=env["RAY_SERVE_HAPROXY_RETRY_ON"],
        retries=int(env["RAY_SERVE_HAPROXY_RETRIES"]),
    )
    api = HAProxyApi(config, backends, config_file_path=str(tmp / "haproxy.cfg"))
    api._generate_config_file_internal()
    config_file = tmp / "haproxy.cfg"
    # HAProxy restarts on a config the wrapper rewrote already: it is rewritten once.
    wrapper = env["RAY_SERVE_HAPROXY_BINARY_PATH"]
    check = subprocess.run([wrapper, "-c", "-f", str(config_file)], env=env, capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    argv = [wrapper, "-db", "-f", str(config_file)]
    with spawned(argv, tmp / "haproxy.log", env, grace_s=5) as process:
        deadline = time.monotonic() + 30
        while not _listening(port):
            assert process.poll() is None, (tmp / "haproxy.log").read_text()
            assert time.monotonic() < deadline, (tmp / "haproxy.log").read_text()
            time.sleep(0.1)
        lines = config_file.read_text().splitlines()
        assert sum(line.strip().startswith("# stageline: added") for line in lines) == 2
        assert not any(line.strip().startswith("errorfile") for line in lines)
        yield f"http://127.0.0.1:{port}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def post(url: str, request_id: str | None = None) -> requests.Response:
    headers = {} if request_id is None else {"X-Request-ID": request_id}
    return requests.post(url, json={"records": [{}]}, headers=headers, timeout=30)


def assert_error(resp: requests.Response, status: int, code: str) -> dict[str, object]:
    """Our error shape, with the request id of the response header."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json", resp.headers
    body = resp.json()
    assert set(body) == {"error", "request_id"}, body
    assert body["error"]["status"] == status, body
    assert body["error"]["code"] == code, body
    assert body["request_id"], body
    assert body["request_id"] == resp.headers["x-request-id"], body
    if status == 503:
        assert resp.headers["retry-after"] == "1", resp.headers
    return dict(body["error"])


@pytest.mark.parametrize(
    ("app", "status", "code", "message"),
    [
        ("busy", 503, "unavailable", "the service is at capacity; retry shortly"),
        ("gone", 503, "unavailable", "a replica failed under the request; retry shortly"),
        ("down", 503, "unavailable", "no replica could take the request; retry shortly"),
        ("slow", 504, "deadline_exceeded", "no answer in time; retry later"),
    ],
)
def test_every_error_is_our_json_with_the_request_id(
    haproxy: str, app: str, status: int, code: str, message: str
) -> None:
    """A replica shedding load (Serve's plain text), replicas dying under the request
    (HAProxy's 502 after its retries), no replica to connect to (its 503) and no answer
    in time (its 504): each is our JSON, a 503 with Retry-After, and the body names the
    request id the client sent (one HAProxy made when it sent none)."""
    error = assert_error(post(f"{haproxy}/{app}/predict", request_id='id "1"'), status, code)
    assert error["message"] == message
    assert post(f"{haproxy}/{app}/predict", request_id='id "1"').json()["request_id"] == 'id "1"'
    made = post(f"{haproxy}/{app}/predict")
    assert_error(made, status, code)


def test_a_request_whose_replica_dies_is_answered_by_another(haproxy: str) -> None:
    """One of two replicas closes every connection with the request on it, as a killed
    replica does: HAProxy sends the request again to the other, and every client gets
    its answer, unchanged."""
    answers = [post(f"{haproxy}/flaky/predict") for _ in range(20)]
    assert [r.status_code for r in answers] == [200] * 20, [r.text for r in answers]
    assert all(r.json() == {"predictions": []} for r in answers)


def test_a_request_that_trickles_in_is_our_408_and_never_reaches_a_replica(
    haproxy: str,
) -> None:
    """HAProxy reads a request whole before it sends it on (so it can send it again): a
    client whose body stops halfway gets our 408 after HAProxy's request timeout, as
    the ingress itself would answer it, and no replica ever held it."""
    port = int(haproxy.rsplit(":", 1)[1])
    before = sum(r.posts for r in REPLICAS.values())
    with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
        started = time.monotonic()
        client.sendall(
            b"POST /flaky/predict HTTP/1.1\r\nHost: x\r\nX-Request-ID: slow-1\r\n"
            b'Content-Type: application/json\r\nContent-Length: 40\r\n\r\n{"records": ['
        )
        raw = b""
        while chunk := client.recv(4096):
            raw += chunk
        took = time.monotonic() - started
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), raw
    error = json.loads(body)
    assert error["error"]["code"] == "request_timeout", error
    assert error["request_id"] == "slow-1", error
    assert HAPROXY_REQUEST_TIMEOUT_S - 0.5 < took < HAPROXY_REQUEST_TIMEOUT_S + 5, took
    assert sum(r.posts for r in REPLICAS.values()) == before


def test_rays_template_still_has_what_the_wrapper_rewrites() -> None:
    """The wrapper edits Serve's HAProxy config by these lines (Ray 2.60's template):
    when Ray changes them, this test names what moved."""
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE as TEMPLATE

    lines = [line.strip() for line in TEMPLATE.splitlines()]
    assert "defaults" in lines
    assert "frontend http_frontend" in lines
    for status in (502, 503, 504):
        assert f"errorfile {status} {{{{ config.error_file_path }}}}" in lines
    assert "balance {{ config.balance_algorithm }}" in lines
    assert "bind :{{ config.metrics_port }}" in lines
    assert "bind *:{{ config.stats_port }}" in lines
    assert any(line.startswith("server {{ server.name }}") for line in lines)
