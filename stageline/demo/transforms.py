"""The fraud pipeline's request-time features: used by training, Serve and Data alike."""

from __future__ import annotations

import numpy as np
import pandas as pd

from stageline.stages.transform import on_demand


@on_demand(
    requires=("amount", "avg_amount_30d", "ts", "country", "home_country"),
    provides=("amount_to_avg", "log_amount", "hour", "is_night", "is_foreign"),
)
def fraud_features(batch: pd.DataFrame) -> pd.DataFrame:
    """Amount relative to the customer's habit, time of day, and a foreign-country flag."""
    amount = batch["amount"].to_numpy(dtype="float64")
    ts = batch["ts"]
    if not (isinstance(ts.dtype, pd.DatetimeTZDtype) and str(ts.dtype.tz) == "UTC"):
        ts = pd.to_datetime(ts, utc=True)  # validated frames have UTC times already
    hour = ts.dt.hour.to_numpy()
    return pd.DataFrame(
        {
            "amount_to_avg": amount / (batch["avg_amount_30d"].to_numpy(dtype="float64") + 1.0),
            "log_amount": np.log1p(amount),
            "hour": hour.astype("int64"),
            "is_night": (hour < 6).astype("int64"),
            "is_foreign": (
                batch["country"].astype(str).to_numpy()
                != batch["home_country"].astype(str).to_numpy()
            ).astype("int64"),
        },
        index=batch.index,
    )
