"""Online feature store: the latest feature values per entity, looked up per batch.

The store is an interface (:class:`OnlineStore`). The embedded default,
:class:`MemoryOnlineStore`, holds the materialized snapshot in process and swaps in a
newer one when ``stageline materialize`` writes it. With ``features.cache`` in the
spec, a remote store gets a per-replica lookup cache in front
(:class:`~stageline.features.cache.CachedOnlineStore`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stageline.features.offline import FeatureStoreError, OfflineStore, with_defaults
from stageline.spec import PipelineSpec, RedisStoreSpec
from stageline.storage import (
    StorageError,
    StorageLocations,
    is_remote,
    join,
    open_location,
    storage_problem,
    write_parquet,
)

log = logging.getLogger(__name__)


class StoreUnavailableError(FeatureStoreError):
    """The online store cannot be reached: online a 503, in batch a retry."""


MATERIALIZED_AT = "stageline.materialized_at"
"""Snapshot file metadata: when ``stageline materialize`` wrote it (Unix seconds)."""


@dataclass(frozen=True)
class FeatureRows:
    """What one lookup read: the values, and the one snapshot they all come from."""

    values: pd.DataFrame
    """One row per key, in order: typed features and ``<view>_found``."""
    snapshot: str | None
    """Which snapshot was read (None: a view never materialized, served from the
    offline table)."""
    materialized_at: float | None
    """When that snapshot was materialized (Unix seconds), if known."""


class OnlineStore(Protocol):
    """Latest feature values per entity key."""

    def read(self, view: str, keys: pd.Series) -> FeatureRows:
        """One row per key, in order: typed features (defaults where unknown) and
        ``<view>_found``, all from one snapshot. One round trip per batch, whatever
        its size."""
        ...

    def lookup(self, view: str, keys: pd.Series) -> pd.DataFrame:
        """``read(view, keys).values``."""
        ...

    def current(self, view: str) -> str | None:
        """The snapshot a read of ``view`` would serve, as far as this store knows
        without asking anyone (None before the first read)."""
        ...

    def write(self, view: str, latest: pd.DataFrame) -> int:
        """Replace the view's values with ``latest`` (one row per entity); rows written."""
        ...

    def close(self) -> None: ...


class Watcher:
    """Calls ``check`` every ``interval_s`` in a daemon thread, until stopped: how a
    replica notices a new snapshot without a request having to wait for the check.

    It holds its store weakly: a store dropped without ``close`` (a pipeline built for
    one call) ends its thread instead of staying loaded for good."""

    def __init__(self, check: Callable[[], None], interval_s: float, name: str) -> None:
        self._check = weakref.WeakMethod(check)
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            check = self._check()
            if check is None:  # the store is gone
                return
            try:
                check()
            except Exception:  # the snapshot being served stays; the next check retries
                log.exception("checking the online store for a new snapshot failed")
            del check

    def stop(self) -> None:
        self._stop.set()


@dataclass(frozen=True)
class _Snapshot:
    """One view's loaded snapshot, never changed once built: a read takes one reference
    and uses it for the whole batch, while a newer one may replace it in the store."""

    identity: str | None  # the file's inode, size and mtime; None: the offline fallback
    materialized_at: float | None
    table: pd.DataFrame  # served rows, then one for unknown entities
    rows: dict[str, int]  # entity key -> row of table


class MemoryOnlineStore:
    """In-process store loaded from ``<snapshots>/<view>.parquet`` (default
    ``<home>/online``; a folder or an object-storage URI).

    ``write`` (what ``stageline materialize`` calls) replaces that snapshot
    atomically. Every ``refresh_s`` a background thread checks whether the file was
    replaced; a new one is loaded beside the old and swapped in whole, so a running
    replica serves it without a restart, and a lookup never mixes the two. A view
    never materialized is built from the offline table's latest values, with a
    warning (and picked up from its snapshot once one is written).
    """

    def __init__(
        self, offline: OfflineStore, snapshot_dir: Path | str, refresh_s: float = 0
    ) -> None:
        self.offline = offline
        self.snapshot_dir = snapshot_dir if is_remote(snapshot_dir) else Path(snapshot_dir)
        self.refresh_s = refresh_s
        self._snapshots: dict[str, _Snapshot] = {}
        self._load_lock = threading.Lock()
        self._watcher: Watcher | None = None

    def _path(self, view: str) -> Path | str:
        if isinstance(self.snapshot_dir, Path):
            return self.snapshot_dir / f"{view}.parquet"
        return join(self.snapshot_dir, f"{view}.parquet")

    def _get(self, view: str) -> _Snapshot:
        snapshot = self._snapshots.get(view)
        if snapshot is None:
            with self._load_lock:
                snapshot = self._snapshots.get(view)
                if snapshot is None:
                    snapshot = self._snapshots[view] = self._load(view)
            if self.refresh_s > 0 and self._watcher is None:
                self._watcher = Watcher(self.check, self.refresh_s, "online-store-refresh")
        return snapshot

    def _load(self, view: str) -> _Snapshot:
        """The view's features as served: typed, defaults filled, ``<view>_found`` True;
        one more row at the end holds what an unknown entity gets (found False). Built
        once per snapshot, so a lookup is one ``take`` (the values are those of
        :func:`with_defaults` applied per lookup: each of its steps works row by row)."""
        spec = self.offline.view(view)
        path = self._path(view)
        try:
            identity, at, table = _read_snapshot(path)
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
        served = with_defaults(pd.concat([values, unknown]), view, spec, found)
        rows = {key: row for row, key in enumerate(entities)}
        return _Snapshot(identity, at, served, rows)

    def check(self) -> None:
        """Load each view whose snapshot file changed since it was loaded, and swap it
        in. What the refresh thread runs; a lookup never waits for it."""
        for view, snapshot in list(self._snapshots.items()):
            if _identity(self._path(view)) != snapshot.identity:
                fresh = self._load(view)
                if fresh.identity is None:  # removed: keep serving what was loaded
                    continue
                self._snapshots[view] = fresh  # one assignment: readers see old or new
                log.info(
                    "feature view %r: serving the snapshot materialized at %s",
                    view,
                    _when(fresh.materialized_at),
                )

    def current(self, view: str) -> str | None:
        snapshot = self._snapshots.get(view)
        return None if snapshot is None else snapshot.identity

    def read(self, view: str, keys: pd.Series) -> FeatureRows:
        snapshot = self._get(view)  # one reference for the whole batch
        table, rows, unknown = snapshot.table, snapshot.rows, len(snapshot.table) - 1
        if keys.dtype.kind in "biufcmM":  # keys are matched as text
            keys = keys.astype(str)
        # A dict per key, not Index.get_indexer: a tenth of the cost for the one key of a
        # request, about as fast for a batch. A missing key (not text) is unknown.
        positions = np.fromiter((rows.get(k, unknown) for k in keys.tolist()), np.intp, len(keys))
        out = table.take(positions)
        out.index = keys.index
        return FeatureRows(out, snapshot.identity, snapshot.materialized_at)

    def lookup(self, view: str, keys: pd.Series) -> pd.DataFrame:
        return self.read(view, keys).values

    def write(self, view: str, latest: pd.DataFrame, materialized_at: float | None = None) -> int:
        """Publish ``latest`` as the view's snapshot, stamped ``materialized_at`` (now by
        default). Readers of this store see it at once; other replicas at their next
        check."""
        spec = self.offline.view(view)
        frame = latest[[spec.entity, spec.event_time, *spec.features]]
        at = time.time() if materialized_at is None else materialized_at
        try:
            write_parquet(self._path(view), frame, {MATERIALIZED_AT: repr(at)})
        except StorageError as exc:
            raise FeatureStoreError(f"feature view {view!r}: {exc}") from exc
        self._snapshots.pop(view, None)
        return len(frame)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self._snapshots.clear()


