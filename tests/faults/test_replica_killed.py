"""Case 1: a replica killed mid-load: a model replica behind the ingress, and an ingress
replica of the shipped server."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import ray

from tests.conftest import FRAUD_SPEC, deploy_app
from tests.faults.load import Load
from tests.faults.online import Served, one_record, running_replicas, served
from tests.integration.serve_helpers import delete_apps, fraud_variant, wait_for
from tests.support.processes import listening

APP = "fault-kill"
RECOVERY_S = 60.0
"""Bound on Serve replacing a killed replica (its health check runs every 10 s)."""

SLOW_MODEL = '''\
"""The demo model made heavier (100 ms a call), so a replica always has work in flight."""

import time

from stageline.stages.model import XGBoostPredictor


class SlowPredictor(XGBoostPredictor):
    def process(self, batch):
        time.sleep(0.1)
        return super().process(batch)
'''


def test_model_replica_killed_mid_load(serve_base: str, demo_home: Path, tmp_path: Path) -> None:
    """One deployment per stage, the model (100 ms a call) at two replicas; one is killed
    (``ray.kill``) under 8 clients that retry a failure once. A request caught on the dead
    replica gets a 503 with Retry-After and its retry succeeds; Serve is back to two
    replicas within the bound; after that not one request fails."""
    model = {
        "uses": "slow_model.py:SlowPredictor",
        "serve": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
    }
    spec = fraud_variant(
        tmp_path,
        serve={"inline": []},
        stages={"model": model},
        files={"slow_model.py": SLOW_MODEL},
    )
    url = deploy_app(serve_base, APP, spec=str(spec), home=str(demo_home))
    try:
        victim, _ = running_replicas(APP, "model")
        load = Load(f"{url}/predict", one_record, concurrency=8, max_seconds=120, retry=True)
        load.start()
        load.wait_for(lambda r: r.statuses()[200] >= 50, 30, "50 answers before the fault")
        killed_at = load.now()
        ray.kill(ray.get_actor(victim.actor_name, namespace="serve"), no_restart=True)

        def replaced() -> bool:
            ids = {r.replica_id for r in running_replicas(APP, "model")}
            return len(ids) == 2 and victim.replica_id not in ids

        wait_for(replaced, RECOVERY_S, "Serve to replace the killed model replica", 0.25)
        recovered_at = load.now()
        load.wait(3)
        report = load.stop()
    finally:
        delete_apps([APP])

    failed = report.failures()
    after = report.between(recovered_at)
    offsets = [a.started - killed_at for a in failed] or [0.0]
    print(
        f"\ncase 1 replica killed: load 8 clients closed loop, one retry after Retry-After; "
        f"fault ray.kill(model replica 1 of 2) at {killed_at:.1f} s; {report.summary()}; "
        f"failed attempts {len(failed)} {dict(report.statuses(failed))}, sent "
        f"{min(offsets):+.2f} to {max(offsets):+.2f} s from the kill, all retried successfully: "
        f"{all(a.ok for a in report.final())}; replica count back to 2 after "
        f"{recovered_at - killed_at:.1f} s (bound {RECOVERY_S:g} s); after that "
        f"{len(after)} requests, failed {len(report.failures(after))}"
    )
    assert [a for a in report.final() if not a.ok] == []  # every failure, retried, succeeded
    assert all(a.attempt == 1 for a in failed)
    for attempt in failed:
        assert attempt.status == 503, attempt
        assert attempt.retry_after == "1", attempt
        assert '"code":"unavailable"' in attempt.body, attempt
    assert report.failures(after) == []
    assert len(after) > 0


CLIENTS = 32
LOAD_S = 20.0


def test_ingress_replica_killed_under_load_loses_no_request(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``stageline serve`` as shipped (HAProxy, two ingress replicas), 32 clients that
    never retry; one ingress replica is SIGKILLed (as the OOM killer does) a moment in,
    and the load runs on for 20 s. HAProxy sends each request that was on the dead
    replica, or that it sent there before it knew, to the other one: not one client
    sees a failure. Serve starts a replacement, and that one joins without a failure
    either. The victim is the replica HAProxy fills last, the harder case: the other
    one is full (FILL_FIRST), so a retry may land on the dead one again."""
    with served("haproxy", "fraud", FRAUD_SPEC, request, tmp_path) as app:
        wait_for(lambda: len(app.ingress_pids()) == 2, 60, "two ingress replicas")
        victim = last_replica(app)
        load = Load(
            f"{app.url}/predict",
            one_record,
            concurrency=CLIENTS,
            max_requests=10**6,
            max_seconds=120,
        )
        load.start()
        load.wait_for(lambda r: r.statuses()[200] >= 200, 30, "200 answers before the fault")
        killed_at = load.now()
        os.kill(victim, signal.SIGKILL)

        def replaced() -> bool:
            pids = set(app.ingress_pids())
            return len(pids) == 2 and victim not in pids

        wait_for(replaced, RECOVERY_S, "Serve to replace the killed ingress replica", 0.25)
        recovered_at = load.now()
        load.wait(max(3.0, killed_at + LOAD_S - load.now()))
        report = load.stop()

    failed = report.failures()
    after = report.between(killed_at)
    print(
        f"\ncase 1 ingress replica killed (HAProxy mode): load {CLIENTS} clients closed "
        f"loop, no retry; fault SIGKILL(the ingress replica filled last, of 2) at "
        f"{killed_at:.1f} s; "
        f"{report.summary()}; {len(after)} requests from the kill on; failed "
        f"{len(failed)} {dict(report.statuses(failed))} {[a.body for a in failed[:3]]}; "
        f"replacement running after {recovered_at - killed_at:.1f} s "
        f"(timeline {report.timeline()})"
    )
    assert failed == []
    assert len(report.between(recovered_at)) > 0


def last_replica(app: Served) -> int:
    """The ingress replica HAProxy fills last (its line has no ``maxconn``): its pid, once
    HAProxy runs a config that lists both (Serve reloads it as the second one comes)."""

    def uncapped() -> list[int]:
        config = app.haproxy_config() or ""
        lines = [line.split() for line in config.splitlines() if "server SERVE_REPLICA_" in line]
        if len(lines) != 2:
            return []
        ports = [int(words[2].rsplit(":", 1)[1]) for words in lines if "maxconn" not in words]
        return ports if len(ports) == 1 else []

    ports = wait_for(uncapped, 60, "HAProxy routing to both, one filled last")
    owners = [pid for _addr, port, pid in listening(app.ingress_pids()) if port == ports[0]]
    assert len(owners) == 1, (ports, owners)
    return owners[0]
