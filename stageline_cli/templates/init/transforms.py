"""__NAME__'s request-time features: one function that training, serving and batch all call.

The spec names it (``function: "transforms.py:features"`` under the ``transform``
stage). It takes a DataFrame of any length (one row online, thousands in batch) and
returns only its new columns, same rows, same order: whole-column operations, no
per-row Python. ``requires`` are columns it reads (request fields, or feature view
columns the ``features`` stage added); ``provides`` are the columns it returns. A row
whose numeric result is not finite (a division by zero) is rejected with its reason.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from stageline.stages.transform import on_demand


@on_demand(
    requires=("amount", "avg_amount_30d", "ts"),
    provides=("amount_to_avg", "log_amount", "hour", "is_night"),
)
def features(batch: pd.DataFrame) -> pd.DataFrame:
    """The amount against the customer's habit, and the time of day."""
    amount = batch["amount"].to_numpy(dtype="float64")
    hour = pd.to_datetime(batch["ts"], utc=True).dt.hour.to_numpy()
    return pd.DataFrame(
        {
            # +1: a customer whose average is 0 gets a large ratio, not a division by zero.
            "amount_to_avg": amount / (batch["avg_amount_30d"].to_numpy(dtype="float64") + 1.0),
            "log_amount": np.log1p(amount),
            "hour": hour.astype("int64"),
            "is_night": (hour < 6).astype("int64"),
        },
        index=batch.index,
    )
