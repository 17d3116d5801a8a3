"""How stageline starts a local Ray: on loopback only, sized for the machine.

Plain data, no Ray import: ``serve_app`` and ``batch_app`` pass the result to
``ray.init``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
"""Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's reachable
address and its GCS and raylet then listen on every interface. With this
setting (what Ray does on a laptop) every listener binds 127.0.0.1."""


def local_ray_options(
    *,
    num_cpus: float | None = None,
    object_store_mb: int = 512,
    dashboard: bool = False,
    metrics_port: int | None = None,
) -> dict[str, Any]:
    """``ray.init`` keyword arguments for a local Ray that stays on loopback.

    Sets :data:`LOOPBACK_ENV` in this process, so the Ray processes it starts
    inherit it. Logical CPUs default to twice the cores: stage replicas take
    fractions of a CPU and spend much of their time waiting on one another.
    ``metrics_port``: where Ray serves Prometheus metrics (loopback), if set.
    """
    os.environ.update(LOOPBACK_ENV)
    # Ray reads that setting once, when it is first imported; if it already was,
    # set the flag its address lookup consults (it reads the attribute at call time).
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        setattr(constants, "ENABLE_RAY_CLUSTER", False)  # noqa: B010 - not typed
    cpus = num_cpus if num_cpus is not None else 2 * (os.cpu_count() or 1)
    options: dict[str, Any] = {
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
