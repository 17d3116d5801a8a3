"""What the online fault tests share: request bodies, the two ways HTTP comes in, Serve's
view of replicas, memory."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from bench.procmem import sample
from stageline.spec import load_spec
from tests.conftest import GOOD_RECORD, deploy_app, free_port
from tests.integration.serve_helpers import app_details, delete_apps, wait_for
from tests.support.processes import descendants, process_name, spawned

Json = dict[str, Any]
TIMEOUT = 30.0
MIB = 2**20

TWO_REPLICAS: Json = {"num_cpus": 0.25, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
SHIPPED: Json = {"ingress": TWO_REPLICAS}
"""The shipped placement for ``fraud_variant``: every stage inline in two ingress replicas
(the test session's Ray holds other apps: a quarter CPU each)."""
PLACEMENTS: dict[str, Json] = {"shipped": SHIPPED, "per-stage": {"inline": []}}
"""The placements a fault is tried in: the shipped one, and one deployment per stage
(one replica each: nothing else to fall back on; the ingress cancels what it issued)."""


def one_record(i: int) -> Json:
    """Request ``i``: one valid record, its own transaction id, one of the demo's customers."""
    record = {**GOOD_RECORD, "transaction_id": f"t-{i}", "customer_id": f"c{i % 800:06d}"}
    return {"records": [record]}


def running_replicas(app: str, deployment: str) -> list[Any]:
    """Serve's details of the RUNNING replicas of ``deployment`` in ``app``."""
    replicas = app_details(app).deployments[deployment].replicas
    return [r for r in replicas if r.state == "RUNNING"]


def ready(url: str) -> requests.Response:
    return requests.get(f"{url}/readyz", timeout=TIMEOUT)


def proxy_pids() -> list[int]:
    """Serve's HTTP proxy process(es) of this test session's Ray."""
    return [pid for pid in descendants(os.getpid()) if _title(pid).startswith("ray::ProxyActor")]


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def memory_mib(pids: list[int]) -> tuple[float, float]:
    """(PSS, RSS) in MiB summed over ``pids`` (each with what it started)."""
    pss = rss = 0
    for pid in pids:
        s = sample(pid)
        pss, rss = pss + s.pss, rss + s.rss
    return pss / MIB, rss / MIB


MODES = ["serve-proxy", "haproxy"]
"""Where HTTP comes in: Serve's own Python proxy, in this test session's Ray (one app per
test), or HAProxy, in a ``stageline serve`` of its own: what ships."""


@dataclass(frozen=True)
class Served:
    """An app under test, served in one of the :data:`MODES`."""

    mode: str
    app: str
    url: str
    """The app's base URL (``/predict`` is below it)."""
    server: int | None = None
    """HAProxy mode: the pid of ``stageline serve``."""

    def ingress_pids(self) -> list[int]:
        """The processes of the app's running ingress replicas."""
        if self.server is None:
            return [r.pid for r in running_replicas(self.app, "ingress")]
        title = f"ray::ServeReplica:{self.app}:ingress"
        return [p for p in descendants(self.server) if _title(p) == title]

    def front_pids(self) -> list[int]:
        """What takes HTTP in front of the replicas: Serve's proxy, or HAProxy."""
        if self.server is None:
            return proxy_pids()
        return [p for p in descendants(self.server) if process_name(p) == "haproxy"]

    def haproxy_config(self) -> str | None:
        """HAProxy mode: the config the one HAProxy runs, as Serve wrote it and
        ``stageline serve``'s wrapper rewrote it. None during a reload: while several
        HAProxies run, or once Serve has written the file again for the next one and the
        wrapper has not yet put its rules in (the file keeps its path)."""
        haproxies = self.front_pids() if self.server is not None else []
        if len(haproxies) != 1:
            return None
        try:
            argv = Path(f"/proc/{haproxies[0]}/cmdline").read_bytes().decode().split("\0")
            config = Path(argv[argv.index("-f") + 1]).read_text()
        except (OSError, ValueError):  # it ended since (a reload)
            return None
        return config if "# stageline: added" in config else None

    def routed(self) -> bool:
        """Whether HTTP reaches every running ingress replica: in HAProxy mode, one
        HAProxy runs, and its config lists each (Serve reloads it as replicas come)."""
        if self.server is None:
            return True
        config, replicas = self.haproxy_config(), self.ingress_pids()
        if config is None or not replicas:
            return False
        return config.count(f"server SERVE_REPLICA_{self.app}-ingress-") == len(replicas)


@contextmanager
def served(
    mode: str, app: str, spec: Path, request: pytest.FixtureRequest, workdir: Path
) -> Iterator[Served]:
    """``spec`` served in ``mode`` (see :data:`MODES`) until the block ends.

    Serve-proxy mode deploys it as ``app`` into the session's Ray (the fixtures are
    asked for only then). HAProxy mode starts ``stageline serve`` on a copy of the demo
    home (the app is named after the spec), and stops it, with everything it started,
    when the block is left."""
    if mode == "serve-proxy":
        base = request.getfixturevalue("serve_base")
        home = request.getfixturevalue("demo_home")
        url = deploy_app(base, app, spec=str(spec), home=str(home))
        try:
            yield Served(mode, app, url)
        finally:
            delete_apps([app])
        return
    app = load_spec(spec).name
    home = workdir / "home"
    shutil.copytree(request.getfixturevalue("demo").home, home)
    port, metrics = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "stageline_cli", "serve", "--spec", str(spec)]
    argv += ["--home", str(home), "--port", str(port), "--metrics-port", str(metrics)]
    env = {k: v for k, v in os.environ.items() if k != "STAGELINE_API_KEY"}
    log = workdir / "serve.out"
    with spawned(argv, log, {**env, "PYTHONUNBUFFERED": "1"}) as server:
        deadline = time.monotonic() + 180
        while f"serving {app} at {url}" not in log.read_text():
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        running = Served(mode, app, url, server.pid)
        wait_for(running.routed, 60, "HAProxy to route to every ingress replica", 0.5)
        yield running
        server.terminate()  # a clean stop, as an operator's
        server.wait(timeout=60)
