"""A seeded synthetic food-delivery world: restaurants, zones, their feature history, orders.

Delivery time follows a known process of what the pipeline sees: the restaurant's
kitchen (its recent prep time, slower with more items and in a busy zone), the wait
for a courier (open orders per active courier in the zone), the ride (distance over a
vehicle's speed, slowed by the zone's congestion at that hour) and the handover, plus
noise. A model can learn it, and its held-out error says whether the pipeline works.

Plain numpy and pandas: no stageline import, so the generator reads on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

ZONES = (
    "harbor",
    "old_town",
    "university",
    "riverside",
    "midtown",
    "uptown",
    "docklands",
    "market",
    "hillside",
    "west_end",
    "east_gate",
    "airport",
)
VEHICLES = ("bike", "scooter", "car")
START = pd.Timestamp("2026-03-02", tz="UTC")  # a Monday
LABEL = "minutes"

# Order volume by hour of day, in blocks of six hours: lunch and dinner peaks.
_DEMAND = np.array(
    [
        [2.0, 1.0, 1.0, 0.5, 0.5, 0.5],
        [1.0, 2.0, 3.0, 3.0, 4.0, 8.0],
        [12.0, 10.0, 6.0, 4.0, 5.0, 9.0],
        [14.0, 15.0, 12.0, 8.0, 5.0, 3.0],
    ]
).ravel()
# Road congestion by hour of day (1.0: free-flowing traffic): morning and evening rush.
_TRAFFIC = np.array(
    [
        [0.8, 0.8, 0.8, 0.8, 0.8, 0.9],
        [1.0, 1.3, 1.6, 1.4, 1.2, 1.2],
        [1.3, 1.3, 1.2, 1.2, 1.3, 1.6],
        [1.7, 1.5, 1.2, 1.0, 0.9, 0.8],
    ]
).ravel()
_SPEED_KMH = {"bike": 15.0, "scooter": 24.0, "car": 30.0}
# How much congestion slows each vehicle: a bike threads through, a car sits in it.
_TRAFFIC_EXPONENT = {"bike": 0.2, "scooter": 0.6, "car": 1.0}

Array = np.ndarray[Any, np.dtype[Any]]


@dataclass(frozen=True)
class World:
    restaurants: pd.DataFrame
    """One row per restaurant the platform knows: ``restaurant_id``, ``zone`` and the
    generator's hidden traits (for tests and curiosity, never for the model)."""
    restaurant_stats: pd.DataFrame
    """The ``restaurant_stats`` view's history: one snapshot per restaurant per day."""
    zone_stats: pd.DataFrame
    """The ``zone_stats`` view's history: one snapshot per zone per day."""
    orders: pd.DataFrame
    """Labelled orders by ``placed_at``: the request fields and ``minutes``."""


def generate(
    *, orders: int = 60_000, restaurants: int = 400, days: int = 42, seed: int = 7
) -> World:
    """The seeded world. Every draw comes from one generator in a fixed order, so a seed
    always yields the same data."""
    rng = np.random.default_rng(seed)
    rest = _restaurants(rng, restaurants)
    zones = _zones(rng)
    restaurant_stats = _restaurant_stats(rng, rest, days)
    zone_stats = _zone_stats(rng, zones, days)
    placed = _orders(rng, rest, zones, orders, days)
    return World(rest, restaurant_stats, zone_stats, placed)


def _restaurants(rng: np.random.Generator, n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "restaurant_id": [f"r{i:05d}" for i in range(n)],
            "zone": rng.choice(ZONES, n),
            # Kitchens differ a lot: a sandwich bar against a wood-fired pizzeria.
            "base_prep": rng.lognormal(np.log(13.0), 0.35, n),
            "popularity": rng.gamma(2.0, 1.0, n),
            "rating": np.clip(rng.normal(4.3, 0.3, n), 2.5, 5.0).round(1),
            "phase": rng.uniform(0, 2 * np.pi, n),
        }
    )


