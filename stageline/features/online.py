"""Online feature store: the latest feature values per entity, looked up per batch.

The store is an interface (:class:`OnlineStore`). The embedded default,
:class:`MemoryOnlineStore`, holds the materialized snapshot in process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from stageline.features.offline import FeatureStoreError, OfflineStore, with_defaults
from stageline.spec import PipelineSpec, RedisStoreSpec
from stageline.storage import (
    StorageError,
    StorageLocations,
    is_remote,
    join,
    read_parquet,
    write_parquet,
)

log = logging.getLogger(__name__)


class StoreUnavailableError(FeatureStoreError):
    """The online store cannot be reached: online a 503, in batch a retry."""


class OnlineStore(Protocol):
    """Latest feature values per entity key."""

    def lookup(self, view: str, keys: pd.Series) -> pd.DataFrame:
        """One row per key, in order: typed features (defaults where unknown) and
        ``<view>_found``. One round trip per batch, whatever its size."""
        ...

    def write(self, view: str, latest: pd.DataFrame) -> int:
        """Replace the view's values with ``latest`` (one row per entity); rows written."""
        ...

    def close(self) -> None: ...


class MemoryOnlineStore:
    """In-process store loaded from ``<snapshots>/<view>.parquet`` (default
    ``<home>/online``; a folder or an object-storage URI).

    ``write`` (what ``stageline materialize`` calls) replaces that snapshot
    atomically; a replica loads it once at start. A view never materialized
    is built from the offline table's latest values, with a warning.
    """

    def __init__(self, offline: OfflineStore, snapshot_dir: Path | str) -> None:
        self.offline = offline
        self.snapshot_dir = snapshot_dir if is_remote(snapshot_dir) else Path(snapshot_dir)
        self._tables: dict[str, pd.DataFrame] = {}
        self._rows: dict[str, dict[str, int]] = {}  # per view: entity key -> row of its table

    def _snapshot(self, view: str) -> Path | str:
        if isinstance(self.snapshot_dir, Path):
            return self.snapshot_dir / f"{view}.parquet"
        return join(self.snapshot_dir, f"{view}.parquet")

    def _table(self, view: str) -> pd.DataFrame:
        """The view's features as served: typed, defaults filled, ``<view>_found`` True;
        one more row at the end holds what an unknown entity gets (found False). Built
        once, so a lookup is one ``take`` (the values are those of :func:`with_defaults`
        applied per lookup: each of its steps works row by row)."""
        table = self._tables.get(view)
        if table is None:
            spec = self.offline.view(view)
            path = self._snapshot(view)
            try:
                table = read_parquet(path)
            except StorageError as exc:
                raise FeatureStoreError(f"feature view {view!r}: {exc}") from exc
            if table is None:
                log.warning(
                    "feature view %r has no online snapshot at %s; serving the offline "
                    "table's latest values (run `stageline materialize` to snapshot them)",
                    view,
                    path,
                )
                table = self.offline.latest(view)
            table = table.drop_duplicates(spec.entity, keep="last")
            entities = table[spec.entity].astype(str).tolist()
            values = table[list(spec.features)].reset_index(drop=True)
            unknown = pd.DataFrame({name: [None] for name in spec.features}, index=[len(values)])
            found = np.arange(len(values) + 1) < len(values)
            table = with_defaults(pd.concat([values, unknown]), view, spec, found)
            self._tables[view] = table
            self._rows[view] = {key: row for row, key in enumerate(entities)}
        return table

    def lookup(self, view: str, keys: pd.Series) -> pd.DataFrame:
        table = self._table(view)
        rows, unknown = self._rows[view], len(table) - 1
        if keys.dtype.kind in "biufcmM":  # keys are matched as text
            keys = keys.astype(str)
        # A dict per key, not Index.get_indexer: a tenth of the cost for the one key of a
        # request, about as fast for a batch. A missing key (not text) is unknown.
        positions = np.fromiter((rows.get(k, unknown) for k in keys.tolist()), np.intp, len(keys))
        out = table.take(positions)
        out.index = keys.index
        return out

    def write(self, view: str, latest: pd.DataFrame) -> int:
        spec = self.offline.view(view)
        frame = latest[[spec.entity, spec.event_time, *spec.features]]
        try:
            write_parquet(self._snapshot(view), frame)
        except StorageError as exc:
            raise FeatureStoreError(f"feature view {view!r}: {exc}") from exc
        self._tables.pop(view, None)
        return len(frame)

    def close(self) -> None:
        self._tables.clear()
        self._rows.clear()


def open_online_store(
    spec: PipelineSpec, home: Path, locations: StorageLocations | None = None
) -> OnlineStore:
    """The online store the spec selects."""
    locations = locations or StorageLocations.resolve(spec, home)
    offline = OfflineStore.for_spec(spec, home, locations)
    online = spec.features.online
    if isinstance(online, RedisStoreSpec):
        from stageline.features.redis_store import RedisOnlineStore

        return RedisOnlineStore(online, offline)
    return MemoryOnlineStore(offline, locations.online)


def materialize(
    spec: PipelineSpec,
    home: Path,
    views: Iterable[str] | None = None,
    locations: StorageLocations | None = None,
) -> dict[str, int]:
    """Write each view's latest offline values to the online store; rows per view."""
    locations = locations or StorageLocations.resolve(spec, home)
    offline = OfflineStore.for_spec(spec, home, locations)
    store = open_online_store(spec, home, locations)
    try:
        return {v: store.write(v, offline.latest(v)) for v in (views or spec.features.views)}
    finally:
        store.close()
