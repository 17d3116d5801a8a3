"""Run the Serve app on this machine: what ``stageline serve`` does."""

from __future__ import annotations

import json
import logging
from typing import Any

import ray
from ray import serve

from serve_app.app import AppArgs, build_app
from stageline.localray import local_ray_options
from stageline.spec import load_spec


def start(
    args: AppArgs, *, host: str = "127.0.0.1", port: int = 8000, num_cpus: float | None = None
) -> str:
    """Start a local Ray on loopback, Serve on ``host:port`` and the app; its URL.

    Returns once every deployment is running (Serve waits for the replicas).
    """
    if not ray.is_initialized():
        ray.init(**local_ray_options(num_cpus=num_cpus))
    serve.start(http_options={"host": host, "port": port})
    deploy(args)
    return f"http://{host}:{port}"


def deploy(args: AppArgs) -> None:
    """Deploy (or update in place) the app named after the spec, at ``/``."""
    name = load_spec(args.spec).name
    serve.run(build_app(args), name=name, route_prefix="/", blocking=False)


def attach() -> bool:
    """Connect to a Ray that is already running on this machine; False if none is."""
    try:
        ray.init(address="auto", namespace="stageline", logging_level=logging.ERROR)
    except ConnectionError:
        return False
    return True


def app_running(name: str) -> bool:
    return name in serve.status().applications


def stop() -> None:
    if ray.is_initialized():
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray.shutdown()


def example_curl(url: str, record: dict[str, Any]) -> str:
    body = json.dumps({"records": [record]}, default=str)
    return f"curl -s {url}/predict -H 'Content-Type: application/json' -d '{body}'"
