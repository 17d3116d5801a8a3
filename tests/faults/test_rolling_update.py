"""Case 7: a real redeploy (new replicas, not a ``user_config`` reload) under load."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import deploy_app
from tests.faults.load import Load, Report
from tests.faults.online import PLACEMENTS, one_record, running_replicas
from tests.integration.serve_helpers import delete_apps, fraud_variant

APP = "fault-rollout"


def reasons_in(report: Report, start: float = 0.0) -> set[int]:
    """How many reason codes the 200s that started after ``start`` carried."""
    return {
        len(json.loads(a.body)["predictions"][0]["reasons"]) for a in report.between(start) if a.ok
    }


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_redeploy_with_new_stage_options_under_load_drops_nothing(
    serve_base: str, demo_home: Path, tmp_path: Path, placement: str
) -> None:
    """The app redeployed with the model stage's ``reasons`` changed from 3 to 2 while 4
    clients send requests: every replica is replaced, and not one request fails (no
    client retry)."""
    # Every record explained (not only those labelled positive), so each answer shows
    # which version gave it.
    model = {"model": "fraud", "alias": "champion", "reasons_for": "all"}
    v1 = fraud_variant(
        tmp_path / "v1",
        serve=PLACEMENTS[placement],
        stages={"model": {"params": {**model, "reasons": 3}}},
    )
    v2 = fraud_variant(
        tmp_path / "v2",
        serve=PLACEMENTS[placement],
        stages={"model": {"params": {**model, "reasons": 2}}},
    )
    url = deploy_app(serve_base, APP, spec=str(v1), home=str(demo_home))
    try:
        before = {r.replica_id for r in running_replicas(APP, "ingress")}
        load = Load(f"{url}/predict", one_record, concurrency=4, max_seconds=120)
        load.start()
        load.wait_for(lambda r: r.statuses()[200] >= 50, 30, "50 answers before the redeploy")
        started_at = load.now()
        started = time.monotonic()
        deploy_app(serve_base, APP, spec=str(v2), home=str(demo_home))
        rollout_s = time.monotonic() - started
        done_at = load.now()
        load.wait(2)
        report = load.stop()
        after = {r.replica_id for r in running_replicas(APP, "ingress")}
    finally:
        delete_apps([APP])

    print(
        f"\ncase 7 rolling update ({placement}): load 4 clients closed loop, no retry; "
        f"fault redeploy (model reasons 3 -> 2, all {len(before)} ingress replicas replaced) at "
        f"{started_at:.1f} s, running again after {rollout_s:.1f} s; {report.summary()}; "
        f"failed {len(report.failures())} (timeline {report.timeline()}); "
        f"{len(report.between(started_at, done_at))} requests during the rollout"
    )
    assert report.failures() == [], report.failures()[:3]
    assert report.statuses() == {200: len(report.attempts)}
    assert before.isdisjoint(after)
    assert reasons_in(report, 0) == {2, 3}
    assert reasons_in(report, done_at + 1) == {2}
