"""The supervisor of `stageline serve` and `stageline batch`, with plain processes: a
child that leaves a grandchild of its own behind (as Ray's processes would)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stageline.supervisor import (
    RUN_ENV,
    clear_stale,
    end_run,
    records,
    run_processes,
    started_at,
)

# The child: starts a grandchild in a session of its own that ignores SIGTERM (what a
# stop must still end), writes its pid, then waits for SIGTERM and exits 0 on it.
CHILD = """
import os, signal, subprocess, sys, time
stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
grandchild = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
open(sys.argv[1], "w").write(str(grandchild.pid))
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
time.sleep(600)
"""

SUPERVISE = """
import sys
from pathlib import Path
from stageline.supervisor import Supervisor
child = [sys.executable, "-c", sys.argv[1], sys.argv[2]]
sys.exit(Supervisor(child, folder=Path(sys.argv[3]), kind="test", stop_timeout_s=5).run())
"""


def supervised(tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp_path / "grandchild.pid"
    argv = [sys.executable, "-c", SUPERVISE, CHILD, str(marker), str(tmp_path / "run")]
    env = {k: v for k, v in os.environ.items() if k != RUN_ENV}
    process = subprocess.Popen(argv, env=env, start_new_session=True)
    deadline = time.monotonic() + 30
    while not marker.exists() or not marker.read_text():
        assert process.poll() is None
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return process, marker


@pytest.mark.parametrize("group", [False, True], ids=["process", "group"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_signal_stops_the_child_once_and_ends_what_it_left(
    tmp_path: Path, signum: signal.Signals, group: bool
) -> None:
    process, marker = supervised(tmp_path)
    [(record_path, record)] = records(tmp_path / "run", "test")
    assert record.pid == process.pid
    grandchild = int(marker.read_text())
    assert run_processes(record.run_id)  # the child and the grandchild carry the mark
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
        assert process.wait(timeout=20) == 0  # the child's own exit status
    finally:
        end_run(record.run_id)
    assert started_at(grandchild) is None, "the grandchild outlived the run"
    assert run_processes(record.run_id) == []
    assert not record_path.exists()


def test_a_killed_supervisor_stops_its_child_and_the_next_start_ends_the_rest(
    tmp_path: Path,
) -> None:
    process, marker = supervised(tmp_path)
    [(record_path, record)] = records(tmp_path / "run", "test")
    grandchild = int(marker.read_text())
    try:
        process.send_signal(signal.SIGKILL)
        process.wait()
        # The child got SIGTERM from the kernel (parent death) and exited on it; the
        # grandchild, which ignores SIGTERM, is still there for the next start to end.
        deadline = time.monotonic() + 10
        while len(run_processes(record.run_id)) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert run_processes(record.run_id) == [grandchild]
        assert record_path.exists()
        assert clear_stale(tmp_path / "run", "test", grace_s=0.5) == [grandchild]
    finally:
        end_run(record.run_id)
    assert started_at(grandchild) is None
    assert not record_path.exists()


def test_a_run_still_supervised_is_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    me = {"run_id": "x", "pid": os.getpid(), "started": started_at(os.getpid())}
    (folder / "test-x.json").write_text(json.dumps(me))
    assert clear_stale(folder, "test", grace_s=0) == []
    [(_, record)] = records(folder, "test")
    assert record.running
