"""How busy a replica has been lately: the load a stage deployment scales on.

A stage deployment behind a merging ingress sees few calls in flight, each a whole
batch of requests: counting ongoing requests (Serve's default) hides its load. The
share of recent time it spent running its stages does not: a replica that is busy
all the time needs company, one that is idle most of it does not.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class BusyMeter:
    """Busy time over the last ``window_s`` seconds, as a share of that window.

    :meth:`start` and :meth:`stop` bracket each piece of work (one chain call); the
    work of a replica runs one piece at a time. A piece still running counts up to now.
    Thread-safe: work runs in a worker thread, readers on the event loop.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._clock = clock
        self._done: deque[tuple[float, float]] = deque()
        self._since: float | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            self._since = self._clock()

    def stop(self) -> None:
        with self._lock:
            if self._since is not None:
                self._done.append((self._since, self._clock()))
                self._since = None

    def __enter__(self) -> BusyMeter:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fraction(self) -> float:
        """Share of the last ``window_s`` seconds spent working, from 0 to 1."""
        with self._lock:
            now = self._clock()
            begin = now - self.window_s
            while self._done and self._done[0][1] <= begin:
                self._done.popleft()
            busy = sum(end - max(start, begin) for start, end in self._done)
            if self._since is not None:
                busy += now - max(self._since, begin)
        return min(1.0, max(0.0, busy / self.window_s))
