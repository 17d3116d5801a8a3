"""A small, bounded HTTP load generator for the fault suite (loopback only).

``Load(url, body, ...)`` runs in background threads from ``start()`` until
``stop()``, ``max_requests`` or ``max_seconds``, whichever comes first. Two modes:

- closed loop (``rate=None``): ``concurrency`` clients, each sending its next
  request as soon as the last one is answered: a steady load;
- open loop (``rate=R``): request ``i`` is due at ``i / R`` seconds whatever the
  server does, sent by whichever of the ``concurrency`` clients is free: an
  offered load that does not slow down when the server does (overload).

Every attempt is recorded (when it started, how long it took, the status, the
body or the client error, the attempt number). With ``retry=True`` a request that
failed (no answer, or a 5xx) is sent once more, after its ``Retry-After`` (capped
at ``retry_wait_s``), as a well-behaved client would.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import requests

Body = Callable[[int], dict[str, Any]]
"""Request number -> JSON body."""


@dataclass(frozen=True)
class Attempt:
    """One HTTP attempt as the client saw it."""

    request: int
    """Request number (0, 1, ...); a retry keeps its request's number."""
    attempt: int
    """1 for the first try, 2 for the retry."""
    started: float
    """Seconds since the load started."""
    latency: float
    """Seconds until the whole response (or the client error)."""
    status: int
    """HTTP status; 0 when no answer came (timeout, connection refused or reset)."""
    body: str
    """The response body (cut to 300 characters), or the client error."""
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def failed(self) -> bool:
        """No answer, or a server error: what a client would retry."""
        return self.status == 0 or self.status >= 500

    @property
    def ended(self) -> float:
        return self.started + self.latency


