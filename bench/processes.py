"""The processes a benchmark starts: their environment, and a stop that leaves
nothing of theirs behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from stageline.localray import descendants

NOT_INHERITED = ("RAY_ADDRESS", "STAGELINE_API_KEY")
"""A benchmark measures a local run without an API key: a Ray address inherited from
the caller (a test session's Ray, a ``ray job``) would make ``stageline batch`` join
that cluster, and a key would make every request a 401."""


def local_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`NOT_INHERITED`, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def start(
    argv: Sequence[str], log: Path, env: dict[str, str], cwd: Path
) -> subprocess.Popen[bytes]:
    """``argv`` in its own process group (so it can be stopped as a whole), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as sink:
        return subprocess.Popen(
            list(argv),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> list[int]:
    """SIGTERM to ``process``; after ``grace_s``, SIGKILL to its process group, then to
    any process it had started that is still there (a Ray process may leave the group).
    Returns the pids that had to be killed."""
    tree = {p: _started(p) for p in descendants(process.pid) if p != process.pid}
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace_s)
    killed = [process.pid] if process.poll() is None else []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 10
    for pid, started in tree.items():
        # Only the very process seen before (not a new one with its pid), still running.
        while _running(pid, started) and time.monotonic() < deadline:
            time.sleep(0.1)  # a Ray process finishing its own shutdown
        if _running(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


def _running(pid: int, started: int | None) -> bool:
    return started is not None and _started(pid) == started


def _started(pid: int) -> int | None:
    """When a running process started (clock ticks since boot); None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])
