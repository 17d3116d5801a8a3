"""A long-running command as a supervised child: a clean stop, and nothing left behind.

``stageline serve`` runs its server (the local Ray and everything Ray starts) in a child
process of its own session, and stays the process a user, a shell, ``timeout``,
systemd or Kubernetes signals. A SIGTERM or SIGINT sent to this process, or to its
whole process group, reaches the child exactly once, as SIGTERM, and only through this
process: Ray's processes are never signalled halfway through the child's drain.

Nothing outlives a run:

- the child gets a parent-death signal (SIGTERM), so killing this process outright
  still stops the server the same clean way;
- every process of the run carries :data:`RUN_ENV` in its environment (Ray's processes
  and what they start inherit it), and once the child has exited, or the stop budget
  is spent, whatever still carries it is killed;
- the run is recorded under the home, so the next start ends whatever a run that died
  with its supervisor (``kill -9`` of both, a crash) left there.

Plain ``os`` and ``/proc``; no Ray import.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_ENV = "STAGELINE_RUN"
"""Set in the environment of a supervised child to the run's id; inherited by every
process the child starts, which is how a run's processes are found."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``signum`` to this process when its parent exits (Linux;
    elsewhere nothing). Call it in the child, before it runs anything else."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def _child_setup() -> None:
    # Runs in the child between fork and exec. Default dispositions, whatever the parent
    # inherited (a background job or nohup ignores SIGINT): the child installs its own
    # handlers, and a process it starts gets the defaults.
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    set_parent_death_signal(signal.SIGTERM)


def started_at(pid: int) -> int | None:
    """When a running process started (clock ticks since boot); None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """The very process recorded as (``pid``, ``started``) is still running."""
    return started is not None and started_at(pid) == started


def run_processes(run_id: str) -> list[int]:
    """Every running process whose environment marks it as one of run ``run_id``'s."""
    marker = f"{RUN_ENV}={run_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
    return found


def end_run(run_id: str, grace_s: float = 0.0) -> list[int]:
    """End what is left of run ``run_id``: SIGTERM, up to ``grace_s`` to exit, then
    SIGKILL. Returns the pids that had to be killed."""
    pids = {pid: started_at(pid) for pid in run_processes(run_id)}
    if grace_s > 0:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while any(alive(p, s) for p, s in pids.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
    killed = []
    for pid, started in pids.items():
        if alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    deadline = time.monotonic() + 2.0  # a SIGKILL is not instant: until they are gone
    while any(alive(p, pids[p]) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.01)
    return killed


@dataclass(frozen=True)
class RunRecord:
    """A supervised run, as recorded under its home while it runs."""

    run_id: str
    pid: int
    started: int | None

    @property
    def running(self) -> bool:
        return alive(self.pid, self.started)


def read_record(path: Path) -> RunRecord | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return RunRecord(str(data["run_id"]), int(data["pid"]), data.get("started"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def records(folder: Path, kind: str) -> list[tuple[Path, RunRecord]]:
    """The runs of ``kind`` recorded in ``folder`` (see :class:`Supervisor`)."""
    found = []
    for path in sorted(folder.glob(f"{kind}-*.json")):
        record = read_record(path)
        if record is not None:
            found.append((path, record))
    return found


def clear_stale(folder: Path, kind: str, grace_s: float) -> list[int]:
    """End what each recorded run of ``kind`` whose supervisor is gone left behind (its
    server may still be finishing its own stop: ``grace_s`` for that), and forget it.
    Returns the pids that had to be killed. Runs still supervised are left alone."""
    killed: list[int] = []
    for path, record in records(folder, kind):
        if not record.running:
            # Its server got SIGTERM when the supervisor died, and is draining: let it.
            deadline = time.monotonic() + grace_s
            while run_processes(record.run_id) and time.monotonic() < deadline:
                time.sleep(0.1)
            killed += end_run(record.run_id)
            path.unlink(missing_ok=True)
    return killed


class Supervisor:
    """Runs ``argv`` as the supervised child of this process (see the module docstring).

    The run is recorded in ``folder`` as ``KIND-RUN_ID.json`` while it runs (see
    :func:`clear_stale`).
    ``stop_timeout_s``: from the first stop signal to the child's exit; past it,
    everything of the run is killed.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        folder: Path,
        kind: str,
        stop_timeout_s: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.stop_timeout_s = stop_timeout_s
        self.env = dict(os.environ if env is None else env)
        self.run_id = uuid.uuid4().hex
        self.record = folder / f"{kind}-{self.run_id}.json"
        self._stop_at: float | None = None
        self._child: subprocess.Popen[bytes] | None = None

    def run(self) -> int:
        """Start the child, wait for it, stop it on a signal; the child's exit status."""
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self._child = subprocess.Popen(
                self.argv,
                env={**self.env, RUN_ENV: self.run_id},
                start_new_session=True,
                preexec_fn=_child_setup,
            )
            self._write_record()
            if self._stop_at is not None:  # a signal came while the child was starting
                self._child.send_signal(signal.SIGTERM)
            return self._wait(self._child)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            end_run(self.run_id, grace_s=1.0)
            self.record.unlink(missing_ok=True)

    def _on_signal(self, _signum: int, _frame: object) -> None:
        if self._stop_at is not None:
            return  # a second signal (the group's, then the user's): one stop is enough
        self._stop_at = time.monotonic() + self.stop_timeout_s
        if self._child is not None and self._child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._child.send_signal(signal.SIGTERM)

    def _wait(self, child: subprocess.Popen[bytes]) -> int:
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return child.wait(timeout=0.2)
            if self._stop_at is not None and time.monotonic() > self._stop_at:
                print(
                    f"stageline: the server did not stop within {self.stop_timeout_s:.0f} s; "
                    "killing it",
                    file=sys.stderr,
                )
                end_run(self.run_id)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                return child.wait()

    def _own_record(self) -> RunRecord:
        return RunRecord(self.run_id, os.getpid(), started_at(os.getpid()))

    def _write_record(self) -> None:
        record = self._own_record()
        data = {"run_id": record.run_id, "pid": record.pid, "started": record.started}
        self.record.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.record)
