"""Processes a test starts, and how nothing of theirs outlives the test.

Each child leads a session of its own, with SIGINT and SIGTERM at their default action
whatever this run ignores or blocks (``bench.processes.OWN_SESSION``), and is stopped
with its whole process group when its test leaves the block, passed, failed or
interrupted (:func:`spawned`, ``bench.processes.stop_group``). A child in a session of
its own no longer gets the signals sent to this run's group, so a SIGTERM to this run
interrupts it as Ctrl-C does (:func:`interrupt_on_sigterm`), and the stops run.
"""

from __future__ import annotations

import signal
import subprocess
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from bench.processes import (
    OWN_SESSION,
    descendants,
    free_port,
    listening,
    process_name,
    start,
    stop_group,
)

__all__ = [
    "OWN_SESSION",
    "descendants",
    "free_port",
    "interrupt_on_sigterm",
    "listening",
    "process_name",
    "spawned",
    "stop_group",
]


@contextmanager
def spawned(
    argv: Sequence[str],
    log: Path,
    env: dict[str, str],
    *,
    cwd: Path | None = None,
    stderr_log: Path | None = None,
    grace_s: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` in a session of its own, its output to ``log`` (its stderr too, unless
    ``stderr_log``), stopped with everything it started when the block is left
    (``stop_group``: SIGTERM, ``grace_s``, then SIGKILL to its group).

    A test that checks how the process stops stops it itself inside the block; if the
    block then ends normally and something of it had to be killed, a warning names it.
    """
    process = start(argv, log, env, cwd, stderr_log=stderr_log)
    try:
        yield process
    except BaseException:
        stop_group(process, grace_s)
        raise
    if killed := stop_group(process, grace_s):
        left = ", ".join(f"{name} ({pid})" for pid, name in killed.items())
        warnings.warn(
            f"{' '.join(argv[:4])}: {left} still running when the block ended; killed",
            stacklevel=3,
        )


def interrupt_on_sigterm() -> None:
    """From now on, SIGTERM to this process raises KeyboardInterrupt, as Ctrl-C does:
    pytest then stops the run and tears down every fixture and ``spawned`` block. (By
    default a SIGTERM ends the run at once, and its children, out of its process
    group, would go on running.) Main thread only; a SIGTERM this run ignores stays
    ignored."""
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")
