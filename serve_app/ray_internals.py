"""Every place the online app depends on Ray Serve's internals, labelled.

Ray offers no supported way to do these; each is a bet on how Ray 2.60 works inside,
and the reason ``ray`` is pinned below 2.61. ``tests/integration/test_ray_internals.py``
checks each against the installed Ray and, when one breaks, names it (the sixth,
against the installed uvicorn: ``tests/unit/test_whole_response.py``):

1. :func:`keep_grpc_on_loopback`: a patch of ``ray.serve._private.replica``.
2. :func:`versioned`: the private ``_internal`` flag that lets an application set a
   deployment's ``version``.
3. :func:`by_reference`: the private ``_by_reference`` handle option.
4. :data:`SETTINGS` and :func:`haproxy_settings`: settings Ray reads from its
   environment (``ray/serve/_private/constants.py``) and documents nowhere.
5. :data:`HAPROXY_WRAPPER`: a script that edits the HAProxy config Ray generates
   (``ray/serve/_private/haproxy_templates.py``), relying on lines of that template.
6. :func:`send_each_response_whole`: a patch of uvicorn's request cycle, the HTTP
   server Serve runs in a replica for HAProxy.

Everything else in ``serve_app`` uses Ray's public API only.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from stageline.localray import LOOPBACK_ENV

T = TypeVar("T")

# -- 1. The replicas' gRPC server ----------------------------------------------------------

GRPC_BIND = "ray.serve._private.replica.add_port_to_grpc_server"
"""What :func:`keep_grpc_on_loopback` patches."""


def keep_grpc_on_loopback() -> None:
    """In loopback mode (``stageline serve``, tests: :data:`LOOPBACK_ENV`), bind this
    replica's gRPC server for calls between deployments to 127.0.0.1.

    Every Ray Serve 2.60 replica opens it on ``[::]:0``: every interface, no
    authentication, no setting to change it. In a multi-node cluster it is left as Ray
    made it (other nodes need it; see the README). Called by every deployment's
    constructor, in the replica's process, before Serve starts the server."""
    if any(os.environ.get(k) != v for k, v in LOOPBACK_ENV.items()):
        return
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server  # type: ignore[attr-defined]
    if getattr(original, "_stageline_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address.removeprefix("[::]:")
        port: int = original(server, address)  # type: ignore[no-untyped-call]
        return port

    on_loopback._stageline_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback  # type: ignore[attr-defined]


# -- 2. Deployment versions ----------------------------------------------------------------


def versioned(deployment: T, version: str) -> T:
    """``deployment`` with ``version`` set.

    Without a version, ``serve.run`` gives every deployment a random one, so each
    redeploy restarts every replica; with one, a redeploy that only changes
    ``user_config`` reloads the running replicas in place. Ray accepts ``version`` in
    ``Deployment.options`` only with its private ``_internal=True``."""
    options = deployment.options  # type: ignore[attr-defined]
    result: T = options(version=version, _internal=True)
    return result


# -- 3. Handle calls -----------------------------------------------------------------------


def by_reference(handle: T, enabled: bool) -> T:
    """``handle`` calling its deployment as a Ray actor call that passes object
    references (True), or over Serve's gRPC path (False): the private
    ``_by_reference`` option of ``DeploymentHandle.options``."""
    options = handle.options  # type: ignore[attr-defined]
    result: T = options(_by_reference=enabled)
    return result


# -- 4. Settings Ray reads from its environment --------------------------------------------

SETTINGS = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}
"""Serve runs the app's code on each replica's own event loop (as Serve's
``RAY_SERVE_THROUGHPUT_OPTIMIZED`` mode does), not on a second loop in a thread of
its own: one thread hop less each way per request. The app never blocks its loop
(stages run in worker threads), which is what the second loop guards against.

Replicas report their load to the autoscaler every second, not every 10 s: a stage
deployment scales on how busy it was over ``autoscaling.look_back_s`` (15 s by
default), and a report every 10 s would leave the autoscaler one or two samples of it."""

HAPROXY_MODE = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
"""Serve's HAProxy mode: HAProxy takes HTTP straight to the ingress replicas, each
of which serves HTTP itself; no Python proxy in the path."""

