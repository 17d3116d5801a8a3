"""Champion and challenger over HTTP on the session's Ray Serve: the model stage in a
deployment of its own, a shadow challenger from the spec, then a canary switched in at
run time (a ``user_config`` change, as ``stageline serve --challenger`` makes)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests

from stageline.challenger import in_canary
from stageline.demo.train import DemoResult
from stageline.predlog import read_log
from stageline.spec import PipelineSpec
from tests.conftest import deploy_app, register_challenger
from tests.integration.serve_helpers import (
    TIMEOUT,
    client_records,
    delete_apps,
    fraud_variant,
    replica_ids,
    wait_for,
)

pytestmark = pytest.mark.integration

APP = "challenger"
# The model stage in a deployment of its own (what reloads through user_config), the
# other stages inline in the ingress.
SERVE = {"inline": ["features", "transform", "postprocess"]}


def post(url: str, records: list[dict[str, Any]]) -> list[tuple[str, int]]:
    """Each record's id and the model version that answered it."""
    resp = requests.post(f"{url}/predict", json={"records": records}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return [
        (p["transaction_id"], int(p.get("model", body["model"])["version"]))
        for p in body["predictions"]
    ]


def test_shadow_answers_the_champion_then_a_canary_switched_in_answers_a_sticky_share(
    serve_base: str,
    demo: DemoResult,
    tmp_path: Path,
    holdout: pd.DataFrame,
    fraud_spec: PipelineSpec,
) -> None:
    home = tmp_path / "home"
    shutil.copytree(demo.home, home, ignore=shutil.ignore_patterns("logs"))
    assert register_challenger(home) == 2
    spec = fraud_variant(
        tmp_path / "spec",
        serve=SERVE,
        stages={"model": {"challenger": {"alias": "challenger", "mode": "shadow"}}},
    )
    rows = holdout.head(300)
    records = client_records(rows[list(fraud_spec.request.fields)])
    url = deploy_app(serve_base, APP, spec=str(spec), home=str(home))
    try:
        # Shadow: every answer is the champion's; the log has both models' scores.
        shadowed = [a for i in range(0, 60, 10) for a in post(url, records[i : i + 10])]
        assert {version for _, version in shadowed} == {1}
        models = requests.get(f"{url}/models", timeout=TIMEOUT).json()["models"]
        [model] = [m for m in models if m["stage"] == "model"]
        assert (model["version"], model["challenger"]["version"]) == (1, 2)
        assert model["challenger"]["mode"] == "shadow"
        log = home / "logs" / "fraud"

        wait_for(lambda: len(read_log(log)) >= 60, timeout=30, what="the 60 logged predictions")
        logged = read_log(log)
        assert len(logged) == 60
        assert set(logged["score_version"]) == {1}
        assert set(logged["score_challenger_version"]) == {2}
        assert set(logged["score_mode"]) == {"shadow"}
        before = replica_ids(APP)

        # A canary switched in at run time: the same replicas, reconfigured.
        canary = {"model": "fraud@challenger", "mode": "canary", "share": 0.5}
        canary["sticky_by"] = "customer_id"
        deploy_app(serve_base, APP, spec=str(spec), home=str(home), challenger=canary)
        assert replica_ids(APP) == before
        first = dict(a for i in range(0, 300, 10) for a in post(url, records[i : i + 10]))
        again = dict(a for i in range(0, 300, 25) for a in post(url, records[i : i + 25]))
    finally:
        delete_apps([APP])

    assert again == first  # sticky: the same record, the same model, however batched
    expected = in_canary(rows["customer_id"], 0.5)
    answered = [first[t] for t in rows["transaction_id"]]
    assert answered == [2 if e else 1 for e in expected]
    by_customer = pd.DataFrame({"customer": rows["customer_id"], "version": answered})
    assert (by_customer.groupby("customer")["version"].nunique() == 1).all()
    customers = by_customer.groupby("customer")["version"].first()
    n, sigma = len(customers), (len(customers) * 0.25) ** 0.5
    assert abs((customers == 2).sum() - n / 2) < 4 * sigma