@dataclass
class Report:
    """Every attempt of one load run, with the summaries the tests quote."""

    attempts: list[Attempt]
    seconds: float
    """How long the load ran."""
    late: int = 0
    """Open loop: requests sent more than 50 ms after they were due (the client fell behind)."""

    def final(self) -> list[Attempt]:
        """The last attempt of every request: what the client finally got."""
        last: dict[int, Attempt] = {}
        for a in self.attempts:
            if a.request not in last or a.attempt > last[a.request].attempt:
                last[a.request] = a
        return [last[k] for k in sorted(last)]

    @property
    def requests(self) -> int:
        return len({a.request for a in self.attempts})

    def statuses(self, attempts: Iterable[Attempt] | None = None) -> Counter[int]:
        return Counter(a.status for a in (self.attempts if attempts is None else attempts))

    def failures(self, attempts: Iterable[Attempt] | None = None) -> list[Attempt]:
        return [a for a in (self.attempts if attempts is None else attempts) if a.failed]

    def between(self, start: float, end: float = math.inf) -> list[Attempt]:
        """Attempts that started in ``[start, end)`` (seconds since the load started)."""
        return [a for a in self.attempts if start <= a.started < end]

    def latency(self, q: float, status: int = 200) -> float:
        """The ``q`` quantile (0..1) of latency in seconds of attempts with ``status``."""
        values = sorted(a.latency for a in self.attempts if a.status == status)
        if not values:
            return math.nan
        return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]

    def rate(self, status: int = 200) -> float:
        """Attempts with ``status`` per second of load."""
        return sum(a.status == status for a in self.attempts) / max(self.seconds, 1e-9)

    def timeline(self, bucket_s: float = 1.0) -> str:
        """Status counts per ``bucket_s`` of load, e.g. ``[2s 200x31 503x2]``, for the
        buckets with anything but 200 in them (where the errors were, in time)."""
        buckets: dict[int, Counter[int]] = {}
        for a in self.attempts:
            buckets.setdefault(int(a.started // bucket_s), Counter())[a.status] += 1
        parts = []
        for k in sorted(buckets):
            if set(buckets[k]) - {200}:
                counts = " ".join(f"{s}x{n}" for s, n in sorted(buckets[k].items()))
                parts.append(f"[{k * bucket_s:g}s {counts}]")
        return " ".join(parts) or "none"

    def summary(self) -> str:
        """One line: requests, attempts by status, rate and latency of the 200s."""
        statuses = " ".join(f"{s}x{n}" for s, n in sorted(self.statuses().items()))
        return (
            f"{self.requests} requests in {self.seconds:.1f} s, attempts {statuses}, "
            f"{self.rate():.0f} ok/s, ok p50 {self.latency(0.5) * 1000:.0f} ms "
            f"p99 {self.latency(0.99) * 1000:.0f} ms"
        )


@dataclass
class Load:
    """A bounded load on ``url`` (POST ``body(i)`` as JSON), run in background threads."""

    url: str
    body: Body
    concurrency: int = 4
    rate: float | None = None
    """Requests per second offered (open loop); None: closed loop."""
    max_requests: int = 10_000
    max_seconds: float = 60.0
    timeout_s: float = 10.0
    """Client timeout per attempt: a request unanswered by then counts as status 0."""
    retry: bool = False
    retry_wait_s: float = 1.0
    """Longest a retry waits for the server's ``Retry-After``."""

    _attempts: list[Attempt] = field(default_factory=list, init=False)
    _next: int = field(default=0, init=False)
    _late: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _t0: float = field(default=0.0, init=False)
    _ended: float | None = field(default=None, init=False)

    def start(self) -> Load:
        self._t0 = time.monotonic()
        self._threads = [
            threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def now(self) -> float:
        """Seconds since the load started (the time base of every :class:`Attempt`)."""
        return time.monotonic() - self._t0

    def stop(self) -> Report:
        """Stop sending, wait for the requests in flight, and report."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s * 2 + self.retry_wait_s + 5)
        assert not any(t.is_alive() for t in self._threads), "a load client did not stop"
        with self._lock:
            seconds = (self._ended or time.monotonic()) - self._t0
            attempts = sorted(self._attempts, key=lambda a: (a.started, a.request))
        return Report(attempts, seconds, self._late)

    def run(self, seconds: float) -> Report:
        """Start, let it run for ``seconds`` (or until its bounds), stop."""
        self.start()
        self.wait(seconds)
        return self.stop()

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the load reached its bounds."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and any(t.is_alive() for t in self._threads):
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def snapshot(self) -> Report:
        """What the load has seen so far (it keeps running)."""
        with self._lock:
            return Report(sorted(self._attempts, key=lambda a: a.started), self.now(), self._late)

    def wait_for(self, condition: Callable[[Report], bool], timeout: float, what: str) -> Report:
        """Poll ``condition(snapshot)`` until true; fail naming ``what`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report = self.snapshot()
            if condition(report):
                return report
            time.sleep(0.1)
        raise AssertionError(f"{what}: not within {timeout:g} s ({self.snapshot().summary()})")

    # -- the clients -------------------------------------------------------------

    def _take(self) -> int | None:
        """The next request number, or None when the load is over."""
        with self._lock:
            over = self._next >= self.max_requests or self.now() >= self.max_seconds
            if self._stop.is_set() or over:
                if self._ended is None:
                    self._ended = time.monotonic()
                return None
            i, self._next = self._next, self._next + 1
            return i

    def _client(self) -> None:
        with requests.Session() as session:
            while (i := self._take()) is not None:
                if self.rate is not None:
                    due = i / self.rate
                    if self._stop.wait(max(0.0, due - self.now())):
                        return
                    if self.now() - due > 0.05:
                        with self._lock:
                            self._late += 1
                first = self._send(session, i, 1)
                if self.retry and first.failed:
                    wait = self.retry_wait_s
                    if first.retry_after is not None and first.retry_after.isdigit():
                        wait = min(wait, float(first.retry_after))
                    time.sleep(wait)
                    self._send(session, i, 2)

    def _send(self, session: requests.Session, i: int, attempt: int) -> Attempt:
        started = self.now()
        try:
            resp = session.post(self.url, json=self.body(i), timeout=self.timeout_s)
            status, text, retry_after = resp.status_code, resp.text, resp.headers.get("retry-after")
        except requests.RequestException as e:
            status, text, retry_after = 0, f"{type(e).__name__}: {e}", None
        result = Attempt(i, attempt, started, self.now() - started, status, text[:300], retry_after)
        with self._lock:
            self._attempts.append(result)
        return result