def _zones(rng: np.random.Generator) -> pd.DataFrame:
    n = len(ZONES)
    return pd.DataFrame(
        {
            "zone": ZONES,
            "traffic": rng.uniform(0.8, 1.3, n),  # how jammed the zone's roads are
            "couriers": rng.uniform(15, 45, n),  # couriers on shift at a normal hour
            "demand": rng.uniform(15, 50, n),  # open orders at a normal hour
            "phase": rng.uniform(0, 2 * np.pi, n),
        }
    )


def _zone_levels(zones: pd.DataFrame, z: Array, day: Array) -> tuple[Array, Array, Array]:
    """Zone ``z``'s traffic, couriers and demand at a normal hour of ``day``: slow drifts
    (road works, courier hiring, a marketing push)."""
    phase = zones["phase"].to_numpy(dtype="float64")[z]
    traffic = zones["traffic"].to_numpy(dtype="float64")[z] * (1 + 0.1 * np.sin(day / 5 + phase))
    couriers = zones["couriers"].to_numpy(dtype="float64")[z] * (1 + 0.2 * np.sin(day / 8 - phase))
    demand = zones["demand"].to_numpy(dtype="float64")[z] * (1 + 0.15 * np.cos(day / 7 + phase))
    return traffic, couriers, demand


def _prep(rest: pd.DataFrame, r: Array, day: Array) -> Array:
    """Restaurant ``r``'s typical prep minutes on ``day``: a slow drift (staff, menu)."""
    base = rest["base_prep"].to_numpy(dtype="float64")[r]
    phase = rest["phase"].to_numpy(dtype="float64")[r]
    prep: Array = base * (1 + 0.15 * np.sin(day / 6 + phase))
    return prep


def _restaurant_stats(rng: np.random.Generator, rest: pd.DataFrame, days: int) -> pd.DataFrame:
    """A snapshot at midnight of each day: the last week's prep time, volume and rating."""
    n = len(rest)
    r = np.repeat(np.arange(n), days)
    d = np.tile(np.arange(days), n)
    # The 7-day average lags the drift a little and is measured with some noise.
    prep_7d = _prep(rest, r, d - 2) * rng.lognormal(0, 0.04, len(r))
    volume = rng.poisson(rest["popularity"].to_numpy()[r] * 35)
    rating = rest["rating"].to_numpy()[r] + rng.normal(0, 0.03, len(r))
    return pd.DataFrame(
        {
            "restaurant_id": rest["restaurant_id"].to_numpy()[r],
            "snapshot_at": START + pd.to_timedelta(d, unit="D"),
            "prep_minutes_7d": prep_7d.round(2),
            "orders_7d": volume.astype("int64"),
            "rating": np.clip(rating, 1.0, 5.0).round(2),
        }
    )


def _zone_stats(rng: np.random.Generator, zones: pd.DataFrame, days: int) -> pd.DataFrame:
    """A snapshot at midnight of each day: the zone's last week at a normal hour."""
    n_z = len(zones)
    z = np.repeat(np.arange(n_z), days)
    d = np.tile(np.arange(days), n_z)
    # The week's averages lag the drift a little and are measured with some noise.
    traffic, couriers, demand = _zone_levels(zones, z, d - 3.0)
    noise = rng.lognormal(0, 0.03, (3, len(z)))
    return pd.DataFrame(
        {
            "zone": np.asarray(ZONES, dtype=object)[z],
            "computed_at": START + pd.to_timedelta(d, unit="D"),
            "traffic_index_7d": (traffic * noise[0]).round(3),
            "couriers_on_shift_7d": (couriers * noise[1]).round(1),
            "orders_per_hour_7d": (demand * noise[2]).round(1),
        }
    )


