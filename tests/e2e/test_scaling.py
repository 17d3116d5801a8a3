"""The graph placement scales as the design card says, on a Ray of two nodes: under load
each stage deployment grows with its own cost (the model stage, several times the
others' cost, the most), every deployment returns to its minimum once the load is
gone, and no request fails while replicas come and go."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from bench.heavy import register_heavy_model
from tests.conftest import FRAUD_SPEC
from tests.faults.load import Load
from tests.faults.online import one_record
from tests.integration.serve_helpers import wait_for
from tests.multinode import Cluster

pytestmark = pytest.mark.e2e

APP = "scaling"

FAST = {"upscale_delay_s": 3.0, "downscale_delay_s": 8.0, "look_back_s": 3.0}
"""Quick autoscaling, so that the test takes a minute, not ten. Up after 3 s, not 1:
on two shared cores a replica starting takes a core for a few seconds, the others'
calls take longer meanwhile, and a busy share (wall time) that only spikes for that
long does not add a replica."""
TARGET_BUSY = 0.3
"""Stage replicas scale to be busy 30% of the time: on two cores the ingress and the
load generator take most of the CPU, and no stage gets near the default 70%."""
TREES = 3000
"""Trees of the model served (depth 8): its stage costs about 10x the feature lookup
per call of 50 rows. On two shared cores every replica waits for CPU, which adds the
same wall time to every stage's calls and brings their busy shares closer together:
the model has to cost much more than the rest for its busy share to stand out."""
RECORDS = 50
"""Records per request: the stages' work per row, not the per-request cost of HTTP,
is what the load is made of."""


def records(i: int) -> dict[str, list[dict[str, object]]]:
    """Request ``i``: ``RECORDS`` valid records of the demo's customers."""
    batch = [one_record(i * RECORDS + j)["records"][0] for j in range(RECORDS)]
    return {"records": batch}


def graph_spec(folder: Path) -> Path:
    """The demo spec, placed as a graph, every deployment free to scale from 1 to 3."""
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    for stage in data["stages"]:
        stage["serve"] = {
            **stage.get("serve", {}),
            "num_cpus": 0.1,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 3,
                "target_busy": TARGET_BUSY,
                **FAST,
            },
        }
    data["serve"]["placement"] = "graph"
    data["serve"]["ingress"]["num_cpus"] = 0.1
    data["serve"]["graph"] = {
        "ingress": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32, **FAST}
    }
    path = folder / "graph.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_each_stage_scales_with_its_cost_and_back_with_no_request_lost(
    multinode: Cluster, tmp_path: Path
) -> None:
    multinode.ensure_worker()
    model = register_heavy_model(multinode.home, trees=TREES)
    spec = graph_spec(tmp_path)
    multinode.deploy_beside(
        {
            "name": APP,
            "route_prefix": f"/{APP}",
            "import_path": "serve_app:build_app",
            "args": {
                "spec": str(spec),
                "home": str(multinode.home),
                "online": multinode.online,
                "model": model,
            },
        }
    )
    try:
        minimum = multinode.app_replicas(APP)
        assert set(minimum) == {"ingress", "features", "transform", "model", "postprocess"}
        assert set(minimum.values()) == {1}
        seen: dict[str, int] = defaultdict(int)
        timeline: list[str] = []
        began = time.monotonic()

        def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
            try:
                wait_for(condition, timeout, what, 0.5)
            except AssertionError as e:
                raise AssertionError(f"{e}; replicas over time: {timeline}") from None

        def sample() -> dict[str, int]:
            now = multinode.app_replicas(APP)
            for name, count in now.items():
                seen[name] = max(seen[name], count)
            line = " ".join(f"{n}={c}" for n, c in now.items())
            if not timeline or not timeline[-1].endswith(line):
                timeline.append(f"{time.monotonic() - began:.1f}s {line}")
            return now

        url = f"{multinode.url}/{APP}/predict"
        load = Load(url, records, concurrency=8, max_requests=10**6, max_seconds=240)
        load.start()
        until(
            lambda: sample()["model"] >= 2,
            timeout=120,
            what="the model stage to scale up",
        )
        busy = load.stop()
        at_drop = sample()
        under_load = dict(seen)  # the most replicas each had while the load was heavy

        # The load drops to one client: each deployment goes back to its minimum while
        # requests still come, and the replicas that go finish what they hold.
        light = Load(url, one_record, concurrency=1, max_requests=10**6, max_seconds=240)
        light.start()
        started = time.monotonic()
        until(
            lambda: sample() == minimum,
            timeout=120,
            what="every deployment back at its minimum",
        )
        down = time.monotonic() - started
        quiet = light.stop()
        assert at_drop != minimum, "nothing to scale down: the test would prove nothing"
    finally:
        multinode.deploy_beside(None)

    print(
        f"\nscaling on 2 nodes: max replicas under load {under_load}, over the run "
        f"{dict(seen)}; under 8 clients of {RECORDS} records "
        f"{busy.summary()}; back at the minimum {down:.1f} s after the load dropped, "
        f"under 1 client {quiet.summary()}; replicas over time: {timeline}"
    )
    # The model stage, the costliest, got the most replicas; the feature lookup fewer.
    assert under_load["model"] >= 2
    assert under_load["model"] > under_load["features"], under_load
    assert busy.failures() == [], busy.failures()[:3]
    assert quiet.failures() == [], quiet.failures()[:3]
    assert busy.statuses()[200] > 100
    assert quiet.statuses()[200] > 0
