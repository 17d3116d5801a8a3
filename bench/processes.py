"""The processes a benchmark or a test starts: their environment, a start in a session
of their own, a stop that leaves nothing of theirs behind, and listings of what runs
below a process (its processes, their names, their TCP sockets; with psutil).

tests/support/processes.py wraps these for the tests (``spawned``); this is the one copy.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypedDict

import psutil

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
    had to be killed: pid and name (:func:`process_name`).
    """
    pgid = process.pid
    running = process.poll() is None
    # Walked only while the pid is still ours (a child's pid is not reused until it is
    # reaped): a reaped pid may be a stranger's by now. psutil.Process remembers when
    # each one started, so a new process given the same pid later is not taken for it.
    tree = _children(pgid) if running else []
    names = {p.pid: process_name(p.pid) for p in tree}
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
    for child in tree:
        # Only the very process seen before (not a new one with its pid), still running.
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _running(child):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()  # checks first that the pid is still this process's
            killed[child.pid] = names[child.pid]
    return killed


def _children(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _group(pgid: int) -> list[int]:
    """The running (not zombie) processes of process group ``pgid``."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
    return found


def _running(proc: psutil.Process) -> bool:
    """``proc`` (that very process, not a later one with its pid) runs, not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------- listings


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    return [root, *(p.pid for p in _children(root))]


def tcp_sockets(pids: Iterable[int]) -> list[tuple[str, int, str, int]]:
    """``(address, port, status, pid)`` of every TCP socket these processes hold, status
    as psutil names it (``psutil.CONN_LISTEN``, ``psutil.CONN_ESTABLISHED``, ...)."""
    wanted = set(pids)
    return sorted(
        (c.laddr.ip.removeprefix("::ffff:"), c.laddr.port, c.status, c.pid)
        for c in psutil.net_connections(kind="tcp")
        if c.pid in wanted and c.laddr
    )


def listening(pids: Iterable[int]) -> list[tuple[str, int, int]]:
    """``(address, port, pid)`` of every TCP socket these processes listen on."""
    return [(a, port, pid) for a, port, st, pid in tcp_sockets(pids) if st == psutil.CONN_LISTEN]


def process_name(pid: int) -> str:
    """What a process is, for listings: ``gcs_server``, ``raylet``, ``ray::ServeReplica``
    (Ray titles a worker process after the actor it runs), a Python process's script or
    module (``log_monitor.py``, ``pytest``), else its program's name."""
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.Error:
        return "?"
    if len(argv) == 1:  # a title set over the whole command line
        argv = argv[0].split()
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return "ray::" + re.split(r"[:(.]", argv[0][5:], maxsplit=1)[0]
    program = Path(argv[0]).name
    if program.startswith("python"):
        if "-m" in argv[1:-1]:
            return argv[argv.index("-m") + 1]
        return next((Path(a).name for a in argv[1:] if a.endswith(".py")), program)
    return program
