"""The prediction log of a real ``stageline serve``: every answered prediction is
logged with the request id its client got, a SIGTERM writes what was still buffered,
and an unwritable sink fails no request and shows its drops on the Prometheus endpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from stageline.demo.train import DemoResult
from stageline.predlog import read_log
from tests.conftest import FRAUD_SPEC, GOOD_RECORD
from tests.support.processes import free_port, spawned

pytestmark = pytest.mark.e2e

REQUESTS = 60


def spec_with_log(tmp_path: Path, **options: object) -> Path:
    """The fraud spec with ``prediction_log`` options, written beside the test."""
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    data["prediction_log"] = options
    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def serve(home: Path, spec: Path, port: int, metrics: int) -> list[str]:
    argv = [sys.executable, "-m", "stageline_cli", "serve", "--spec", str(spec)]
    return [*argv, "--home", str(home), "--port", str(port), "--metrics-port", str(metrics)]


def wait_ready(out: Path, url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 180
    while f"serving fraud at {url}" not in out.read_text():
        assert server.poll() is None, out.read_text()[-3000:]
        assert time.monotonic() < deadline, out.read_text()[-3000:]
        time.sleep(0.3)


def predict(url: str, i: int) -> tuple[int, str, str]:
    """One record; its status, the request id in the answer, and the record's id."""
    record = {**GOOD_RECORD, "transaction_id": f"log-{i}", "amount": 5.0 + i}
    resp = requests.post(f"{url}/predict", json={"records": [record]}, timeout=30)
    return resp.status_code, resp.json().get("request_id", ""), str(record["transaction_id"])


def send(url: str) -> list[tuple[int, str, str]]:
    """:data:`REQUESTS` requests, eight clients at a time."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: predict(url, i), range(REQUESTS)))


def env() -> dict[str, str]:
    out = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out.pop("STAGELINE_API_KEY", None)
    return out


@pytest.mark.parametrize("placement", ["local", "graph"])
def test_sigterm_leaves_exactly_the_answered_predictions_in_the_log(
    demo_copy: Path, tmp_path: Path, placement: str
) -> None:
    home = demo_copy  # its prediction log starts empty
    # Rows wait in memory for a minute: what is on disk after the stop, the stop wrote.
    spec = spec_with_log(tmp_path, flush_interval_s=600, flush_rows=100_000)
    port, metrics = free_port(), free_port()
    url, out = f"http://127.0.0.1:{port}", tmp_path / "serve.out"
    argv = [*serve(home, spec, port, metrics), "--placement", placement]
    with spawned(argv, out, env()) as server:
        wait_ready(out, url, server)
        answers = send(url)
        assert [status for status, _, _ in answers] == [200] * REQUESTS
        assert len(read_log(home / "logs" / "fraud")) == 0  # all still buffered

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, out.read_text()[-3000:]

    logged = read_log(home / "logs" / "fraud")
    assert len(logged) == REQUESTS
    assert sorted(zip(logged["request_id"], logged["transaction_id"], strict=True)) == sorted(
        (rid, tid) for _, rid, tid in answers
    )
    assert logged["request_id"].is_unique
    assert (logged["model_name"] == "fraud").all()
    assert logged["avg_amount_30d"].notna().all()  # the features the model received
    assert (logged["latency_ms"] > 0).all()


def test_an_unwritable_sink_fails_no_request_and_the_endpoint_shows_drops_and_drift(
    demo: DemoResult, demo_copy: Path, tmp_path: Path
) -> None:
    home = demo_copy  # its prediction log starts empty
    (tmp_path / "a-file").write_text("a file, not a folder: nothing can be written under it")
    spec = spec_with_log(tmp_path, uri=str(tmp_path / "a-file" / "logs"), flush_interval_s=0.2)
    port, metrics = free_port(), free_port()
    url, out = f"http://127.0.0.1:{port}", tmp_path / "serve.out"
    with spawned(serve(home, spec, port, metrics), out, env()) as server:
        wait_ready(out, url, server)
        answers = send(url)
        assert [status for status, _, _ in answers] == [200] * REQUESTS

        # Ray exports each metric every few seconds: wait for all the drops to show.
        deadline, dropped, drift = time.monotonic() + 90, 0.0, dict[str, float]()
        while (dropped < REQUESTS or not drift) and time.monotonic() < deadline:
            time.sleep(2)
            text = requests.get(f"http://127.0.0.1:{metrics}/metrics", timeout=10).text
            drops = tagged(text, "ray_stageline_prediction_log_dropped_rows", "reason")
            dropped = sum(v for reason, v in drops if reason == "write_failed")
            drift = dict(tagged(text, "ray_stageline_drift_psi", "feature"))
        assert dropped == REQUESTS, f"{dropped} drops exported"
        # The drift of what was scored (the figures monitor gives), per feature and score.
        assert set(drift) == {*demo.model.features, "score"}, drift
        assert all(value >= 0 for value in drift.values())
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, out.read_text()[-3000:]


def tagged(text: str, metric: str, tag: str) -> list[tuple[str, float]]:
    """``(value of tag, sample)`` of each series of ``metric`` (a counter's ``_total`` too)."""
    found = re.findall(rf"^{metric}(?:_total)?\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)
    out = []
    for labels, value in found:
        match = re.search(rf'{tag}="([^"]*)"', labels)
        if match is not None:
            out.append((match[1], float(value)))
    return out