def _identity(path: Path | str) -> str | None:
    """What tells one snapshot file from another at ``path`` (None: there is none)."""
    if isinstance(path, Path):
        try:
            return _stat_identity(os.stat(path))
        except FileNotFoundError:
            return None
    uri = os.fspath(path)
    fs, inside = open_location(uri)
    try:
        info = fs.get_file_info(inside)
        if info.type == pafs.FileType.NotFound:
            return None
        footer = pq.read_metadata(inside, filesystem=fs).metadata or {}
    except OSError as exc:
        raise storage_problem(uri, exc) from exc
    return _object_identity(info, footer.get(MATERIALIZED_AT.encode()))


def _stat_identity(st: os.stat_result) -> str:
    # materialize replaces the file (a new inode), and a copy over it changes the rest.
    return f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}"


def _object_identity(info: pafs.FileInfo, stamp: bytes | None) -> str:
    # An object is replaced whole, but its modification time may count whole seconds:
    # the materialization stamp in its footer tells two uploads of one second apart.
    return f"{info.size}-{info.mtime_ns}-{(stamp or b'').decode()}"


def _read_snapshot(path: Path | str) -> tuple[str | None, float | None, pd.DataFrame | None]:
    """The snapshot file's identity, materialization time and rows (all None when there
    is no snapshot). A file written before the time was recorded counts from its
    modification time."""
    if isinstance(path, Path):
        try:
            with open(path, "rb") as f:  # the identity of the very file read
                st = os.fstat(f.fileno())
                table = pq.read_table(f)
        except FileNotFoundError:
            return None, None, None
        identity, modified = _stat_identity(st), st.st_mtime
    else:
        uri = os.fspath(path)
        fs, inside = open_location(uri)
        try:
            info = fs.get_file_info(inside)
            if info.type == pafs.FileType.NotFound:
                return None, None, None
            table = pq.read_table(inside, filesystem=fs)
        except OSError as exc:
            raise storage_problem(uri, exc) from exc
        modified = info.mtime.timestamp() if info.mtime is not None else time.time()
        identity = _object_identity(
            info, (table.schema.metadata or {}).get(MATERIALIZED_AT.encode())
        )
    stamp = (table.schema.metadata or {}).get(MATERIALIZED_AT.encode())
    at = float(stamp) if stamp is not None else modified
    return identity, at, table.to_pandas()


def _when(at: float | None) -> str:
    if at is None:
        return "an unknown time"
    return datetime.fromtimestamp(at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def open_online_store(
    spec: PipelineSpec, home: Path, locations: StorageLocations | None = None
) -> OnlineStore:
    """The online store the spec selects, behind the spec's lookup cache if any (the
    in-memory store is used as it is: it is in the replica already, and a cache in
    front of it only costs time: ``python -m bench.cache`` measures both)."""
    locations = locations or StorageLocations.resolve(spec, home)
    offline = OfflineStore.for_spec(spec, home, locations)
    online = spec.features.online
    cache = spec.features.cache
    if isinstance(online, RedisStoreSpec):
        from stageline.features.cache import CachedOnlineStore
        from stageline.features.redis_store import RedisOnlineStore

        store = RedisOnlineStore(online, offline, watch=cache is not None)
        return store if cache is None else CachedOnlineStore(store, cache)
    return MemoryOnlineStore(offline, locations.online, refresh_s=online.refresh_s)


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
