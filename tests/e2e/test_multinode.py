"""Past one machine, on one machine: a Ray cluster of two nodes (two raylets,
``ray start``), token authentication on, Redis as the online store. The Serve app
goes on with ``serve deploy`` of cluster/serve.yaml, the batch pipeline through
the Jobs API; then a node is killed and both keep working."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests
import yaml

from stageline import Pipeline
from stageline.cli import main
from stageline.demo.batch import transactions
from stageline.demo.train import DemoResult
from stageline.localray import LocalCluster, descendants, free_port, listening
from stageline.spec import PipelineSpec
from tests.conftest import FRAUD_SPEC, ROOT, SMALL_DEMO, RedisServer
from tests.integration.serve_helpers import client_records, in_process, predict

pytestmark = pytest.mark.e2e

Json = dict[str, Any]
TIMEOUT = 30.0


class Cluster:
    """The two-node cluster and what the test deployed on it."""

    def __init__(self, ray: LocalCluster, home: Path, online: str, url: str) -> None:
        self.ray, self.home, self.online, self.url = ray, home, online, url

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """The dashboard's REST API (Jobs, Serve, State), with the cluster's token."""
        return requests.request(
            method,
            self.ray.dashboard_url + path,
            headers=self.ray.headers(),
            timeout=TIMEOUT,
            **kwargs,
        )

    def alive_nodes(self) -> set[str]:
        nodes = self.api("GET", "/api/v0/nodes").json()["data"]["result"]["result"]
        return {n["node_id"] for n in nodes if n["state"] == "ALIVE"}

    def replicas(self) -> dict[str, set[str]]:
        """Node id of every running replica, by deployment."""
        app = self.api("GET", "/api/serve/applications/").json()["applications"]["fraud"]
        return {
            name: {r["node_id"] for r in d["replicas"] if r["state"] == "RUNNING"}
            for name, d in app["deployments"].items()
        }

    def batch_job(self, source: Path, output: Path) -> str:
        entrypoint = [sys.executable, "-m", "batch_app", "--spec", str(FRAUD_SPEC)]
        entrypoint += ["--home", str(self.home), "--online", self.online]
        entrypoint += ["--input", str(source), "--output", str(output)]
        resp = self.api("POST", "/api/jobs/", json={"entrypoint": " ".join(entrypoint)})
        assert resp.status_code == 200, resp.text
        job_id = str(resp.json()["submission_id"])
        deadline = time.monotonic() + 300
        while True:
            status = self.api("GET", f"/api/jobs/{job_id}").json()["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            assert time.monotonic() < deadline, f"job {job_id} still {status}"
            time.sleep(1)
        logs = self.api("GET", f"/api/jobs/{job_id}/logs").json()["logs"]
        assert status == "SUCCEEDED", logs
        return str(logs)


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(
    demo: DemoResult, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("multinode")
    home = workdir / "home"
    shutil.copytree(demo.home, home)
    online = redis_server.url
    assert (
        main(["materialize", "--spec", str(FRAUD_SPEC), "--home", str(home), "--online", online])
        == 0
    )

    ray = LocalCluster(workdir / "ray")
    try:
        ray.start_head(num_cpus=3)
        wait_for(lambda: _answers(ray), timeout=120, what="the head node")
        ray.add_worker(num_cpus=3)
        c = Cluster(ray, home, online, "")
        wait_for(lambda: len(c.alive_nodes()) == 2, timeout=120, what="the worker node")

        # cluster/serve.yaml as shipped; only this machine's paths and a free port differ.
        config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
        port = free_port()
        config["http_options"]["port"] = port
        (app,) = config["applications"]
        app["args"] = {**app["args"], "spec": str(FRAUD_SPEC), "home": str(home), "online": online}
        path = workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        deploy = subprocess.run(
            ["serve", "deploy", str(path), "--address", ray.dashboard_url],
            env=ray.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        c.url = f"http://127.0.0.1:{port}"

        def running() -> bool:
            app = c.api("GET", "/api/serve/applications/").json()["applications"].get("fraud")
            assert app is None or app["status"] != "DEPLOY_FAILED", app
            return app is not None and app["status"] == "RUNNING"

        wait_for(running, timeout=240, what="the app to run")
        yield c
    finally:
        ray.stop()


def _answers(ray: LocalCluster) -> bool:
    try:
        return requests.get(
            f"{ray.dashboard_url}/api/v0/nodes", headers=ray.headers(), timeout=5
        ).ok
    except requests.RequestException:
        return False


def test_what_a_multi_node_cluster_leaves_open_beyond_loopback(cluster: Cluster) -> None:
    """Ray joins nodes only over a routable address: its GCS, raylets and agents then
    listen on every interface (protected by the token, not by the address). The
    Jobs API/dashboard and the Serve HTTP port stay on loopback as configured."""
    pids = [p for n in cluster.ray.nodes for p in descendants(n.process.pid)]
    sockets = listening(pids)
    open_ports = {port for addr, port, _pid in sockets if addr not in ("127.0.0.1", "::1")}
    print(f"listening beyond loopback: {sorted(open_ports)}")
    assert cluster.ray.gcs_port in open_ports  # what the README warns about
    serve_port = int(cluster.url.rsplit(":", 1)[1])
    assert cluster.ray.dashboard_port not in open_ports
    assert serve_port not in open_ports
    assert {port for _addr, port, _pid in sockets} >= {cluster.ray.dashboard_port, serve_port}


def test_jobs_api_refuses_a_call_without_the_token(cluster: Cluster) -> None:
    for method, path in (("GET", "/api/jobs/"), ("POST", "/api/jobs/")):
        refused = requests.request(
            method,
            cluster.ray.dashboard_url + path,
            json={"entrypoint": "echo hi"},
            timeout=TIMEOUT,
        )
        assert refused.status_code in (401, 403), (method, path, refused.text)
    assert cluster.api("GET", "/api/jobs/").status_code == 200


def test_two_nodes_serve_score_in_batch_and_survive_losing_one(
    cluster: Cluster,
    fraud_spec: PipelineSpec,
    demo_home: Path,
    holdout: pd.DataFrame,
    tmp_path: Path,
) -> None:
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    placed = cluster.replicas()
    assert len(set().union(*placed.values())) >= 2, placed  # replicas on both nodes

    fields = list(fraud_spec.request.fields)
    rows = holdout[fields].head(60).reset_index(drop=True)
    expected = in_process(Pipeline(fraud_spec, demo_home), rows)
    assert predict(cluster.url, client_records(rows)) == expected

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    frame = transactions(
        6000, customers=SMALL_DEMO["customers"], days=SMALL_DEMO["days"], bad_share=0.0
    )
    frame.iloc[:3000].to_parquet(source / "a.parquet")
    logs = cluster.batch_job(source, output)
    assert "3000 rows in from 1 file(s) -> 3000 scored" in logs
    batch = pd.concat(pd.read_parquet(p) for p in output.glob("run=*/*.parquet"))
    batch_expected = Pipeline(fraud_spec, demo_home).predict(frame.iloc[:3000])
    assert batch.set_index("transaction_id")["score"].sort_index().tolist() == (
        batch_expected.set_index("transaction_id")["score"].sort_index().tolist()
    )

    # A node dies: every process on it at once, as when a machine is lost.
    (worker,) = [n for n in cluster.ray.nodes if n.name == "worker1"]
    cluster.ray.kill(worker)
    started = time.monotonic()
    failures, streak = 0, 0
    while streak < 20:
        assert time.monotonic() - started < 120, f"no recovery: {failures} failed requests"
        try:
            if predict(cluster.url, client_records(rows)) == expected:
                streak += 1
                continue
        except (AssertionError, requests.RequestException):
            pass
        failures, streak = failures + 1, 0
        time.sleep(0.5)
    recovered = time.monotonic() - started
    print(f"node killed: {failures} failed requests, serving again in {recovered:.1f} s")
    wait_for(
        lambda: len(cluster.alive_nodes()) == 1, timeout=90, what="the dead node to be noticed"
    )
    (head,) = cluster.alive_nodes()
    assert set().union(*cluster.replicas().values()) == {head}

    # The next batch run, on what is left, scores the new file and only that.
    frame.iloc[3000:].to_parquet(source / "b.parquet")
    logs = cluster.batch_job(source, output)
    assert "3000 rows in from 1 file(s) -> 3000 scored" in logs
    ids = pd.concat(pd.read_parquet(p) for p in output.glob("run=*/*.parquet"))["transaction_id"]
    assert len(ids) == ids.nunique() == 6000
