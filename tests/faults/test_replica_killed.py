"""Case 1: a model replica killed mid-load."""

from __future__ import annotations

from pathlib import Path

import ray

from tests.conftest import deploy_app
from tests.faults.load import Load
from tests.faults.online import one_record, running_replicas
from tests.integration.serve_helpers import delete_apps, fraud_variant, wait_for

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
