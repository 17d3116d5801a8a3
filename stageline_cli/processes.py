"""The process side of the Ray-backed commands: the supervised child, stop signals
and this process's own Ray connection."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stageline import supervisor

STOP_TIMEOUT_S = 9.5
"""From a stop signal to the server's exit; past it the supervisor kills what is left.
The server drains first (:func:`serve_app.drain.drain_budget`), then stops Ray."""


def supervise(
    args: argparse.Namespace, home: Path, kind: str, before: Callable[[], None] | None = None
) -> int:
    """Run this very command again as a supervised child (stageline.supervisor): this
    process stays light (no Ray) and is the one signals reach; the child runs Ray.
    ``before`` runs once what a previous run left is gone (it may hold ports)."""
    folder = home / "run"
    killed = supervisor.clear_stale(folder, kind, grace_s=STOP_TIMEOUT_S)
    if killed:
        print(f"ended {len(killed)} process(es) a previous {kind} left", file=sys.stderr)
    if before is not None:
        before()
    child = [sys.executable, "-m", "stageline_cli", *args.argv]
    run = supervisor.Supervisor(child, folder=folder, kind=kind, stop_timeout_s=STOP_TIMEOUT_S)
    return run.run()


def ray_connected() -> bool:
    """This process already holds a Ray connection (``main`` called from a program that
    runs Ray itself): the command runs here, on that Ray, not in a supervised child."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def ray_disconnect() -> None:
    """Leave a cluster this process only attached to (it keeps running)."""
    import ray

    ray.shutdown()


class StopSignal:
    """SIGTERM and SIGINT, noted (``interrupt``: also raised as KeyboardInterrupt): set
    up before Ray starts, so a stop that arrives while it starts is not lost, and
    installed explicitly, so it works even where the parent ignored SIGINT (a background
    job, nohup)."""

    def __init__(self, *, interrupt: bool = False) -> None:
        self._event = threading.Event()
        self._at: float | None = None
        self._interrupt = interrupt
        self.install()

    def install(self) -> None:
        """(Again:) Ray's core worker sets a SIGTERM handler of its own in ``ray.init``,
        which prints a stack trace and ends the process at once."""
        import signal

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._received)

    def _received(self, _signum: int, _frame: object) -> None:
        if self._at is None:
            self._at = time.monotonic()
        self._event.set()
        if self._interrupt:
            raise KeyboardInterrupt

    def elapsed(self) -> float:
        """Seconds since the first stop signal (0 before it)."""
        return 0.0 if self._at is None else time.monotonic() - self._at

    @property
    def received(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        while not self._event.wait(timeout=1.0):
            pass
