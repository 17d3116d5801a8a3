"""`stageline serve` started, loaded, stopped and started again, as an operator does it:
by SIGTERM or SIGINT to the process or to its whole process group (systemd's
``KillMode=mixed``, ``timeout``, ``kill -- -PGID``, Ctrl-C), and by SIGKILL."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from serve_app.drain import DRAIN_CAP_S
from stageline.demo.train import DemoResult
from stageline.supervisor import RUN_ENV, records, run_processes
from tests.conftest import FRAUD_SPEC, free_port
from tests.faults.load import Attempt, Load
from tests.faults.online import one_record

pytestmark = pytest.mark.e2e

STOP_WITHIN_S = 10.0
"""What a stop under load may take, from the signal to the main process's exit."""


@dataclass(frozen=True)
class Stop:
    signum: signal.Signals
    group: bool
    """Sent to the whole process group (else to the main process alone)."""

    def __str__(self) -> str:
        return f"{self.signum.name} to the {'group' if self.group else 'process'}"


# Every way a server is stopped, taken in turn over twenty starts in a row.
STOPS = [
    Stop(signal.SIGTERM, group=False),
    Stop(signal.SIGINT, group=True),
    Stop(signal.SIGTERM, group=True),
    Stop(signal.SIGINT, group=False),
    Stop(signal.SIGKILL, group=False),
]
STARTS = int(os.environ.get("LIFECYCLE_STARTS", "20"))


class Server:
    """One ``stageline serve`` for ``home``, in its own process group, output to a file."""

    def __init__(self, home: Path, port: int, metrics: int, log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.ports = (port, metrics)
        self.log = log
        env = {k: v for k, v in os.environ.items() if k not in ("STAGELINE_API_KEY", RUN_ENV)}
        argv = [sys.executable, "-m", "stageline_cli", "serve", "--spec", str(FRAUD_SPEC)]
        argv += ["--home", str(home), "--port", str(port), "--metrics-port", str(metrics)]
        with log.open("w") as sink:
            self.process = subprocess.Popen(
                argv,
                stdout=sink,
                stderr=subprocess.STDOUT,
                env={**env, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
                # Whatever this test inherited (a background job ignores SIGINT).
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
            )
        self.home = home
        self.run_id: str | None = None

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while f"serving fraud at {self.url}" not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.2)
        [record] = [r for _, r in records(self.home / "run", "serve") if r.running]
        assert record.pid == self.process.pid
        self.run_id = record.run_id

    def signal(self, stop: Stop) -> None:
        if stop.group:
            os.killpg(self.process.pid, stop.signum)
        else:
            self.process.send_signal(stop.signum)

    def leftovers(self) -> list[int]:
        return run_processes(self.run_id) if self.run_id else []

    def kill(self) -> None:
        """What a failing test leaves: nothing (the group, then the run's processes)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for pid in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def bindable(port: int) -> bool:
    """Nothing listens on ``port``: a server may bind it (as servers do, past the
    TIME_WAIT of connections just closed)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def refused(a: Attempt) -> bool:
    """No connection at all: the server had stopped listening."""
    return a.status == 0 and "Connection refused" in a.body


def reset(a: Attempt) -> bool:
    """The connection was reset and nothing of an answer came."""
    return a.status == 0 and "Connection reset by peer" in a.body


LISTENER_CLOSE_S = 0.25
"""How far apart the resets of one listener's close may be seen by the clients' threads."""


def one_listener_close(resets: list[Attempt], signalled: float) -> bool:
    """Resets that a listener closing made, and nothing else: the connections still in the
    kernel's accept queue, never read by the server, are reset by the kernel together,
    at the close, whether or not their client had written its request yet. So every
    reset came at one moment (``LISTENER_CLOSE_S``), within 1 s of the signal; a server
    that dropped requests it had taken would not reset them all at one such moment."""
    if not resets:
        return True
    ends = [a.ended for a in resets]
    return max(ends) - min(ends) <= LISTENER_CLOSE_S and signalled <= min(ends) <= signalled + 1


def clean(a: Attempt) -> bool:
    """What a client may see while a server stops: its answer, a 503 that says when to
    come back, or a refused connection. Not: a half answer, a 500, or a reset (but see
    :func:`one_listener_close`)."""
    return a.ok or (a.status == 503 and a.retry_after is not None) or refused(a)


def test_twenty_starts_each_stopped_under_load_restart_at_once(
    demo: DemoResult, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    shutil.copytree(demo.home, home)
    port, metrics = free_port(), free_port()
    servers: list[Server] = []
    seen: list[str] = []
    resets = 0  # connections reset by a listener closing (never read): reported, allowed
    try:
        for n in range(STARTS):
            stop = STOPS[n % len(STOPS)]
            previous = servers[-1] if servers else None
            server = Server(home, port, metrics, tmp_path / f"serve-{n}.out")
            servers.append(server)
            server.wait_ready()
            # The start right after a stop answers, and what the stopped one (even one
            # killed outright) left has been ended.
            first = requests.post(f"{server.url}/predict", json=one_record(0), timeout=30)
            assert first.status_code == 200, first.text
            if previous is not None:
                assert previous.leftovers() == [], f"after {seen[-1]}: {previous.leftovers()}"

            load = Load(f"{server.url}/predict", one_record, concurrency=32, max_seconds=60)
            load.start()
            load.wait_for(lambda r: r.statuses()[200] >= 100, 30, "100 answers before the stop")
            at, signalled = load.now(), time.monotonic()
            server.signal(stop)
            server.process.wait(timeout=STOP_WITHIN_S + 20)
            took = time.monotonic() - signalled
            report = load.stop()

            during = [a for a in report.attempts if at <= a.ended <= at + DRAIN_CAP_S]
            assert [a for a in report.attempts if a.ended < at and not a.ok] == []
            resets_now = [a for a in during if reset(a)]
            assert one_listener_close(resets_now, at), f"{stop}: {resets_now[:5]}"
            bad = [a for a in during if not clean(a) and not reset(a)]
            assert bad == [], f"{stop}: {bad[:5]}"
            if stop.signum != signal.SIGKILL:
                assert server.process.returncode == 0, server.log.read_text()[-3000:]
                assert took < STOP_WITHIN_S, f"{stop}: stopped after {took:.1f} s"
                # Requests in flight at the signal were answered, not cut off.
                assert any(a.ok for a in during), f"{stop}: nothing answered after the signal"
                assert server.leftovers() == [], f"{stop}: {server.leftovers()}"
                assert all(bindable(p) for p in server.ports), f"{stop}: ports still held"
                assert "stopped" in server.log.read_text()
            seen.append(str(stop))
            resets += len(resets_now)
    finally:
        for server in servers:
            server.kill()
    assert len(seen) == STARTS
    print(f"{STARTS} starts and stops: {resets} connection(s) reset by a listener closing")
