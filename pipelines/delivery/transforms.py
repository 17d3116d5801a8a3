"""The delivery pipeline's request-time features: used by training, Serve and Data alike.

The spec names this function by file path (``delivery/transforms.py:features``);
training loads it through the spec too, so both compute the very same columns.
"""

from __future__ import annotations

import pandas as pd

from stageline.stages.transform import on_demand

# Nominal speeds, for a first guess of the ride the model then corrects.
SPEED_KMH = {"bike": 15.0, "scooter": 24.0, "car": 30.0}


@on_demand(
    requires=(
        "placed_at",
        "distance_km",
        "items",
        "vehicle",
        "prep_minutes_7d",
        "traffic_index_7d",
        "couriers_on_shift_7d",
        "orders_per_hour_7d",
    ),
    provides=(
        "hour",
        "is_weekend",
        "courier_load",
        "ride_minutes_est",
        "kitchen_minutes_est",
    ),
)
def features(batch: pd.DataFrame) -> pd.DataFrame:
    """Time of day, the zone's courier scarcity, and first guesses of the ride and the kitchen."""
    placed = pd.to_datetime(batch["placed_at"], utc=True)
    distance = batch["distance_km"].to_numpy(dtype="float64")
    items = batch["items"].to_numpy(dtype="float64")
    # The request schema admits only these vehicles, so every row has a speed.
    speed = batch["vehicle"].astype(str).map(SPEED_KMH).to_numpy(dtype="float64")
    traffic = batch["traffic_index_7d"].to_numpy(dtype="float64")
    couriers = batch["couriers_on_shift_7d"].to_numpy(dtype="float64")
    return pd.DataFrame(
        {
            "hour": placed.dt.hour.to_numpy().astype("int64"),
            "is_weekend": (placed.dt.day_of_week.to_numpy() >= 5).astype("int64"),
            # +1: a zone with no courier on shift is scarce, not a division by zero.
            "courier_load": batch["orders_per_hour_7d"].to_numpy(dtype="float64")
            / (couriers + 1.0),
            "ride_minutes_est": distance / speed * 60 * traffic,
            "kitchen_minutes_est": batch["prep_minutes_7d"].to_numpy(dtype="float64")
            * (1 + 0.05 * (items - 1)),
        },
        index=batch.index,
    )
