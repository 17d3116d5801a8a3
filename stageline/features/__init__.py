"""Feature store: offline parquet tables and online stores."""

from stageline.features.offline import (
    FeatureStoreError,
    OfflineStore,
    found_column,
    with_defaults,
)
from stageline.features.online import (
    MemoryOnlineStore,
    OnlineStore,
    StoreUnavailableError,
    materialize,
    open_online_store,
)

__all__ = [
    "FeatureStoreError",
    "MemoryOnlineStore",
    "OfflineStore",
    "OnlineStore",
    "StoreUnavailableError",
    "found_column",
    "materialize",
    "open_online_store",
    "with_defaults",
]
