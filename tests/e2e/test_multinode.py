"""Past one machine, on one machine: a Ray cluster of two nodes (two raylets,
``ray start``), token authentication on, Redis as the online store (the ``multinode``
fixture, tests/multinode.py). The Serve app goes on with ``serve deploy`` of
cluster/serve.yaml, the batch pipeline through the Jobs API; then a node is killed
and both keep working.

The control plane's security (issue 7, case 13: the Jobs API refuses calls without the
token; what a cluster leaves open beyond loopback) is tested here, beside the cluster it
needs, and belongs to the fault suite (``-m faults``) too. A worker node killed in the
middle of a batch run is in tests/faults/test_batch_faults.py, on the same cluster."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
import requests

from stageline import Pipeline
from stageline.demo.batch import transactions
from stageline.spec import PipelineSpec
from tests.conftest import SMALL_DEMO
from tests.integration.serve_helpers import client_records, in_process, predict, wait_for
from tests.multinode import TIMEOUT, Cluster
from tests.support.processes import descendants, listening, process_name

pytestmark = pytest.mark.e2e


@pytest.mark.faults
def test_what_a_multi_node_cluster_leaves_open_beyond_loopback(multinode: Cluster) -> None:
    """Ray joins nodes only over a routable address: its GCS, raylets and agents then
    listen on every interface (protected by the token, not by the address). The
    Jobs API/dashboard and the Serve HTTP port stay on loopback as configured."""
    serve_port = int(multinode.url.rsplit(":", 1)[1])  # the app deployed, listening
    pids = [p for n in multinode.ray.nodes for p in descendants(n.process.pid)]
    sockets = listening(pids)
    beyond = [(port, pid) for addr, port, pid in sockets if addr not in ("127.0.0.1", "::1")]
    open_ports = {port for port, _pid in beyond}
    by_process = Counter(process_name(pid) for _port, pid in beyond)
    print(
        f"listening beyond loopback on 2 nodes: {len(open_ports)} ports: "
        + ", ".join(f"{name} x{n}" for name, n in sorted(by_process.items()))
    )
    assert multinode.ray.gcs_port in open_ports  # what the README warns about
    assert multinode.ray.dashboard_port not in open_ports
    assert serve_port not in open_ports
    assert {port for _addr, port, _pid in sockets} >= {multinode.ray.dashboard_port, serve_port}


@pytest.mark.faults
def test_jobs_api_refuses_a_call_without_the_token(multinode: Cluster) -> None:
    refused = {}
    for method, path in (("GET", "/api/jobs/"), ("POST", "/api/jobs/")):
        resp = requests.request(
            method,
            multinode.ray.dashboard_url + path,
            json={"entrypoint": "echo hi"},
            timeout=TIMEOUT,
        )
        refused[f"{method} {path}"] = resp.status_code
        assert resp.status_code in (401, 403), (method, path, resp.text)
    with_token = multinode.api("GET", "/api/jobs/").status_code
    print(f"Jobs API without the token: {refused}; with it: GET {with_token}")
    assert with_token == 200


def test_two_nodes_serve_score_in_batch_and_survive_losing_one(
    multinode: Cluster,
    fraud_spec: PipelineSpec,
    demo_home: Path,
    holdout: pd.DataFrame,
    tmp_path: Path,
) -> None:
    worker = multinode.ensure_worker()
    url = multinode.url
    assert len(multinode.alive_nodes()) == 2
    placed = multinode.replicas()
    assert len(set().union(*placed.values())) >= 2, placed  # replicas on both nodes

    fields = list(fraud_spec.request.fields)
    rows = holdout[fields].head(60).reset_index(drop=True)
    expected = in_process(Pipeline(fraud_spec, demo_home), rows)
    assert predict(url, client_records(rows)) == expected

    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    frame = transactions(
        6000, customers=SMALL_DEMO["customers"], days=SMALL_DEMO["days"], bad_share=0.0
    )
    frame.iloc[:3000].to_parquet(source / "a.parquet")
    logs = multinode.batch_job(source, output)
    assert "3000 rows in from 1 file(s) -> 3000 scored" in logs
    batch = pd.concat(pd.read_parquet(p) for p in output.glob("run=*/*.parquet"))
    batch_expected = Pipeline(fraud_spec, demo_home).predict(frame.iloc[:3000])
    assert batch.set_index("transaction_id")["score"].sort_index().tolist() == (
        batch_expected.set_index("transaction_id")["score"].sort_index().tolist()
    )

    # A node dies: every process on it at once, as when a machine is lost.
    multinode.ray.kill(worker)
    started = time.monotonic()
    failures, streak = 0, 0
    while streak < 20:
        assert time.monotonic() - started < 120, f"no recovery: {failures} failed requests"
        try:
            if predict(url, client_records(rows)) == expected:
                streak += 1
                continue
        except (AssertionError, requests.RequestException):
            pass
        failures, streak = failures + 1, 0
        time.sleep(0.5)
    recovered = time.monotonic() - started
    print(f"node killed: {failures} failed requests, serving again in {recovered:.1f} s")
    wait_for(
        lambda: len(multinode.alive_nodes()) == 1, timeout=90, what="the dead node to be noticed"
    )
    (head,) = multinode.alive_nodes()
    # Serve's list of replicas catches up a little after Ray declares the node dead;
    # until then it still shows the lost node's replicas.
    wait_for(
        lambda: set().union(*multinode.replicas().values()) == {head},
        timeout=60,
        what="Serve to list only the surviving node's replicas",
    )

    # The next batch run, on what is left, scores the new file and only that.
    frame.iloc[3000:].to_parquet(source / "b.parquet")
    logs = multinode.batch_job(source, output)
    assert "3000 rows in from 1 file(s) -> 3000 scored" in logs
    ids = pd.concat(pd.read_parquet(p) for p in output.glob("run=*/*.parquet"))["transaction_id"]
    assert len(ids) == ids.nunique() == 6000