def _orders(
    rng: np.random.Generator, rest: pd.DataFrame, zones: pd.DataFrame, n: int, days: int
) -> pd.DataFrame:
    n_r = len(rest)
    # 3% of orders come from restaurants too new for the feature store to know.
    new_restaurant = rng.random(n) < 0.03
    popularity = rest["popularity"].to_numpy()
    who = rng.choice(n_r, n, p=popularity / popularity.sum())
    day = rng.integers(0, days, n)
    hour = rng.choice(24, n, p=_DEMAND / _DEMAND.sum())
    second = rng.integers(0, 3600, n)
    placed_at = START + pd.to_timedelta(day * 86_400 + hour * 3600 + second, unit="s")

    # Most customers order from their own zone; the zone is where the food goes.
    home_zone = pd.Index(ZONES).get_indexer(pd.Index(rest["zone"]))[who]
    z = np.where(rng.random(n) < 0.75, home_zone, rng.integers(0, len(ZONES), n))
    distance = np.clip(
        rng.lognormal(np.log(2.5), 0.5, n) + np.where(z != home_zone, 2.5, 0.0), 0.2, 25.0
    ).round(2)
    items = np.clip(1 + rng.poisson(1.6, n), 1, 30)
    # Couriers on cars take the long trips more often.
    p_car = np.clip(0.1 + distance / 20, 0, 0.7)
    u = rng.random(n)
    v = np.where(u < p_car, 2, np.where(u < p_car + (1 - p_car) * 0.45, 1, 0))  # VEHICLES

    # The zone in the hour the order was placed: its day's levels shaped by the hour,
    # plus what no snapshot sees (an accident, a rain shower, a no-show courier).
    traffic, couriers, demand = _zone_levels(zones, z, day.astype("float64"))
    weekend = day % 7 >= 5
    shape = _DEMAND[hour] / _DEMAND.mean()
    congestion = traffic * _TRAFFIC[hour] * np.where(weekend, 0.85, 1.0) * rng.lognormal(0, 0.08, n)
    on_shift = rng.poisson(couriers * (0.4 + 0.6 * shape**0.7))
    open_orders = rng.poisson(demand * shape * np.where(weekend, 1.25, 1.0))
    load = open_orders / (on_shift + 1.0)

    kitchen = np.where(
        new_restaurant, rng.lognormal(np.log(13.0), 0.35, n), _prep(rest, who, day.astype(float))
    )
    kitchen = kitchen * (1 + 0.06 * (items - 1)) * (1 + 0.15 * np.clip(load - 1, 0, 2))
    kitchen *= rng.lognormal(0, 0.12, n)
    courier_wait = (3.0 + 7.0 * np.clip(load - 0.7, 0, 3)) * rng.lognormal(0, 0.25, n)
    speed = np.array([_SPEED_KMH[name] for name in VEHICLES])[v]
    exponent = np.array([_TRAFFIC_EXPONENT[name] for name in VEHICLES])[v]
    ride = distance / (speed / congestion**exponent) * 60 * rng.lognormal(0, 0.1, n)
    handover = 2.0 + 0.2 * items + rng.exponential(1.0, n)
    # The courier waits at the counter if the food is late; else the food waits.
    minutes = np.maximum(kitchen, courier_wait) + ride + handover

    restaurant_id = np.where(
        new_restaurant, [f"n{i:07d}" for i in range(n)], rest["restaurant_id"].to_numpy()[who]
    )
    frame = pd.DataFrame(
        {
            "restaurant_id": restaurant_id,
            "zone": np.asarray(ZONES, dtype=object)[z],
            "placed_at": placed_at,
            "distance_km": distance,
            "items": items.astype("int64"),
            "vehicle": np.asarray(VEHICLES, dtype=object)[v],
            LABEL: minutes.round(1),
        }
    )
    frame = frame.sort_values("placed_at", kind="stable", ignore_index=True)
    frame.insert(0, "order_id", [f"o{i:08d}" for i in range(n)])  # ids in time order
    return frame
