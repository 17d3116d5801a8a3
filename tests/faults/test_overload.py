"""Case 3: five times the capacity offered, against the shipped overload guard, behind
Serve's proxy and behind HAProxy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.faults.load import Load
from tests.faults.online import MODES, TWO_REPLICAS, Json, memory_mib, one_record, served
from tests.integration.serve_helpers import fraud_variant

APP = "fault-overload"

HEAVY_STAGE = '''\
"""A model that costs 50 ms per row: capacity is set by rows, not by the client."""

import time


class Heavy:
    def __init__(self, seconds_per_row):
        self.seconds_per_row = seconds_per_row

    def __call__(self, batch):
        time.sleep(self.seconds_per_row * len(batch))
        return batch
'''

# The shipped placement and guard (every stage in two ingress replicas, requests merged,
# each replica taking max_ongoing + max_queued requests), with small bounds so the test
# is quick.
INGRESS: Json = {
    **TWO_REPLICAS,
    "max_ongoing_requests": 4,
    "max_queued_requests": 8,
}
OVERLOAD_FACTOR = 5
OVERLOAD_S = 6.0


@pytest.mark.parametrize("mode", MODES)
def test_five_times_capacity_gets_fast_503s_and_the_accepted_requests_stay_fast(
    request: pytest.FixtureRequest, tmp_path: Path, mode: str
) -> None:
    """Capacity measured with a closed loop (8 clients: every ingress slot busy), then an
    open loop offering 5x that for 6 s. Every answer is a 200 or a fast 503 in our JSON
    shape with Retry-After (no timeout, no 500, no plain text); the 200s keep a bounded
    p99; the memory of the proxy (Serve's or HAProxy) and the replicas stays bounded;
    afterwards every request succeeds again."""
    spec = fraud_variant(tmp_path, serve={"ingress": INGRESS}, files={"heavy.py": HEAVY_STAGE})
    data = yaml.safe_load(spec.read_text())
    heavy = {"name": "heavy", "uses": "heavy.py:Heavy", "params": {"seconds_per_row": 0.05}}
    data["stages"].insert(0, heavy)
    data["serve"]["inline"] = [s["name"] for s in data["stages"]]
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    with served(mode, APP, spec, request, tmp_path) as app:
        url = app.url
        pids = app.ingress_pids() + app.front_pids()
        assert len(pids) >= 3, pids
        clients = 2 * INGRESS["max_ongoing_requests"]
        capacity = Load(f"{url}/predict", one_record, concurrency=clients, max_seconds=30).run(4)
        rate = capacity.rate()
        memory_before = memory_mib(pids)
        overload = Load(
            f"{url}/predict",
            one_record,
            concurrency=64,
            rate=OVERLOAD_FACTOR * rate,
            max_seconds=OVERLOAD_S,
            timeout_s=10,
        ).run(OVERLOAD_S + 15)
        memory_after = memory_mib(pids)
        recovery = Load(f"{url}/predict", one_record, concurrency=2, max_seconds=30).run(3)

    rejected = [a for a in overload.attempts if a.status == 503]
    offered = overload.requests / overload.seconds
    print(
        f"\ncase 3 overload ({mode}): capacity {rate:.0f} req/s ({capacity.summary()}); offered "
        f"{offered:.0f} req/s open loop ({OVERLOAD_FACTOR}x) for {OVERLOAD_S:g} s, "
        f"{overload.late} sent late by the client: {overload.summary()}; 503s "
        f"{len(rejected)}, p99 {overload.latency(0.99, 503) * 1000:.0f} ms, max "
        f"{max((a.latency for a in rejected), default=0) * 1000:.0f} ms, body "
        f"{rejected[0].body if rejected else None!r}; accepted "
        f"{overload.rate():.0f} req/s p99 {overload.latency(0.99) * 1000:.0f} ms; "
        f"memory of proxy + {len(pids) - 1} ingress replicas PSS/RSS "
        f"{memory_before[0]:.0f}/{memory_before[1]:.0f} MiB before, "
        f"{memory_after[0]:.0f}/{memory_after[1]:.0f} MiB after; recovery "
        f"{recovery.summary()}"
    )
    assert set(overload.statuses()) <= {200, 503}, overload.statuses()
    assert len(rejected) > overload.requests / 2, "5x capacity, yet most requests were served"
    assert all(a.retry_after == "1" for a in rejected), rejected[:3]
    not_ours = [(a.request, a.body) for a in rejected if not unavailable(a.body)]
    assert not not_ours, f"{len(not_ours)} 503s not in our JSON shape, e.g. {not_ours[:3]}"
    assert max(a.latency for a in rejected) < 2.0, "a rejection was not fast"
    assert overload.latency(0.99) < 5.0, "accepted requests waited without bound"
    assert memory_after[0] - memory_before[0] < 200, (memory_before, memory_after)
    assert recovery.statuses() == {200: len(recovery.attempts)}, recovery.statuses()


def unavailable(body: str) -> bool:
    """Our JSON 503: ``{"error": {"status": 503, "code": "unavailable", ...}, "request_id"}``."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    error = parsed.get("error", {})
    return error.get("code") == "unavailable" and bool(parsed.get("request_id"))
