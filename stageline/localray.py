"""How stageline starts a local Ray: on loopback only, sized for the machine.

Plain data, no Ray import: ``serve_app`` and ``batch_app`` pass the result to
``ray.init``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's reachable
address and its GCS and raylet then listen on every interface. With this
setting (what Ray does on a laptop) every listener binds 127.0.0.1."""


def use_loopback() -> None:
    """Keep a local Ray started by this process on loopback: set :data:`LOOPBACK_ENV`.

    Ray reads the setting once, when it is first imported, so call this before
    anything imports ``ray``. Raises :class:`RuntimeError` if Ray was imported
    before the setting was in place (the Ray started next would listen on
    every interface).
    """
    already = all(os.environ.get(name) == value for name, value in LOOPBACK_ENV.items())
    os.environ.update(LOOPBACK_ENV)
    if "ray" in sys.modules and not already:
        names = " ".join(f"{name}={value}" for name, value in LOOPBACK_ENV.items())
        raise RuntimeError(
            f"Ray was imported before stageline could set {names}, so a local Ray would "
            f"listen on every interface; set {names} in the environment before Ray is "
            "imported, or start stageline before importing ray"
        )


def local_ray_options(
    *,
    num_cpus: float | None = None,
    object_store_mb: int = 512,
    dashboard: bool = False,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """``ray.init`` keyword arguments for a local Ray that stays on loopback.

    Calls :func:`use_loopback` (so call it before Ray is imported): the Ray
    processes started with these options inherit :data:`LOOPBACK_ENV`. Logical
    CPUs default to twice the cores: stage replicas take fractions of a CPU and
    spend much of their time waiting on one another.
    ``metrics_port``: where Ray serves Prometheus metrics (loopback), if set.
    """
    use_loopback()
    cpus = num_cpus if num_cpus is not None else 2 * (os.cpu_count() or 1)
    options: dict[str, Any] = {
        # A new Ray of our own, even when `ray start` left a cluster on this machine
        # (without this, ray.init() would join that one).
        "address": "local",
        "_node_ip_address": "127.0.0.1",
        "include_dashboard": dashboard,
        "num_cpus": cpus,
        "object_store_memory": object_store_mb * 1024 * 1024,
        "namespace": "stageline",
    }
    if metrics_port is not None:
        options["_metrics_export_port"] = metrics_port
    return options


def serve_record_path(home: Path) -> Path:
    """Where a running ``stageline serve`` records its Ray address and URL."""
    return home / "run" / "serve.json"


def running_server(home: Path) -> dict[str, Any] | None:
    """The record of the ``stageline serve`` running for ``home``, or None.

    Also sets what connecting to it needs. Call it before Ray is imported: Ray
    reads these settings once, at import. (Ray turns token authentication on
    by itself only for ``address="auto"``, never for an explicit address.)
    """
    try:
        record: dict[str, Any] = json.loads(serve_record_path(home).read_text())
        os.kill(int(record["pid"]), 0)  # still alive?
    except (OSError, ValueError, KeyError):
        return None
    os.environ.update(LOOPBACK_ENV)
    os.environ.setdefault("RAY_AUTH_MODE", str(record.get("auth_mode", "token")))
    return record


def check_port_free(host: str, port: int, option: str) -> None:
    """Raise a one-line :class:`OSError` when nothing could listen on ``host:port`` (it is
    taken, most often), naming the port and ``option``, the command-line option that
    moves it: before anything starts that would fail on it with a long traceback (or,
    for Ray's metrics port, a timeout). A check, not a reservation: what binds the port
    later still reports its own failure."""
    with socket.socket() as s:
        # As servers bind (HAProxy, uvicorn): a port whose last connections linger in
        # TIME_WAIT is free to them.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:
                message = (
                    f"cannot listen on {host}:{port}: {host} is not an address of this "
                    "machine; use one of its own (127.0.0.1: this machine only, 0.0.0.0: "
                    "every interface)"
                )
            elif e.errno == errno.EADDRINUSE:
                message = (
                    f"port {port} on {host} is in use ({e.strerror}); stop what holds it "
                    f"or choose another with {option}"
                )
            else:  # EACCES: a port under 1024 without the privilege, say
                message = (
                    f"cannot listen on port {port} on {host} ({e.strerror or e}); choose "
                    f"another with {option}"
                )
            raise OSError(message) from None
