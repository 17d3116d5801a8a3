"""`stageline serve` as a user runs it: a subprocess with its own local Ray."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from stageline.demo.train import DemoResult
from stageline.localray import descendants, listening
from tests.conftest import FRAUD_SPEC, free_port, register_challenger

pytestmark = pytest.mark.e2e


def stageline(home: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stageline.cli",
        *args,
        "--spec",
        str(FRAUD_SPEC),
        "--home",
        str(home),
    ]


def swap_model(home: Path, model: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``stageline serve --model MODEL`` against the server already running for ``home``."""
    return subprocess.run(
        stageline(home, "serve", "--model", model),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_serve_answers_swaps_models_and_stops_cleanly(
    demo: DemoResult, tmp_path: Path, good_record: dict[str, object]
) -> None:
    home = tmp_path / "home"
    shutil.copytree(demo.home, home)
    assert register_challenger(home) == 2
    port, metrics = free_port(), free_port()
    out = tmp_path / "serve.out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("STAGELINE_API_KEY", None)
    with out.open("w") as sink:
        server = subprocess.Popen(
            stageline(home, "serve", "--port", str(port), "--metrics-port", str(metrics)),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while f"serving fraud at {url}" not in out.read_text():
            assert server.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.5)
        printed = out.read_text()
        assert "curl -s " + url + "/predict" in printed

        first = requests.post(f"{url}/predict", json={"records": [good_record]}, timeout=30)
        assert first.status_code == 200, first.text
        assert first.json()["model"] == {"name": "fraud", "version": 1}

        # Every listener of the server and the Ray it started is on loopback: GCS,
        # raylet, object manager, agents, workers, the HTTP proxy and metrics.
        sockets = listening(descendants(server.pid))
        assert {port for _addr, port, _pid in sockets} >= {port, metrics}
        beyond = [(a, p, pid) for a, p, pid in sockets if a not in ("127.0.0.1", "::1")]
        assert not beyond, beyond

        swap = swap_model(home, "fraud@challenger", env)
        assert swap.returncode == 0, swap.stderr
        assert "serving fraud v2 (challenger)" in swap.stdout
        after = requests.post(f"{url}/predict", json={"records": [good_record]}, timeout=30)
        assert after.json()["model"] == {"name": "fraud", "version": 2}

        missing = swap_model(home, "fraud@9", env)
        assert missing.returncode == 1
        assert "fraud@9 did not load; the previous version keeps serving" in missing.stderr
        kept = requests.post(f"{url}/predict", json={"records": [good_record]}, timeout=30)
        assert kept.json()["model"] == {"name": "fraud", "version": 2}
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
    assert code == 0, out.read_text()
    assert not (home / "run" / "serve.json").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)
