"""FeatureLookup: join precomputed entity features, latest or as of each row's time."""

from __future__ import annotations

import time
from collections.abc import Hashable

import numpy as np
import pandas as pd

from stageline.context import StageContext, as_of_field
from stageline.features import found_column
from stageline.features.cache import CachedOnlineStore
from stageline.features.offline import FeatureHistory
from stageline.features.online import OnlineStore, StoreUnavailableError
from stageline.stage import BaseStage, Reading, mark_errors, with_columns


class StaleFeaturesError(StoreUnavailableError):
    """The online snapshot is older than its view's ``max_age_s`` (``on_stale:
    unavailable``): online a 503, as for a store that is down."""


class FeatureLookup(BaseStage):
    """Adds a feature view's columns for each row's entity key.

    By default the values are the online store's latest. When the pipeline scores
    ``as_of`` (a backfill, a backtest), they are the offline store's values as of
    each row's event time (``request.event_time``), exactly as training joins them.
    Either way, an entity unknown by then gets the view's defaults and
    ``<view>_found=False``: a new customer is scored, not rejected.

    Online, every batch reads one snapshot, whose age (now minus when ``stageline
    materialize`` wrote it) is reported as ``feature_age_s``; past the view's
    ``max_age_s`` the batch is rejected or fails as unavailable (``on_stale``).
    """

    def __init__(self, *, view: str, context: StageContext, key: str | None = None) -> None:
        super().__init__(name=context.stage_name)
        offline = context.offline_store()
        self.view = view
        self.spec = offline.view(view)
        self.key = key or self.spec.entity
        self.store: OnlineStore | None = None
        self.history: FeatureHistory | None = None
        self.event_time: str | None = None
        self.age_s: float | None = None  # of the snapshot the last batch read
        if context.as_of:
            self.event_time = as_of_field(context.spec)
            self.history = offline.history(view)  # the whole table, once per replica or actor
        else:
            self.store = context.online_store()
            self.store.lookup(view, pd.Series([], dtype=str))  # load now, not on the first request

    def required_columns(self) -> tuple[str, ...]:
        return (self.key,) if self.event_time is None else (self.key, self.event_time)

    def provided_columns(self) -> tuple[str, ...]:
        return (*self.spec.features, found_column(self.view))

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        if self.history is not None and self.event_time is not None:
            return with_columns(batch, self.history.as_of(batch[self.key], batch[self.event_time]))
        assert self.store is not None
        rows = self.store.read(self.view, batch[self.key])
        out = with_columns(batch, rows.values)
        if rows.materialized_at is None:
            return out
        self.age_s = age = max(0.0, time.time() - rows.materialized_at)
        max_age = self.spec.max_age_s
        if max_age is None or age <= max_age or not len(out):
            return out
        reason = (
            f"feature view {self.view!r} is stale: its snapshot was materialized {age:.0f} s "
            f"ago, over its max_age_s of {max_age:g}; run `stageline materialize`"
        )
        if self.spec.on_stale == "unavailable":
            raise StaleFeaturesError(reason)
        return mark_errors(out, np.ones(len(out), dtype=bool), self.name, reason)

    def readings(self) -> list[Reading]:
        """The last snapshot's age; with a lookup cache, its hits and misses."""
        tags = {"view": self.view}
        out = [] if self.age_s is None else [Reading("feature_age_s", self.age_s, tags)]
        if isinstance(self.store, CachedOnlineStore):
            counts = self.store.counts
            out.append(Reading("feature_cache_lookups", counts.hits, {**tags, "result": "hit"}))
            out.append(Reading("feature_cache_lookups", counts.misses, {**tags, "result": "miss"}))
        return out

    def data_version(self) -> Hashable:
        """The snapshot being served (a response cache drops its answers when it changes)."""
        return None if self.store is None else self.store.current(self.view)
