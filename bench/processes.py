"""The processes a benchmark or a test starts: their environment, a start in a session
of their own, and a stop that leaves nothing of theirs behind.

tests/support/processes.py wraps these for the tests (``spawned``); this is the one copy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypedDict

from stageline.localray import descendants, process_name

NOT_INHERITED = ("RAY_ADDRESS", "STAGELINE_API_KEY")
"""A benchmark measures a local run without an API key: a Ray address inherited from
the caller (a test session's Ray, a ``ray job``) would make ``stageline batch`` join
that cluster, and a key would make every request a 401."""

DEFAULT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
"""The signals a child gets back at their default action, whatever its parent does with them."""

LINGER_S = 10.0
"""How long a process that left the group gets to finish its own shutdown (a Ray process
stopping when its raylet does) before it is killed."""


def local_env(**extra: str) -> dict[str, str]:
    """This process's environment without :data:`NOT_INHERITED`, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _default_signals() -> None:
    # In the child, between fork and exec. A shell leaves SIGINT ignored in a background
    # job and under nohup, exec keeps an ignored signal ignored (Python's own children
    # included), and Ray blocks SIGINT in the processes it starts: a child inheriting
    # either would not stop on the SIGINT a test or a user sends it.
    for signum in DEFAULT_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


class _OwnSession(TypedDict):
    start_new_session: bool
    preexec_fn: Callable[[], None]


OWN_SESSION: _OwnSession = {"start_new_session": True, "preexec_fn": _default_signals}
"""``subprocess.Popen`` options for a child :func:`stop_group` can stop: it leads a
process group (and session) of its own, out of reach of signals to this process's group,
with :data:`DEFAULT_SIGNALS` at their default action and no signal blocked."""


def start(
    argv: Sequence[str],
    log: Path,
    env: dict[str, str],
    cwd: Path | None = None,
    *,
    stderr_log: Path | None = None,
) -> subprocess.Popen[bytes]:
    """``argv`` with :data:`OWN_SESSION`, its output to ``log`` (its stderr too, unless
    ``stderr_log`` is given)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as files:
        out = files.enter_context(log.open("wb"))
        err = files.enter_context(stderr_log.open("wb")) if stderr_log else subprocess.STDOUT
        return subprocess.Popen(list(argv), stdout=out, stderr=err, env=env, cwd=cwd, **OWN_SESSION)


def stop_group(process: subprocess.Popen[Any], grace_s: float = 30.0) -> dict[int, str]:
    """Stop ``process`` (started with :data:`OWN_SESSION`) and everything it started.

    SIGTERM to ``process`` alone, so that it stops what it started in its own order (a
    signal to the whole group would reach its children before it could); once it has
    exited, or after ``grace_s``, SIGKILL to its process group; then SIGKILL to any
    process it had started that left the group and is still running :data:`LINGER_S`
    later. Safe to call again, or after the caller has reaped ``process``. Returns what
    had to be killed: pid and name (:func:`~stageline.localray.process_name`).
    """
    pgid = process.pid
    running = process.poll() is None
    # Walked only while the pid is still ours (a child's pid is not reused until it is
    # reaped): a reaped pid may be a stranger's by now.
    tree = {p: _started(p) for p in descendants(pgid) if p != pgid} if running else {}
    names = {p: process_name(p) for p in tree}
    killed: dict[int, str] = {}
    if running:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            killed[pgid] = process_name(pgid)
    # A group's id is not reused while any process is in the group, so this reaches
    # only what is left of ours, even after the leader is gone.
    killed |= {p: process_name(p) for p in _group(pgid)}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + LINGER_S
    for pid, started in tree.items():
        # Only the very process seen before (not a new one with its pid), still running.
        while _running(pid, started) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _running(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed[pid] = names[pid]
    return killed


def _group(pgid: int) -> list[int]:
    """The running (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
                found.append(int(entry.name))
    return found


def _running(pid: int, started: int | None) -> bool:
    return started is not None and _started(pid) == started


def _started(pid: int) -> int | None:
    """When a running process started (clock ticks since boot); None if it is gone."""
    fields = _stat(pid)
    return None if fields is None or fields[0] == "Z" else int(fields[19])


def _stat(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name (state, ppid, pgrp, ...); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
