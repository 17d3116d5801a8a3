"""Case 2: a redeploy whose replicas all crash in ``__init__`` (bad params)."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from ray import serve

from tests.conftest import deploy_app
from tests.faults.load import Load
from tests.faults.online import SHIPPED, one_record, ready, running_replicas
from tests.integration.serve_helpers import delete_apps, fraud_variant, wait_for

APP = "fault-bad-deploy"
BAD_MODEL = "fraud-typo"
"""The model stage's ``model`` param in the bad version: no such model in the registry."""


def reported(url: str, status: str) -> requests.Response | None:
    """``/readyz`` if it reports the app's status as ``status`` (it may lag ~1 s)."""
    probe = ready(url)
    return probe if probe.ok and probe.json()["app"]["status"] == status else None


def test_redeploy_that_crashes_in_init_keeps_the_old_version_serving(
    serve_base: str, demo_home: Path, tmp_path: Path
) -> None:
    """The shipped placement redeployed with the model stage's params naming a model the
    registry lacks: every new replica raises in ``__init__``. Under load, the running
    version keeps answering (not one request fails); Serve's status and ``/readyz``
    report the failed rollout with the stage's error; redeploying the good spec clears it."""
    good = fraud_variant(tmp_path / "good", serve=SHIPPED)
    bad = fraud_variant(
        tmp_path / "bad",
        serve=SHIPPED,
        stages={"model": {"params": {"model": BAD_MODEL, "alias": "champion", "reasons": 3}}},
    )
    url = deploy_app(serve_base, APP, spec=str(good), home=str(demo_home))
    try:
        serving = {r.replica_id for r in running_replicas(APP, "ingress")}
        load = Load(f"{url}/predict", one_record, concurrency=4, max_seconds=120)
        load.start()
        load.wait_for(lambda r: r.statuses()[200] >= 30, 30, "30 answers before the redeploy")
        fault_at = load.now()
        with pytest.raises(RuntimeError, match=f"Deploying application {APP} failed"):
            deploy_app(serve_base, APP, spec=str(bad), home=str(demo_home))
        failed_at = load.now()
        status = serve.status().applications[APP]
        probe = wait_for(lambda: reported(url, "DEPLOY_FAILED"), 10, "/readyz to report it")
        load.wait(2)
        still = {r.replica_id for r in running_replicas(APP, "ingress")}
        deploy_app(serve_base, APP, spec=str(good), home=str(demo_home))
        fixed = wait_for(lambda: reported(url, "RUNNING"), 10, "/readyz to clear it")
        report = load.stop()
    finally:
        delete_apps([APP])

    ingress = status.deployments["ingress"]
    print(
        f"\ncase 2 bad redeploy: load 4 clients closed loop, no retry; fault redeploy with "
        f"model={BAD_MODEL!r} at {fault_at:.1f} s, DEPLOY_FAILED after "
        f"{failed_at - fault_at:.1f} s; {report.summary()}; failed {len(report.failures())}; "
        f"serve status: app {status.status.value} {status.message!r}, ingress "
        f"{ingress.status.value} ...{ingress.message[-200:]!r}; "
        f"/readyz {probe.status_code} {probe.text}"
    )
    assert report.failures() == [], report.failures()[:3]
    assert still == serving  # the old replicas, untouched
    assert status.status == "DEPLOY_FAILED"
    assert ingress.status == "DEPLOY_FAILED"
    assert BAD_MODEL in ingress.message
    assert probe.status_code == 200, probe.text
    body = probe.json()
    assert body["ready"] is True
    assert body["app"]["status"] == "DEPLOY_FAILED"
    assert BAD_MODEL in body["app"]["deployments"]["ingress"]["message"]
    assert fixed.json()["app"] == {"name": APP, "status": "RUNNING"}
