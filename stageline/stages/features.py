"""FeatureLookup: join precomputed entity features, latest or as of each row's time."""

from __future__ import annotations

import pandas as pd

from stageline.context import StageContext, as_of_field
from stageline.features import found_column
from stageline.features.offline import FeatureHistory
from stageline.features.online import OnlineStore
from stageline.stage import BaseStage, with_columns


class FeatureLookup(BaseStage):
    """Adds a feature view's columns for each row's entity key.

    By default the values are the online store's latest. When the pipeline scores
    ``as_of`` (a backfill, a backtest), they are the offline store's values as of
    each row's event time (``request.event_time``), exactly as training joins them.
    Either way, an entity unknown by then gets the view's defaults and
    ``<view>_found=False``: a new customer is scored, not rejected.
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
            found = self.history.as_of(batch[self.key], batch[self.event_time])
        else:
            assert self.store is not None
            found = self.store.lookup(self.view, batch[self.key])
        return with_columns(batch, found)
