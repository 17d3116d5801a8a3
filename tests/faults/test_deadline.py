"""Case 5: a stage slowed past the request deadline, under a steady load, behind Serve's
proxy and behind HAProxy."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import GOOD_RECORD
from tests.faults.load import Load
from tests.faults.online import PLACEMENTS, TIMEOUT, Json, one_record, served
from tests.integration.serve_helpers import fraud_variant, wait_for

STAGES = '''\
"""A stage that is slow for some requests, and one that notes what reached the end."""

import os
import time


def note(path, line):
    with open(path, "a") as f:
        f.write(line + "\\n")


class SlowFor:
    """Sleeps ``seconds`` on a batch holding a transaction whose id starts with ``prefix``."""

    def __init__(self, seconds, prefix, log):
        self.seconds, self.prefix, self.log = seconds, prefix, log

    def __call__(self, batch):
        slow = batch["transaction_id"].str.startswith(self.prefix)
        ids = " ".join(batch["transaction_id"][slow])
        if ids:
            note(self.log, f"slow-start {ids}")
            time.sleep(self.seconds)
            note(self.log, f"slow-done {ids}")
        return batch


class Witness:
    """Notes every transaction id it is called with: what got through the whole chain."""

    def __init__(self, log):
        self.log = log

    def __call__(self, batch):
        note(self.log, "seen " + " ".join(batch["transaction_id"]))
        return batch
'''

DEADLINE_S = 2.0
SLOW_S = 6.0


# Each placement behind Serve's proxy; the shipped one behind HAProxy as well, as
# `stageline serve` runs it.
CASES = [(placement, "serve-proxy") for placement in PLACEMENTS] + [("shipped", "haproxy")]


@pytest.mark.parametrize(("placement", "mode"), CASES)
def test_slow_stage_past_the_deadline_is_504_and_the_rest_never_runs(
    request: pytest.FixtureRequest, tmp_path: Path, placement: str, mode: str
) -> None:
    """A request that makes the first stage sleep 6 s, against a 2 s deadline, while 2
    clients send ordinary requests: the slow request gets a 504 at the deadline; no
    stage after the slow one ever sees it (the work downstream is cancelled); the
    ordinary requests that started after it all succeed."""
    log = tmp_path / "stages.log"
    light = {"num_cpus": 0.1, "batch": None}
    slow: Json = {
        "name": "slow",
        "uses": "fault_stages.py:SlowFor",
        "params": {"seconds": SLOW_S, "prefix": "slow", "log": str(log)},
        "serve": light,
    }
    witness: Json = {
        "name": "witness",
        "uses": "fault_stages.py:Witness",
        "params": {"log": str(log)},
        "serve": light,
    }
    serve_options = {**PLACEMENTS[placement], "request_timeout_s": DEADLINE_S}
    spec = fraud_variant(tmp_path, serve=serve_options, files={"fault_stages.py": STAGES})
    add_stages(spec, first=slow, last=witness, inline=placement == "shipped")
    name = f"fault-deadline-{placement}"
    with served(mode, name, spec, request, tmp_path) as app:
        url = app.url
        load = Load(f"{url}/predict", one_record, concurrency=2, max_seconds=60)
        load.start()
        load.wait_for(lambda r: r.statuses()[200] >= 10, 30, "10 answers before the slow one")
        sent_at = load.now()
        slow_record = {**GOOD_RECORD, "transaction_id": "slow-1"}
        resp = requests.post(f"{url}/predict", json={"records": [slow_record]}, timeout=TIMEOUT)
        answered_at = load.now()
        wait_for(lambda: "slow-done slow-1" in log.read_text(), 30, "the slow stage to finish")
        load.wait(1)
        report = load.stop()

    seen = [line for line in log.read_text().splitlines() if line.startswith("seen ")]
    after = report.between(answered_at)
    print(
        f"\ncase 5 deadline ({placement}, {mode}): load 2 clients closed loop; fault one request "
        f"slowed {SLOW_S:g} s in the first stage, deadline {DEADLINE_S:g} s: "
        f"{resp.status_code} after {answered_at - sent_at:.2f} s; the last stage saw it: "
        f"{any('slow-1' in line for line in seen)}; {report.summary()}; "
        f"{len(after)} requests after the 504, failed {len(report.failures(after))} "
        f"(timeline {report.timeline()})"
    )
    assert resp.status_code == 504, resp.text
    body = resp.json()
    assert body["error"]["code"] == "deadline_exceeded"
    assert f"{DEADLINE_S:g} s deadline" in body["error"]["message"]
    assert body["request_id"] == resp.headers["x-request-id"]
    assert answered_at - sent_at < SLOW_S - 1, "the client waited for the slow stage"
    assert not any("slow-1" in line for line in seen), seen
    assert len(seen) > 0
    assert len(after) > 0
    assert report.failures(after) == [], report.failures(after)[:3]


def add_stages(
    spec: Path, *, first: dict[str, object], last: dict[str, object], inline: bool
) -> None:
    """Put ``first`` before the spec's stages and ``last`` after them (inline if asked)."""
    data = yaml.safe_load(spec.read_text())
    data["stages"] = [first, *data["stages"], last]
    if inline:
        data["serve"]["inline"] = [s["name"] for s in data["stages"]]
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
