"""Offline feature store: parquet tables of feature values per entity over time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd

from stageline.spec import FeatureViewSpec, PipelineSpec
from stageline.storage import (
    StorageError,
    StorageLocations,
    is_remote,
    join,
    read_parquet,
    write_parquet,
)


class FeatureStoreError(RuntimeError):
    """The feature store cannot serve a view (missing table, bad columns)."""


_DTYPES: dict[str, Any] = {"float": "float64", "int": "int64", "bool": "bool", "str": object}
_TIME: Final = "datetime64[ns, UTC]"
"""Row times and event times meet in one dtype (parquet may hold other units)."""


def found_column(view: str) -> str:
    """Name of the flag column: False where the entity was unknown to the view."""
    return f"{view}_found"


def with_defaults(
    values: pd.DataFrame, view: str, spec: FeatureViewSpec, found: np.ndarray[Any, Any]
) -> pd.DataFrame:
    """Typed feature columns, the view's defaults where not ``found``, plus the flag.

    Used by the online lookup and the point-in-time join alike, so an unknown
    entity gets the same values in training, online and batch.
    """
    out = pd.DataFrame(index=values.index)
    for name, feat in spec.features.items():
        column = values[name] if name in values.columns else pd.Series(np.nan, index=values.index)
        column = column.where(found, feat.default)
        if column.isna().any():
            column = column.fillna(feat.default)
        out[name] = column.astype(_DTYPES[feat.type])
    out[found_column(view)] = found
    return out


class OfflineStore:
    """Parquet tables under ``<home>/features/<view>.parquet``, or under ``location``
    (a folder or an object-storage URI such as ``s3://bucket/features``); a view's own
    ``source`` wins over both."""

    def __init__(
        self,
        home: Path,
        views: Mapping[str, FeatureViewSpec],
        base_dir: Path | None = None,
        *,
        location: str | None = None,
    ) -> None:
        self.home = Path(home)
        self.views = dict(views)
        self.base_dir = base_dir or Path.cwd()
        self.location = location or str(self.home / "features")

    @classmethod
    def for_spec(
        cls, spec: PipelineSpec, home: Path, locations: StorageLocations | None = None
    ) -> OfflineStore:
        """The offline store of ``spec``, where its storage locations say."""
        locations = locations or StorageLocations.resolve(spec, home)
        return cls(home, spec.features.views, spec.base_dir, location=locations.features)

    def view(self, name: str) -> FeatureViewSpec:
        try:
            return self.views[name]
        except KeyError:
            raise FeatureStoreError(
                f"unknown feature view {name!r}; the spec defines: {sorted(self.views) or 'none'}"
                " (add it under features.views)"
            ) from None

    def path(self, name: str) -> Path | str:
        """Where the view's table is: a local path, or a URI on object storage."""
        view = self.view(name)
        if view.source:
            if is_remote(view.source):
                return view.source
            source = Path(view.source)
            return source if source.is_absolute() else self.base_dir / source
        if is_remote(self.location):
            return join(self.location, f"{name}.parquet")
        return Path(self.location) / f"{name}.parquet"

    def read(self, name: str) -> pd.DataFrame:
        """The whole history of a view: entity, event time and feature columns."""
        view, path = self.view(name), self.path(name)
        try:
            frame = read_parquet(path)
        except StorageError as exc:
            raise FeatureStoreError(f"feature view {name!r}: {exc}") from exc
        if frame is None:
            raise FeatureStoreError(
                f"feature view {name!r}: no offline table at {path} "
                "(run `stageline demo`, or write the table there)"
            )
        missing = [c for c in (view.entity, view.event_time, *view.features) if c not in frame]
        if missing:
            raise FeatureStoreError(f"feature view {name!r}: {path} lacks column(s) {missing}")
        frame[view.event_time] = pd.to_datetime(frame[view.event_time], utc=True)
        return frame

    def write(self, name: str, frame: pd.DataFrame) -> Path | str:
        """Replace a view's offline table atomically."""
        try:
            return write_parquet(self.path(name), frame)
        except StorageError as exc:
            raise FeatureStoreError(f"feature view {name!r}: {exc}") from exc

    def latest(self, name: str) -> pd.DataFrame:
        """The newest row per entity: what the online store serves."""
        view = self.view(name)
        frame = self.read(name).sort_values(view.event_time, kind="stable")
        return frame.drop_duplicates(view.entity, keep="last").reset_index(drop=True)

    def history(self, name: str) -> FeatureHistory:
        """A view's whole table, read and sorted once, to join as of any times."""
        return FeatureHistory(name, self.view(name), self.read(name))

    def point_in_time_join(
        self, rows: pd.DataFrame, name: str, *, timestamp: str, key: str | None = None
    ) -> pd.DataFrame:
        """``rows`` plus each entity's feature values as of the row's ``timestamp`` column.

        Only values whose event time is at or before the row's timestamp are
        used, so a training set never sees the future. Rows keep their order;
        an entity with no earlier value gets the view's defaults and
        ``<view>_found=False``.
        """
        history = self.history(name)
        features = history.as_of(rows[key or history.view.entity], rows[timestamp])
        return pd.concat(
            [rows.drop(columns=list(features.columns), errors="ignore"), features], axis=1
        )


class FeatureHistory:
    """One feature view's history, sorted by event time: its values as of any time.

    Built once (a training set, or a stage scoring ``as_of``), joined per batch.
    """

    def __init__(self, name: str, view: FeatureViewSpec, table: pd.DataFrame) -> None:
        self.name = name
        self.view = view
        right = table.rename(columns={view.entity: "_key", view.event_time: "_ts"})
        right = right[["_key", "_ts", *view.features]].sort_values("_ts", kind="stable")
        right["_key"] = right["_key"].astype(str)
        right["_ts"] = right["_ts"].astype(_TIME)
        right["_hit"] = True
        self.table = right.reset_index(drop=True)

    def as_of(self, keys: pd.Series, times: pd.Series) -> pd.DataFrame:
        """For each key, the typed feature values whose event time is the newest at or
        before its time (naive times are UTC), and ``<view>_found``; on ``keys.index``.
        A key with no value by then gets the view's defaults and ``found=False``."""
        at = pd.to_datetime(times, utc=True).astype(_TIME)
        if at.isna().any():
            raise FeatureStoreError(
                f"feature view {self.name!r}: {int(at.isna().sum())} row(s) have no time "
                "to join features as of"
            )
        left = pd.DataFrame(
            {
                "_key": keys.astype(str).to_numpy(),
                "_ts": at.to_numpy(),
                "_pos": np.arange(len(keys)),
            }
        ).sort_values("_ts", kind="stable")
        left["_key"] = left["_key"].astype(self.table["_key"].dtype)
        joined = pd.merge_asof(
            left, self.table, on="_ts", by="_key", direction="backward", allow_exact_matches=True
        ).sort_values("_pos")
        found = joined["_hit"].eq(True).to_numpy()
        features = with_defaults(joined.reset_index(drop=True), self.name, self.view, found)
        features.index = keys.index
        return features
