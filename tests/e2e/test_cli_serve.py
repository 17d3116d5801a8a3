"""`stageline serve` as a user runs it: a subprocess with its own local Ray."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from serve_app.local import FILL_FIRST, serve_env
from stageline.demo.train import DemoResult
from tests.conftest import FRAUD_SPEC, free_port, register_challenger
from tests.support.processes import descendants, listening, spawned

pytestmark = pytest.mark.e2e


def stageline(home: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stageline_cli",
        *args,
        "--spec",
        str(FRAUD_SPEC),
        "--home",
        str(home),
    ]


def swap_model(
    home: Path, model: str, env: dict[str, str], *more: str
) -> subprocess.CompletedProcess[str]:
    """``stageline serve --model MODEL`` against the server already running for ``home``."""
    return subprocess.run(
        stageline(home, "serve", "--model", model, *more),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def haproxy_stats_socket(server_pid: int) -> Path | None:
    """The stats listener (a Unix socket beside its config) of the server's HAProxy."""
    for pid in descendants(server_pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            if Path(argv[0]).name == "haproxy" and "-f" in argv:
                return Path(argv[argv.index("-f") + 1]).parent / "stats.sock"
    return None


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def replica_totals(server_pid: int) -> dict[str, int]:
    """Requests each ingress replica has taken, from HAProxy's stats page (CSV)."""
    path = haproxy_stats_socket(server_pid)
    if path is None:
        return {}
    connection = UnixHTTPConnection(path)
    try:
        connection.request("GET", "/stats;csv")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    header = text.lstrip("# ").splitlines()[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in text.splitlines()[1:]]
    return {r["svname"]: int(r["stot"]) for r in rows if r["svname"].startswith("SERVE_REPLICA_")}


def score(url: str, record: dict[str, object]) -> int:
    return requests.post(f"{url}/predict", json={"records": [record]}, timeout=60).status_code


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
    url = f"http://127.0.0.1:{port}"
    argv = stageline(home, "serve", "--port", str(port), "--metrics-port", str(metrics))
    # If the test fails, the server and everything it started are stopped on the way out.
    with spawned(argv, out, env) as server:
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

        # Replicas are filled in order: one client's requests stay on one (warm) replica,
        # and a load beyond FILL_FIRST requests in flight reaches the other as well.
        until = time.monotonic() + 60
        while len(before := replica_totals(server.pid)) < 2 and time.monotonic() < until:
            time.sleep(0.5)  # HAProxy learns of each replica as Serve reloads it
        assert len(before) == 2, before  # the shipped two ingress replicas
        for _ in range(20):
            one = requests.post(f"{url}/predict", json={"records": [good_record]}, timeout=30)
            assert one.status_code == 200, one.text
        alone = {name: n - before[name] for name, n in replica_totals(server.pid).items()}
        assert sorted(alone.values()) == [0, 20], alone
        with ThreadPoolExecutor(4 * FILL_FIRST) as pool:
            codes = list(pool.map(lambda _: score(url, good_record), range(16 * FILL_FIRST)))
        assert codes == [200] * len(codes)
        crowd = {
            name: n - before[name] - alone[name] for name, n in replica_totals(server.pid).items()
        }
        assert min(crowd.values()) > 0, crowd

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

        # A canary of the whole traffic with v1 as the challenger, set the same way.
        canary = ("--challenger", "fraud@1", "--challenger-mode", "canary", "--share", "1")
        swap = swap_model(home, "fraud@challenger", env, *canary)
        assert swap.returncode == 0, swap.stderr
        assert "challenger v1 in canary, 100% of transaction_id" in swap.stdout
        canaried = requests.post(f"{url}/predict", json={"records": [good_record]}, timeout=30)
        assert canaried.json()["model"] == {"name": "fraud", "version": 1}

        # Ctrl-C, as a user stops it. The child has SIGINT at its default action even
        # when this run ignores it (a background job, nohup).
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
    assert code == 0, out.read_text()
    assert not (home / "run" / "serve.json").exists()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=5)


SERVE_HAPROXY_CFG = """\
global
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    balance {balance}
listen stats
    bind *:{stats}
    stats enable
backend http-fraud
    http-reuse always
    default-server fastinter 250ms downinter 250ms fall 2 rise 2 inter 5s check
    server SERVE_REPLICA_fraud-ingress-a 127.0.0.1:30000 check
    server SERVE_REPLICA_fraud-ingress-b 127.0.0.1:30001 check
    server SERVE_REPLICA_fraud-ingress-c 127.0.0.1:30002 check
    server SERVE_PROXY_ACTOR-fallback-x 127.0.0.1:8500 check backup
backend http-other
    server SERVE_REPLICA_other-ingress-a 127.0.0.1:30003 check
"""


@pytest.mark.parametrize("fill", ["16", "0"])
def test_haproxy_wrapper_fills_replicas_in_order(
    tmp_path: Path, fill: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config Ray Serve writes with ``stageline serve``'s settings, as the wrapper
    hands it to the real HAProxy (in check mode): stats on a Unix socket; with a fill,
    every replica of a backend but the last capped at that many requests and ``balance
    first``; with 0, as Serve writes it by default."""
    assert serve_env(tmp_path)["STAGELINE_HAPROXY_FILL"] == str(FILL_FIRST)
    monkeypatch.setenv("STAGELINE_HAPROXY_FILL", fill)
    env = serve_env(tmp_path)
    config = tmp_path / "haproxy.cfg"
    # Serve's default stats port; the balance algorithm Serve renders from its setting.
    balance = env["RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"]
    config.write_text(SERVE_HAPROXY_CFG.format(stats=8404, balance=balance))
    for _ in range(2):  # a restart on the same file changes nothing more
        check = subprocess.run(
            [env["RAY_SERVE_HAPROXY_BINARY_PATH"], "-c", "-f", str(config)],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stdout + check.stderr
    lines = [line.strip() for line in config.read_text().splitlines()]
    # No TCP port for stats: a Unix socket beside the config (one folder per node).
    assert f"bind unix@{tmp_path}/stats.sock mode 600" in lines
    servers = [line for line in lines if line.startswith("server ")]
    if fill == "0":
        assert "balance leastconn" in lines
        assert not any("maxconn" in line for line in servers)
        return
    assert "balance first" in lines
    capped = [line.split()[1] for line in servers if line.endswith(f" maxconn {fill}")]
    assert all(line.count("maxconn") <= 1 for line in servers), servers
    # The last replica of a backend takes the rest (nothing queues in HAProxy); the
    # fallback proxy and a backend of one replica are left alone.
    assert capped == ["SERVE_REPLICA_fraud-ingress-a", "SERVE_REPLICA_fraud-ingress-b"]
