"""FeatureLookup: join precomputed entity features from the online store."""

from __future__ import annotations

import pandas as pd

from stageline.context import StageContext
from stageline.features import found_column
from stageline.stage import BaseStage


class FeatureLookup(BaseStage):
    """Adds a feature view's columns for each row's entity key.

    An entity the store does not know gets the view's defaults and
    ``<view>_found=False``: a new customer is scored, not rejected.
    """

    def __init__(self, *, view: str, context: StageContext, key: str | None = None) -> None:
        super().__init__(name=context.stage_name)
        self.store = context.online_store()
        self.view = view
        self.spec = context.offline_store().view(view)
        self.key = key or self.spec.entity
        self.store.lookup(view, pd.Series([], dtype=str))  # load now, not on the first request

    def required_columns(self) -> tuple[str, ...]:
        return (self.key,)

    def provided_columns(self) -> tuple[str, ...]:
        return (*self.spec.features, found_column(self.view))

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        found = self.store.lookup(self.view, batch[self.key])
        return pd.concat([batch.drop(columns=list(found.columns), errors="ignore"), found], axis=1)
