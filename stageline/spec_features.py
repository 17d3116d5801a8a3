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


class MemoryStoreSpec(SpecModel):
    """In-process online store, loaded from the materialized snapshot (the default)."""

    kind: Literal["memory"] = "memory"


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


OnlineStoreSpec = Annotated[MemoryStoreSpec | RedisStoreSpec, Field(discriminator="kind")]


class FeatureStoreSpec(SpecModel):
    """Where stages look features up: the views, and the store serving them online."""

    online: OnlineStoreSpec = MemoryStoreSpec()
    """The online store; ``kind`` picks which."""
    views: dict[str, FeatureViewSpec] = {}
    """Feature views by name."""
