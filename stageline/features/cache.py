"""A per-replica cache of feature lookups in front of a remote online store.

Under skewed traffic (a few entities send most requests) most keys of a batch were
looked up moments ago: served from here, only the others go to the store, in one
round trip as before. Each value is cached under the snapshot it was read from, so
values of a replaced snapshot are never served once the store says another is current
(the store checks every ``refresh_s``, and any lookup sees it at once), and a batch
never mixes two snapshots: when the keys fetched come from a newer snapshot than the
cached ones, the whole batch is read again from that one.
"""

from __future__ import annotations

import time
from typing import Any, cast

import numpy as np
import pandas as pd

from stageline.caching import CacheCounts, Clock, TTLCache
from stageline.features.online import FeatureRows, OnlineStore
from stageline.spec import LookupCacheSpec

_Row = tuple[object, ...]


def _column(values: list[object], dtype: Any, index: pd.Index) -> pd.Series:
    # A typed array first, then a Series of exactly that dtype (pandas would infer str
    # for an object array of text, where the store gives object).
    array = np.array(values, dtype=dtype) if isinstance(dtype, np.dtype) else values
    return pd.Series(array, index=index, dtype=dtype, copy=False)


class CachedOnlineStore:
    """``store``, with the values it returned kept for ``spec.ttl_s`` (at most
    ``spec.max_entries`` keys over all views)."""

    def __init__(
        self, store: OnlineStore, spec: LookupCacheSpec, clock: Clock = time.monotonic
    ) -> None:
        self.store = store
        self.cache: TTLCache[tuple[str, str | None, str], _Row] = TTLCache(
            spec.max_entries, spec.ttl_s, clock
        )
        # Per view, from its first read: the columns and their types, to build a frame
        # from cached rows alone exactly as the store would have; and per snapshot seen,
        # when it was materialized.
        self._dtypes: dict[str, pd.Series] = {}
        self._materialized: dict[str | None, float | None] = {}

    @property
    def counts(self) -> CacheCounts:
        """Hits and misses so far, one per key looked up."""
        return self.cache.counts

    def current(self, view: str) -> str | None:
        return self.store.current(view)

    def read(self, view: str, keys: pd.Series) -> FeatureRows:
        wanted = keys.astype(str).tolist()
        if not wanted:
            return self.store.read(view, keys)
        snapshot = self.store.current(view)
        cached: list[_Row | None]
        if snapshot is not None and view in self._dtypes:
            cached = self.cache.get_many([(view, snapshot, k) for k in wanted])
        else:  # nothing read yet: every key is a miss
            cached = [None] * len(wanted)
            self.cache.counts.misses += len(wanted)
        pairs = zip(wanted, cached, strict=True)
        missing = list(dict.fromkeys(k for k, row in pairs if row is None))
        if not missing:
            return self._rows(view, keys, cast(list[_Row], cached), snapshot)
        fetched = self.store.read(view, pd.Series(missing, dtype=object))
        if fetched.snapshot != snapshot and len(missing) < len(wanted):
            # A new snapshot since the cached values: read the whole batch from it.
            missing = list(dict.fromkeys(wanted))
            fetched = self.store.read(view, pd.Series(missing, dtype=object))
            cached = [None] * len(wanted)
        self._dtypes.setdefault(view, fetched.values.dtypes)
        self._materialized[fetched.snapshot] = fetched.materialized_at
        rows = list(fetched.values.itertuples(index=False, name=None))
        got = dict(zip(missing, rows, strict=True))
        self.cache.put_many(((view, fetched.snapshot, k), r) for k, r in got.items())
        filled = [row if row is not None else got[k] for k, row in zip(wanted, cached, strict=True)]
        return self._rows(view, keys, filled, fetched.snapshot)

    def _rows(
        self, view: str, keys: pd.Series, rows: list[_Row], snapshot: str | None
    ) -> FeatureRows:
        # Column by column from the rows, typed as the store types them: a few
        # microseconds a column, where a frame of records cast afterwards costs a
        # millisecond (as much as a Redis round trip).
        columns = {
            name: _column([row[j] for row in rows], dtype, keys.index)
            for j, (name, dtype) in enumerate(self._dtypes[view].items())
        }
        values = pd.DataFrame(columns, copy=False)
        return FeatureRows(values, snapshot, self._materialized.get(snapshot))

    def lookup(self, view: str, keys: pd.Series) -> pd.DataFrame:
        return self.read(view, keys).values

    def write(self, view: str, latest: pd.DataFrame) -> int:
        self.cache.clear()
        return self.store.write(view, latest)

    def clear(self) -> None:
        """Forget every cached value."""
        self.cache.clear()

    def close(self) -> None:
        self.cache.clear()
        self.store.close()
