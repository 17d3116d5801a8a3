"""A bounded, expiring, thread-safe cache with hit and miss counts.

What the feature-lookup cache (:mod:`stageline.features.cache`) and the response cache
(:class:`~stageline.service.ResponseCache`) keep their entries in. No Ray and no
metrics library here: the counts are plain integers, which the Serve adapter exports.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Clock = Callable[[], float]
"""Seconds, only compared with one another (``time.monotonic`` unless a test gives one)."""


@dataclass
class CacheCounts:
    """Lookups since the cache was made: totals, which only grow."""

    hits: int = 0
    misses: int = 0


class TTLCache(Generic[K, V]):
    """At most ``max_entries`` values, each served for ``ttl_s`` after it was put.

    The least recently used entry goes first when it is full. Safe to share between
    threads (a lock around each call: a lookup cache serves one batch at a time)."""

    def __init__(self, max_entries: int, ttl_s: float, clock: Clock = time.monotonic) -> None:
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("a cache needs max_entries >= 1 and ttl_s > 0")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self.clock = clock
        self.counts = CacheCounts()
        self._entries: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, keys: Iterable[K]) -> list[V | None]:
        """Each key's value, or None (a miss: absent or expired), counted."""
        now = self.clock()
        out: list[V | None] = []
        hits = 0
        with self._lock:
            entries = self._entries
            for key in keys:
                entry = entries.get(key)
                if entry is not None and entry[0] > now:
                    entries.move_to_end(key)
                    out.append(entry[1])
                    hits += 1
                else:
                    if entry is not None:
                        del entries[key]
                    out.append(None)
            self.counts.hits += hits
            self.counts.misses += len(out) - hits
        return out

    def get(self, key: K) -> V | None:
        return self.get_many([key])[0]

    def put_many(self, items: Iterable[tuple[K, V]]) -> None:
        """Store each value for ``ttl_s`` from now, evicting the least recently used."""
        expires = self.clock() + self.ttl_s
        with self._lock:
            entries = self._entries
            for key, value in items:
                entries[key] = (expires, value)
                entries.move_to_end(key)
            while len(entries) > self.max_entries:
                entries.popitem(last=False)

    def put(self, key: K, value: V) -> None:
        self.put_many([(key, value)])

    def clear(self) -> None:
        """Drop every entry (the counts stay: they are totals)."""
        with self._lock:
            self._entries.clear()