HAPROXY_BINARY = "RAY_SERVE_HAPROXY_BINARY_PATH"
"""The program Serve starts as HAProxy (ours: :data:`HAPROXY_WRAPPER`)."""

HAPROXY_PORTS = ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT")
"""The TCP ports of HAProxy's stats and metrics listeners (the wrapper moves them)."""


def haproxy_settings(wrapper: str, *, retry_on: str, retries: int, fill: int) -> dict[str, str]:
    """Serve's HAProxy settings: started as ``wrapper``, a request whose replica failed
    it (``retry_on``) sent again up to ``retries`` times, replicas filled in order
    (``fill`` requests each, 0: spread), and a stopping replica dropped at once."""
    return {
        **HAPROXY_MODE,
        HAPROXY_BINARY: wrapper,
        "RAY_SERVE_HAPROXY_RETRY_ON": retry_on,
        "RAY_SERVE_HAPROXY_RETRIES": str(retries),
        "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "first" if fill > 0 else "leastconn",
        FILL_ENV: str(fill),
        # HAProxy on this node drops a stopping replica within a reload (~0.1 s); Serve's
        # 30 s default is for load balancers elsewhere, and would hold every stop 30 s.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


# -- 5. The HAProxy config Ray writes ------------------------------------------------------

FILL_ENV = "STAGELINE_HAPROXY_FILL"
"""How many requests in flight the wrapper caps each ingress replica but the last at."""

HAPROXY_TEMPLATE_LINES = (
    "errorfile 502 ",
    "errorfile 503 ",
    "errorfile 504 ",
    "frontend http_frontend",
    "server {{ server.name }} {{ server.host }}:{{ server.port }} check",
    "balance {{ config.balance_algorithm }}",
    "bind *:{{ config.stats_port }}",
    "bind :{{ config.metrics_port }}",
)
"""What the wrapper finds in the config Serve renders from its template (a replica's
server line is named ``SERVE_REPLICA_<app>-<deployment>-<id>``)."""

# Ray's HAProxy template binds its stats and Prometheus ports on every interface; this
# wrapper moves those two (and only those) to Unix sockets beside HAProxy's config (one
# folder per node), so no TCP port is picked for them and two servers never collide.
# HAProxy gets a parent-death signal: when the Ray worker that started it dies, however
# it dies, HAProxy ends too instead of holding the HTTP port.
# It adds stageline's rules (serve_app.haproxy.haproxy_rules: requests kept for a retry,
# and every error HAProxy answers itself, or a replica's plain-text 503, in our JSON
# shape), once: in place of Ray's `errorfile 50x` lines (a plain-text 500) and atop the
# HTTP frontend. With $STAGELINE_HAPROXY_FILL > 0 it caps every replica but the last of
# each backend at that many requests in flight (Serve balances with `first`, HAProxy's
# fill-in-order algorithm, from haproxy_settings).
HAPROXY_WRAPPER = """#!/bin/sh
# Written by stageline serve. Starts HAProxy as Ray Serve asks, with the stats and
# metrics listeners on Unix sockets, stageline's retries and JSON errors, and replicas
# filled in order.
stats="${RAY_SERVE_HAPROXY_STATS_PORT:-8404}"
metrics="${RAY_SERVE_HAPROXY_METRICS_PORT:-9101}"
fill="${STAGELINE_HAPROXY_FILL:-0}"
prev=
for arg in "$@"; do
    if [ "$prev" = -f ]; then
        dir=$(dirname "$arg")
        bind='s|^([[:space:]]*bind )[*]?:'
        sed -i -E -e "$bind$stats\\$|\\1unix@$dir/stats.sock mode 600|" \\
            -e "$bind$metrics\\$|\\1unix@$dir/metrics-http.sock mode 600|" "$arg"
        awk -v defaults={defaults} -v frontend={frontend} '
            NR == FNR { if ($0 ~ /^[ \\t]*# stageline: added/) done = 1; next }
            !done && /^[ \\t]*errorfile 50[234] / { next }
            { print }
            !done && /^defaults([ \\t]|$)/ { insert(defaults) }
            !done && /^frontend http_frontend([ \\t]|$)/ { insert(frontend) }
            function insert(file,  line) {
                while ((getline line < file) > 0) print line
                close(file)
            }
        ' "$arg" "$arg" > "$arg.rules" && mv "$arg.rules" "$arg"
        if [ "$fill" -gt 0 ] 2>/dev/null; then
            awk -v fill="$fill" '
                NR == FNR {
                    if ($0 ~ /^[ \\t]*backend /) b++
                    if ($0 ~ /^[ \\t]*server SERVE_REPLICA_/) count[b]++
                    next
                }
                FNR == 1 { b = 0 }
                /^[ \\t]*backend / { b++; seen = 0 }
                /^[ \\t]*server SERVE_REPLICA_/ && ++seen < count[b] && !/ maxconn / {
                    $0 = $0 " maxconn " fill
                }
                { print }
            ' "$arg" "$arg" > "$arg.fill" && mv "$arg.fill" "$arg"
        fi
    fi
    prev=$arg
done
if command -v setpriv >/dev/null; then
    exec setpriv --pdeathsig TERM -- {binary} "$@"
fi
exec {binary} "$@"
"""
"""The program Serve starts as HAProxy; ``{binary}``, ``{defaults}`` and ``{frontend}``
are filled in by ``serve_app.haproxy.serve_env``."""


# -- 6. The replica's HTTP server ----------------------------------------------------------

RESPONSE_CYCLES = (
    "uvicorn.protocols.http.httptools_impl.RequestResponseCycle",
    "uvicorn.protocols.http.h11_impl.RequestResponseCycle",
)
"""What :func:`send_each_response_whole` patches: the uvicorn request cycles Serve's
replicas answer HTTP with (HAProxy mode's direct ingress), whichever uvicorn picks."""


class _HeldWrites:
    """A response's transport from its status line until its body: what is written is
    held, then sent as one write (:meth:`release`). Everything else is the transport's."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.held.append(bytes(data))

    def release(self) -> None:
        if self.held:
            self.transport.write(b"".join(self.held))
            self.held.clear()

    def close(self) -> None:
        self.release()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def send_each_response_whole() -> None:
    """Make this replica's HTTP server send a response's status line and headers in the
    same write as its (first) body: uvicorn writes them apart, one socket write each.

    Apart, a replica that dies between the two (SIGKILL, the OOM killer; on a busy
    machine the writer is often descheduled right after the first write wakes HAProxy)
    leaves HAProxy holding the headers of an answer with no body. HAProxy has already
    passed them on, so it cannot retry the request on another replica: the client sees
    a truncated response. Whole, a response either reached HAProxy or never started, and
    a request whose replica died without an answer is retried (``serve_app.haproxy``).
    A response that starts and then fails before its body closes the connection with
    nothing sent, which HAProxy retries too. Called by the ingress's constructor, in the
    replica's process, before it serves."""
    import importlib

    for path in RESPONSE_CYCLES:
        module_name, _, name = path.rpartition(".")
        try:
            cycle = getattr(importlib.import_module(module_name), name)
        except ImportError:  # that parser is not installed: uvicorn does not use it
            continue
        original = cycle.send
        if getattr(original, "_stageline_whole", False):
            continue
        cycle.send = _whole(original)


def _whole(original: Any) -> Any:
    """uvicorn's ``send`` of one request cycle, its status line held back until the
    body goes (:class:`_HeldWrites`). A body that fails to go (uvicorn refuses it)
    sends nothing: the connection closes with no answer, which HAProxy retries."""

    async def send(self: Any, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and not self.response_started:
            start = _HeldWrites(self.transport)
            self.transport = start
            try:
                await original(self, message)
            finally:
                self.transport = start.transport
            self._stageline_held = start
            return
        held: _HeldWrites | None = getattr(self, "_stageline_held", None)
        if held is None or message["type"] != "http.response.body":
            await original(self, message)
            return
        self._stageline_held = None
        self.transport = held
        try:
            await original(self, message)
        finally:
            self.transport = held.transport
        held.release()

    send._stageline_whole = True  # type: ignore[attr-defined]
    return send
