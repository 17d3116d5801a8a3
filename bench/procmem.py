"""Memory of a whole process tree, sampled from ``/proc`` (Linux), for the benchmarks.

Ray's object store is shared memory mapped by many processes, so summing RSS
counts it once per process. PSS (proportional set size) splits shared pages
between the processes that map them: the sum over a tree is what the tree
really holds, and it is what we report as peak memory.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from bench.processes import descendants


@dataclass(frozen=True)
class Sample:
    pss: int
    """Bytes: proportional set size summed over the tree."""
    rss: int
    """Bytes: resident set size summed over the tree (shared pages counted many times)."""
    processes: int
    uss: int = 0
    """Bytes: private pages (each mapped by one process only) summed over the tree. Unlike
    PSS, it does not move when other processes map or unmap the same libraries: what the
    processes themselves allocated, for before/after comparisons."""


def sample(root: int) -> Sample:
    """Memory of ``root`` and every process below it."""
    return sample_pids(descendants(root))


def sample_pids(pids: Iterable[int]) -> Sample:
    """Memory of these processes (those gone by now count nothing)."""
    pss = rss = uss = n = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        n += 1
        for line in text.splitlines():
            if line.startswith("Pss:"):
                pss += int(line.split()[1]) * 1024
            elif line.startswith("Rss:"):
                rss += int(line.split()[1]) * 1024
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1]) * 1024
    return Sample(pss, rss, n, uss)


def open_fds(pids: Iterable[int]) -> int:
    """File descriptors open in these processes: the entries of ``/proc/PID/fd``
    (sockets, pipes, files, epoll and event fds alike; a process that is gone counts 0)."""
    n = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            n += len(os.listdir(f"/proc/{pid}/fd"))
    return n


class PeakMemory:
    """Samples a process tree every ``interval`` seconds in a thread; keeps the peaks.

    ``with PeakMemory(pid) as peak: ...`` then ``peak.pss`` / ``peak.rss`` (bytes).
    """

    def __init__(self, root: int | None = None, interval: float = 0.25) -> None:
        self.root = root if root is not None else os.getpid()
        self.interval = interval
        self.pss = self.rss = self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            s = sample(self.root)
            self.pss, self.rss = max(self.pss, s.pss), max(self.rss, s.rss)
            self.samples += 1
            if self._stop.wait(self.interval):
                return


def gib(n: int) -> float:
    return n / 2**30


if __name__ == "__main__":  # python -m bench.procmem -- command ...: peak memory of a command
    import subprocess
    import sys

    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    started = time.perf_counter()
    proc = subprocess.Popen(argv)
    with PeakMemory(proc.pid) as peak:
        code = proc.wait()
    print(
        f"exit {code} in {time.perf_counter() - started:.1f} s; peak PSS {gib(peak.pss):.2f} GiB,"
        f" peak RSS {gib(peak.rss):.2f} GiB ({peak.samples} samples)",
        file=sys.stderr,
    )
    sys.exit(code)
