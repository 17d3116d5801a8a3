"""The feature store section of a pipeline spec: views and the online store."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from stageline.spec_base import SpecModel


class FeatureSpec(SpecModel):
    """One feature of a view."""

    type: Literal["str", "int", "float", "bool"]
    """The feature's column type."""
    default: Any
    """Value served for an entity the store does not know."""


class FeatureViewSpec(SpecModel):
    """A table of precomputed features per entity, with an event time."""

    entity: str
    """Entity key column, e.g. ``customer_id``."""
    event_time: str = "event_time"
    """When each row's values became true (point-in-time joins use it)."""
    source: str | None = None
    """Parquet file or folder of the offline table; default ``<home>/features/<view>``."""
    features: dict[str, FeatureSpec]
    """The view's features by column name."""
    max_age_s: float | None = Field(default=None, gt=0)
    """Oldest online snapshot served, in seconds since ``stageline materialize`` wrote
    it (the age exported as ``stageline_feature_age_s``). Past it, ``on_stale`` decides.
    Unset: any age is served. The offline fallback of a view never materialized has no
    age and is never stale."""
    on_stale: Literal["unavailable", "reject"] = "unavailable"
    """What a lookup on a snapshot older than ``max_age_s`` does. ``unavailable`` (the
    default): the request fails as if the store were down, a 503 with Retry-After,
    which clients already handle (a batch run retries the block, then fails): nothing
    is scored on features older than you allow. ``reject``: each row is rejected with
    its reason (``features: feature view 'v' is stale: ...``), as a stage rejects a bad
    row: a batch run quarantines them and goes on; online, a request whose records are
    all rejected is a 422 naming the reason, with ``?partial=true`` each record is
    answered with its ``error``."""


class MemoryStoreSpec(SpecModel):
    """In-process online store, loaded from the materialized snapshot (the default)."""

    kind: Literal["memory"] = "memory"
    refresh_s: float = Field(default=5.0, ge=0)
    """How often a replica checks each view's snapshot file for a newer one (written by
    ``stageline materialize``). A new one is loaded in the background and swapped in
    whole: a running server serves it within about this long, without a restart, and
    no lookup ever mixes two snapshots. ``0``: load once, never check."""


REDIS_PASSWORD_ENV = "STAGELINE_REDIS_PASSWORD"
"""Where a Redis store chosen with ``--online`` (not in the spec) reads its password."""


class RedisStoreSpec(SpecModel):
    """Online store in Redis: shared by every replica, updated by ``stageline materialize``."""

    kind: Literal["redis"]
    url: str = Field(pattern=r"^rediss?://")
    """``redis://host:port/db`` (``rediss://`` for TLS). Put no password here."""
    password_env: str | None = None
    """Environment variable holding the password."""
    password_file: str | None = None
    """File holding the password (read when ``password_env`` is unset or empty)."""
    timeout_ms: float = Field(default=200, gt=0)
    """Connect and read timeout: past it a lookup fails fast (online: a 503)."""
    max_connections: int = Field(default=16, ge=1)
    """Connection pool size per replica or actor."""
    prefix: str = "stageline"
    """Key prefix, to share one Redis between pipelines."""
    refresh_s: float = Field(default=5.0, ge=0)
    """With a ``cache``: how often a replica asks Redis which snapshot is current, so
    cached values of a replaced snapshot stop being served (a lookup that misses the
    cache notices a new snapshot at once anyway). Without a cache every lookup reads the
    current snapshot, and this is unused."""


class LookupCacheSpec(SpecModel):
    """A per-replica cache of feature lookups, in front of the online store."""

    max_entries: int = Field(default=100_000, ge=1)
    """Most entity keys held, over all views; the least recently used go first."""
    ttl_s: float = Field(default=5.0, gt=0)
    """How long a cached value is served. A new materialized snapshot replaces cached
    values before that (at the next check, see the store's ``refresh_s``)."""


OnlineStoreSpec = Annotated[MemoryStoreSpec | RedisStoreSpec, Field(discriminator="kind")]


class FeatureStoreSpec(SpecModel):
    """Where stages look features up: the views, and the store serving them online."""

    online: OnlineStoreSpec = MemoryStoreSpec()
    """The online store; ``kind`` picks which."""
    views: dict[str, FeatureViewSpec] = {}
    """Feature views by name."""
    cache: LookupCacheSpec | None = None
    """Cache lookups in each replica (``cache: {}`` for the defaults). Off by default:
    it trades up to ``ttl_s`` of staleness for fewer store round trips, worth it for a
    remote store (Redis) with often repeated entities. The in-memory store is already
    in the replica and ignores it (a cache in front of it only costs time)."""
