"""A Ray cluster of two nodes on this machine (two raylets, ``ray start``), token
authentication on, Redis as the online store: what the multi-node tests share.

It takes about a minute to start, so a test session has at most one: the first test
that asks for the ``multinode`` fixture (tests/conftest.py) starts it, and it stops
right after the last test of the session that asks for it, whichever modules those
are (the e2e tests and the fault suite share it; nothing else runs beside it longer
than it must). Tests may kill its worker node; :meth:`Cluster.ensure_worker` adds one.
"""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from serve_app.ray_internals import SETTINGS as SERVE_SETTINGS
from stageline.demo.train import DemoResult
from stageline_cli import main
from tests.conftest import FRAUD_SPEC, ROOT, RedisServer
from tests.integration.serve_helpers import wait_for
from tests.support.cluster import LocalCluster, LocalNode
from tests.support.processes import OWN_SESSION, free_port, stop_group

TIMEOUT = 30.0
FIXTURE = "multinode"


class Cluster:
    """The cluster, its stageline home (a copy of the demo's) and what runs on it."""

    def __init__(self, ray: LocalCluster, home: Path, online: str, workdir: Path) -> None:
        self.ray, self.home, self.online, self.workdir = ray, home, online, workdir
        self._url: str | None = None
        self._port = 0

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The dashboard's REST API (Jobs, Serve, State), with the cluster's token."""
        return requests.request(
            method,
            self.ray.dashboard_url + path,
            headers=self.ray.headers(),
            timeout=TIMEOUT,
            **kwargs,
        )

    def nodes(self) -> list[dict[str, Any]]:
        """Every node Ray knows of (dead ones too), as the State API lists them."""
        return list(self.api("GET", "/api/v0/nodes").json()["data"]["result"]["result"])

    def alive_nodes(self) -> set[str]:
        return {n["node_id"] for n in self.nodes() if n["state"] == "ALIVE"}

    def head_node(self) -> str:
        (head,) = [n["node_id"] for n in self.nodes() if n["is_head_node"]]
        return str(head)

    def actors(self, class_name: str) -> list[dict[str, Any]]:
        """Live actors whose class name contains ``class_name`` (State API)."""
        found = self.api("GET", "/api/v0/actors?limit=10000").json()["data"]["result"]["result"]
        return [a for a in found if class_name in a["class_name"] and a["state"] == "ALIVE"]

    def ensure_worker(self, num_cpus: float = 3) -> LocalNode:
        """A live worker node: the one running, or a new one once Ray sees it."""
        alive = [n for n in self.ray.nodes if n.name != "head" and n.alive]
        node = alive[0] if alive else self.ray.add_worker(num_cpus=num_cpus)
        running = sum(n.alive for n in self.ray.nodes)
        wait_for(lambda: len(self.alive_nodes()) == running, timeout=120, what="the worker node")
        return node

    @contextmanager
    def head_busy(self) -> Iterator[float]:
        """Hold the head's free CPUs (a placement group of a driver of its own) while in
        the block, so new work goes to the workers, as on a cluster whose head takes
        none (KubeRay's advice); yields the CPUs held."""
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLD_HEAD, self.ray.address],
            env=self.ray.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            **OWN_SESSION,
        )  # fmt: skip
        assert holder.stdin is not None
        assert holder.stdout is not None
        try:
            line = holder.stdout.readline()
            assert line.startswith("HELD "), f"could not hold the head's CPUs: {line!r}"
            yield float(line.split()[1])
        finally:
            holder.stdin.close()  # the driver exits, and its placement group goes with it
            try:
                holder.wait(timeout=60)
            finally:
                stop_group(holder)

    # -- Serve --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The demo app, deployed from cluster/serve.yaml on first use."""
        if self._url is None:
            self._url = self._deploy()
        return self._url

    def replicas(self) -> dict[str, set[str]]:
        """Node id of every running replica, by deployment."""
        app = self.api("GET", "/api/serve/applications/").json()["applications"]["fraud"]
        return {
            name: {r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
            for name, d in app["deployments"].items()
        }

    def deploy_beside(self, extra: dict[str, Any] | None) -> None:
        """Deploy ``extra`` (one application of a Serve config) beside the demo app, or
        with None take it away again: ``serve deploy`` replaces every app of a cluster,
        so the config always holds the demo app, unchanged (Serve leaves it running)."""
        assert self._url is not None or self.url
        self._serve_deploy([] if extra is None else [extra])

    def app_replicas(self, app: str) -> dict[str, int]:
        """RUNNING replicas of each deployment of ``app``."""
        found = self.api("GET", "/api/serve/applications/").json()["applications"][app]
        return {
            name: sum(r["state"] == "RUNNING" for r in d["replicas"])
            for name, d in found["deployments"].items()
        }

    def _deploy(self) -> str:
        self._port = free_port()
        self._serve_deploy([])
        return f"http://127.0.0.1:{self._port}"

    def _serve_deploy(self, extra: list[dict[str, Any]]) -> None:
        # cluster/serve.yaml as shipped; only this machine's paths and a free port differ.
        config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
        config["http_options"]["port"] = self._port
        (app,) = config["applications"]
        app["args"] = {
            **app["args"],
            "spec": str(FRAUD_SPEC),
            "home": str(self.home),
            "online": self.online,
        }
        config["applications"] += extra
        path = self.workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        deploy = subprocess.run(
            ["serve", "deploy", str(path), "--address", self.ray.dashboard_url],
            env=self.ray.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        names = {a["name"] for a in config["applications"]}

        def running() -> bool:
            apps = self.api("GET", "/api/serve/applications/").json()["applications"]
            for name in names:
                app = apps.get(name)
                assert app is None or app["status"] != "DEPLOY_FAILED", app
            return set(apps) == names and all(apps[n]["status"] == "RUNNING" for n in names)

        wait_for(running, timeout=240, what="the apps to run")

    # -- Jobs ---------------------------------------------------------------------

    def submit_batch(self, source: Path, output: Path, spec: Path = FRAUD_SPEC) -> str:
        """``python -m batch_app`` through the Jobs API; the job's id."""
        entrypoint = [sys.executable, "-m", "batch_app", "--spec", str(spec)]
        entrypoint += ["--home", str(self.home), "--online", self.online]
        entrypoint += ["--input", str(source), "--output", str(output)]
        resp = self.api("POST", "/api/jobs/", json={"entrypoint": " ".join(entrypoint)})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["submission_id"])

    def job_status(self, job_id: str) -> str:
        return str(self.api("GET", f"/api/jobs/{job_id}").json()["status"])

    def wait_job(self, job_id: str, timeout: float = 300) -> tuple[str, str]:
        """(final status, logs) of the job."""
        deadline = time.monotonic() + timeout
        while (status := self.job_status(job_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {status}; its log ends:\n{self.job_logs(job_id)[-3000:]}"
                    f"\nthe cluster:\n{self.status()}"
                )
            time.sleep(1)
        return status, self.job_logs(job_id)

    def job_logs(self, job_id: str) -> str:
        return str(self.api("GET", f"/api/jobs/{job_id}/logs").json()["logs"])

    def status(self) -> str:
        """``ray status``: each node's resources, what is used, what waits for them."""
        done = subprocess.run(
            ["ray", "status", f"--address={self.ray.address}"],
            env=self.ray.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        return done.stdout + done.stderr

    def batch_job(self, source: Path, output: Path, spec: Path = FRAUD_SPEC) -> str:
        """Run a batch job to its end; its logs (it must succeed)."""
        status, logs = self.wait_job(self.submit_batch(source, output, spec))
        assert status == "SUCCEEDED", logs
        return logs


_HOLD_HEAD = """
import sys
import ray
from ray.util.placement_group import placement_group, remove_placement_group

ray.init(address=sys.argv[1], logging_level="ERROR")
held = 0.0
for half_cpus in range(8, 0, -1):  # every CPU the head has free, in halves
    group = placement_group([{"CPU": half_cpus / 2, "node:__internal_head__": 0.001}])
    if group.wait(timeout_seconds=2):
        held = half_cpus / 2
        break
    remove_placement_group(group)
print("HELD", held, flush=True)
sys.stdin.read()
"""


# --------------------------------------------------------------------------- lifetime

_current: Cluster | None = None


def shared_cluster(
    request: pytest.FixtureRequest,
    demo: DemoResult,
    redis: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Cluster:
    """The session's cluster, started if this is its first user."""
    global _current
    if _current is None:
        _current = _start(demo, redis, tmp_path_factory.mktemp("multinode"))
        atexit.register(stop_shared)  # an interrupted session stops it too
    return _current


def done_with_cluster(request: pytest.FixtureRequest) -> None:
    """After a test: stop the cluster if no test still to run asks for it."""
    session = request.session
    items = session.items
    index = items.index(request.node) if request.node in items else len(items)
    later = any(FIXTURE in getattr(item, "fixturenames", ()) for item in items[index + 1 :])
    if not later or session.shouldfail or session.shouldstop:
        stop_shared()


def stop_shared() -> None:
    global _current
    if _current is not None:
        cluster, _current = _current, None
        cluster.ray.stop()


def _start(demo: DemoResult, redis: RedisServer, workdir: Path) -> Cluster:
    home = workdir / "home"
    shutil.copytree(demo.home, home)
    online = redis.url
    assert (
        main(["materialize", "--spec", str(FRAUD_SPEC), "--home", str(home), "--online", online])
        == 0
    )
    # What `stageline serve` gives its Ray: the replicas report their load every second.
    # A test cluster's nodes stop at once, without Ray's 30 s drain each.
    ray = LocalCluster(
        workdir / "ray",
        env={**SERVE_SETTINGS, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
    )
    try:
        # Room on the head alone for the shipped graph at its minimum (1.75 CPUs), a
        # batch job's actors and Ray Data's file listing (a whole CPU, not settable):
        # what a test that loses the worker node runs on.
        ray.start_head(num_cpus=4)
        wait_for(lambda: _answers(ray), timeout=120, what="the head node")
        cluster = Cluster(ray, home, online, workdir)
        cluster.ensure_worker()
    except BaseException:
        ray.stop()
        raise
    return cluster


def _answers(ray: LocalCluster) -> bool:
    try:
        return requests.get(
            f"{ray.dashboard_url}/api/v0/nodes", headers=ray.headers(), timeout=5
        ).ok
    except requests.RequestException:
        return False
