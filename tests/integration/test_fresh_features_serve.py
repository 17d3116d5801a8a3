"""A running server serves what ``stageline materialize`` writes, without a restart, and
exports each view's snapshot age on Ray's Prometheus endpoint; the response cache
answers a record again until that new snapshot, and counts its hits there."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml

from stageline.features import OfflineStore, materialize
from stageline.spec import PipelineSpec, load_spec
from tests.conftest import FRAUD_SPEC, GOOD_RECORD, deploy_app
from tests.integration.serve_helpers import delete_apps
from tests.integration.test_metrics import scrape, series

pytestmark = pytest.mark.integration

APP = "fresh"
VIEW = "customer_stats"


@pytest.fixture(scope="module")
def fresh(
    serve_base: str, demo_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, Path, PipelineSpec]]:
    """The demo pipeline on a home of its own (it is materialized again here), checking
    its snapshot every half second, with the response cache on."""
    folder = tmp_path_factory.mktemp("fresh")
    home = folder / "home"
    shutil.copytree(demo_home, home, ignore=shutil.ignore_patterns("logs", "reports"))
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    data["features"]["online"] = {"kind": "memory", "refresh_s": 0.5}
    data.setdefault("serve", {})["response_cache"] = {}
    path = folder / "fraud-fresh.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(path)
    url = deploy_app(serve_base, APP, spec=str(path), home=str(home))
    try:
        yield url, home, spec
    finally:
        delete_apps([APP])


def score(url: str) -> float:
    resp = requests.post(f"{url}/predict", json={"records": [GOOD_RECORD]}, timeout=30)
    assert resp.status_code == 200, resp.text
    return float(resp.json()["predictions"][0]["score"])


def test_a_running_server_serves_a_new_materialized_snapshot(
    fresh: tuple[str, Path, PipelineSpec],
) -> None:
    url, home, spec = fresh
    before = score(url)
    assert score(url) == before  # the response cache's answer: the same

    # The customer's newest values change (a much higher 30-day average), then
    # `stageline materialize` runs, as a schedule would.
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    history = offline.read(VIEW)
    newest = history[history["customer_id"] == GOOD_RECORD["customer_id"]].tail(1)
    changed = newest.assign(
        avg_amount_30d=newest["avg_amount_30d"] * 50,
        event_time=newest["event_time"] + pd.Timedelta(days=1),
    )
    offline.write(VIEW, pd.concat([history, changed], ignore_index=True))
    materialize(spec, home)

    deadline = time.monotonic() + 60  # a busy machine: generous, not a timing claim
    while (after := score(url)) == before:
        assert time.monotonic() < deadline, "the server still serves the old snapshot"
        time.sleep(0.5)
    assert after != before

    # Ray pushes metrics every few seconds: wait for the age gauge and the cache's hits.
    app = {"application": APP}
    deadline = time.monotonic() + 90
    while True:
        text = scrape()
        ages = series(text, "ray_stageline_feature_age_s", view=VIEW, **app)
        hits = series(text, "ray_stageline_response_cache_lookups_total", result="hit", **app)
        if ages and hits:
            break
        assert time.monotonic() < deadline, f"metrics missing: age {ages}, cache hits {hits}"
        score(url)
        time.sleep(2)
    assert all(0 <= age < 3600 for age in ages), ages
    assert sum(hits) >= 1
