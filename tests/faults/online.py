"""What the online fault tests share: request bodies, Serve's view of replicas, memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import requests

from bench.procmem import sample
from stageline.localray import descendants
from tests.conftest import GOOD_RECORD
from tests.integration.serve_helpers import app_details

Json = dict[str, Any]
TIMEOUT = 30.0
MIB = 2**20

TWO_REPLICAS: Json = {"num_cpus": 0.25, "autoscaling": {"min_replicas": 2, "max_replicas": 2}}
SHIPPED: Json = {"ingress": TWO_REPLICAS}
"""The shipped placement for ``fraud_variant``: every stage inline in two ingress replicas
(the test session's Ray holds other apps: a quarter CPU each)."""
PLACEMENTS: dict[str, Json] = {"shipped": SHIPPED, "per-stage": {"inline": []}}
"""The placements a fault is tried in: the shipped one, and one deployment per stage
(one replica each: nothing else to fall back on; the ingress cancels what it issued)."""


def one_record(i: int) -> Json:
    """Request ``i``: one valid record, its own transaction id, one of the demo's customers."""
    record = {**GOOD_RECORD, "transaction_id": f"t-{i}", "customer_id": f"c{i % 800:06d}"}
    return {"records": [record]}


def running_replicas(app: str, deployment: str) -> list[Any]:
    """Serve's details of the RUNNING replicas of ``deployment`` in ``app``."""
    replicas = app_details(app).deployments[deployment].replicas
    return [r for r in replicas if r.state == "RUNNING"]


def ready(url: str) -> requests.Response:
    return requests.get(f"{url}/readyz", timeout=TIMEOUT)


def proxy_pids() -> list[int]:
    """Serve's HTTP proxy process(es) of this test session's Ray."""
    return [pid for pid in descendants(os.getpid()) if _title(pid).startswith("ray::ProxyActor")]


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    except OSError:
        return ""


def memory_mib(pids: list[int]) -> tuple[float, float]:
    """(PSS, RSS) in MiB summed over ``pids`` (each with what it started)."""
    pss = rss = 0
    for pid in pids:
        s = sample(pid)
        pss, rss = pss + s.pss, rss + s.rss
    return pss / MIB, rss / MIB
