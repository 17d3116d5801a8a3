"""Online feature store in Redis.

Layout, per view (the ``{prefix:view}`` hash tag keeps a view in one slot, so
this also works on Redis Cluster)::

    {prefix:view}:current          -> the snapshot id being served
    {prefix:view}:<snapshot>:<key> -> JSON object of the view's features, by name

``write`` (``stageline materialize``) fills a new snapshot (its id starts with the
Unix second it was made at: the snapshot's age), then flips ``current`` and removes
the old one. A lookup is one Lua call that reads
``current`` and every key of the batch: one round trip, and a batch never
mixes two snapshots. Values are stored by name, so reordering a view's features
in the spec changes nothing and a feature added later gets its default. Python's
float repr round-trips exactly: Redis serves bit-identical values to the
in-memory store.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stageline.features.offline import FeatureStoreError, OfflineStore, with_defaults
from stageline.features.online import FeatureRows, StoreUnavailableError, Watcher
from stageline.spec import RedisStoreSpec

log = logging.getLogger(__name__)

_LOOKUP = """
local snapshot = redis.call('GET', KEYS[1])
if not snapshot then return {} end
local base = ARGV[1] .. snapshot .. ':'
if #ARGV < 2 then return {snapshot} end
-- MGET in chunks: Lua's unpack() takes a few thousand values at most.
local values, n = {}, 0
for first = 2, #ARGV, 4000 do
  local keys = {}
  for i = first, math.min(first + 3999, #ARGV) do keys[#keys + 1] = base .. ARGV[i] end
  local got = redis.call('MGET', unpack(keys))
  for i = 1, #keys do n = n + 1; values[n] = got[i] end
end
return {snapshot, values}
"""
_WRITE_CHUNK = 5_000


class RedisOnlineStore:
    """Latest feature values per entity in Redis; one connection pool per instance."""

    def __init__(self, spec: RedisStoreSpec, offline: OfflineStore, watch: bool = False) -> None:
        try:
            import redis
        except ImportError:  # pragma: no cover - the extra is part of the dev install
            raise StoreUnavailableError(
                "the spec selects the Redis online store: pip install 'stageline[redis]'"
            ) from None
        self.spec = spec
        self.offline = offline
        self._auth_error = redis.exceptions.AuthenticationError
        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.BusyLoadingError,
            OSError,
        )
        self.client = redis.Redis.from_url(
            spec.url,
            password=_password(spec),
            socket_timeout=spec.timeout_ms / 1000,
            socket_connect_timeout=spec.timeout_ms / 1000,
            max_connections=spec.max_connections,
            health_check_interval=30,
        )
        self._lookup = self.client.register_script(_LOOKUP)
        self._current: dict[str, str] = {}  # per view read: the snapshot last seen current
        # With a cache in front: ask Redis every refresh_s which snapshot is current,
        # so a cache that answers without a lookup drops a replaced snapshot's values.
        self._watch = watch and spec.refresh_s > 0
        self._watcher: Watcher | None = None

    def _base(self, view: str) -> str:
        return f"{{{self.spec.prefix}:{view}}}:"

    def _where(self) -> str:
        # The URL without credentials: it goes into error messages and logs.
        host = self.spec.url.split("@")[-1].split("://")[-1]
        return f"redis at {host}"

    def lookup(self, view: str, keys: pd.Series) -> pd.DataFrame:
        return self.read(view, keys).values

    def current(self, view: str) -> str | None:
        return self._current.get(view)

    def check(self) -> None:
        """Which snapshot is current, for each view read so far (one round trip)."""
        views = list(self._current)
        if not views:
            return
        try:
            ids = self.client.mget([self._base(v) + "current" for v in views])
        except (*self._errors, self._auth_error) as e:  # type: ignore[misc]
            log.warning("%s did not answer which snapshot is current: %s", self._where(), e)
            return
        for view, snapshot in zip(views, ids, strict=True):
            if snapshot is not None:
                self._current[view] = _text(snapshot)

    def read(self, view: str, keys: pd.Series) -> FeatureRows:
        spec = self.offline.view(view)
        names = list(spec.features)
        wanted = keys.astype(str).tolist()
        base = self._base(view)
        try:
            reply = self._lookup(keys=[base + "current"], args=[base, *wanted])
        except self._auth_error as e:
            raise self._refused(e) from None
        except self._errors as e:
            raise StoreUnavailableError(f"{self._where()} did not answer: {e}") from None
        if not reply:
            raise StoreUnavailableError(
                f"feature view {view!r} was never materialized to {self._where()}: "
                "run `stageline materialize`"
            )
        snapshot = _text(reply[0])
        self._current[view] = snapshot
        if self._watch and self._watcher is None:
            self._watcher = Watcher(self.check, self.spec.refresh_s, "redis-snapshot-check")
        raw = reply[1] if len(reply) > 1 else []
        found = np.array([v is not None for v in raw], dtype=bool)
        rows = [json.loads(v) if v is not None else {} for v in raw]
        values = pd.DataFrame.from_records(rows, columns=names, nrows=len(rows))
        out = with_defaults(values, view, spec, found)
        out.index = keys.index
        return FeatureRows(out, snapshot, _materialized_at(snapshot))

    def write(self, view: str, latest: pd.DataFrame) -> int:
        spec = self.offline.view(view)
        base = self._base(view)
        snapshot = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
        entities = latest[spec.entity].astype(str).to_numpy()
        columns = {f: latest[f].tolist() for f in spec.features}
        try:
            previous = self.client.get(base + "current")
            for start in range(0, len(entities), _WRITE_CHUNK):
                pipe = self.client.pipeline(transaction=False)
                for i in range(start, min(start + _WRITE_CHUNK, len(entities))):
                    values = {name: _plain(col[i]) for name, col in columns.items()}
                    pipe.set(f"{base}{snapshot}:{entities[i]}", json.dumps(values))
                pipe.execute()
            self.client.set(base + "current", snapshot)  # the flip: readers switch at once
            if previous is not None:
                self._drop(base, _text(previous))
        except self._auth_error as e:
            raise self._refused(e) from None
        except self._errors as e:
            raise StoreUnavailableError(f"{self._where()} failed during materialize: {e}") from None
        return len(entities)

    def _refused(self, error: BaseException) -> FeatureStoreError:
        # Not "unavailable": retrying with the same password will never work.
        return FeatureStoreError(
            f"{self._where()} refused the credentials ({error}): check the spec's "
            "password_env / password_file"
        )

    def _drop(self, base: str, snapshot: str) -> None:
        batch: list[Any] = []
        for key in self.client.scan_iter(match=f"{base}{snapshot}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                self.client.unlink(*batch)
                batch.clear()
        if batch:
            self.client.unlink(*batch)

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        self.client.close()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _materialized_at(snapshot: str) -> float | None:
    """A snapshot id starts with the Unix second ``write`` made it at."""
    head = snapshot.split("-", 1)[0]
    return float(head) if head.isdigit() else None


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _password(spec: RedisStoreSpec) -> str | None:
    if spec.password_env and os.environ.get(spec.password_env):
        return os.environ[spec.password_env]
    if spec.password_file:
        return Path(spec.password_file).read_text().strip()
    return None
