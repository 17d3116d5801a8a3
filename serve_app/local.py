"""Run the Serve app on this machine: what ``stageline serve`` does."""

from __future__ import annotations

import json
import logging
import os
import shlex
import threading
from pathlib import Path
from typing import Any

import ray
from ray import serve

from serve_app.app import AppArgs, build_app
from serve_app.haproxy import FILL_FIRST, HAPROXY_REQUEST_TIMEOUT_S, serve_env
from serve_app.ray_internals import SETTINGS as SERVE_SETTINGS
from stageline._io import atomic_write_bytes
from stageline.localray import check_port_free, local_ray_options, serve_record_path
from stageline.spec import load_spec

__all__ = [
    "FILL_FIRST",
    "HAPROXY_REQUEST_TIMEOUT_S",
    "SERVE_SETTINGS",
    "attach",
    "deploy",
    "serve_env",
    "start",
    "stop",
]

log = logging.getLogger(__name__)


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

    A port already taken is a one-line :class:`OSError` naming it and the ``stageline
    serve`` option that moves it: checked before Ray starts (a taken metrics port would
    have Ray time out starting, after 30 s), and again if Serve fails to start, in case
    it was taken meanwhile (HAProxy or Serve's proxy fails on it with a traceback).
    """
    if not ray.is_initialized():
        check_port_free(host, port, "--port")
        if metrics_port is not None:
            check_port_free("127.0.0.1", metrics_port, "--metrics-port")
        for key, value in serve_env().items():
            os.environ.setdefault(key, value)
        ray.init(**local_ray_options(num_cpus=num_cpus, metrics_port=metrics_port))
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as failed:
        try:
            check_port_free(host, port, "--port")
        except OSError as taken:
            raise taken from failed
        raise
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
    """A shell command that posts ``record``, quoted for a POSIX shell."""
    body = json.dumps({"records": [record]}, default=str)
    return f"curl -s {url}/predict -H 'Content-Type: application/json' -d {shlex.quote(body)}"
