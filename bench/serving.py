"""Run a Ray Serve application of a benchmark until SIGTERM, as ``stageline serve``
runs its own: a local Ray on loopback, Serve's HTTP proxy on ``127.0.0.1:port``."""

from __future__ import annotations

import sys

import ray
from ray import serve
from ray.serve import Application

from stageline.localray import check_port_free, local_ray_options
from stageline_cli.processes import StopSignal


def serve_until_stopped(app: Application, port: int, name: str) -> None:
    """Deploy ``app`` at ``/``, say so on stdout, block until SIGTERM or Ctrl-C, shut down."""
    try:
        check_port_free("127.0.0.1", port, "--port")
    except OSError as e:  # one line, not Ray's traceback once Serve tries it
        raise SystemExit(f"{name}: error: {e}") from None
    stop = StopSignal()
    ray.init(**local_ray_options())
    try:
        stop.install()  # again: ray.init sets a SIGTERM handler of its own
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(app, name=name, route_prefix="/")
        print(f"serving {name} at http://127.0.0.1:{port}", flush=True)
        stop.wait()
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()
