"""A seeded synthetic card-fraud world: customers, daily feature snapshots, transactions.

Fraud follows a known rule of the features the pipeline computes (amount
against the customer's 30-day average, a foreign country, night time, risky
merchants, young accounts, unknown customers) plus noise, so a model can
learn it and its held-out AUC says whether the pipeline works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

COUNTRIES = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "IN", "JP")
MERCHANTS = (
    "grocery",
    "restaurant",
    "fuel",
    "travel",
    "electronics",
    "fashion",
    "jewelry",
    "online",
)
RISKY_MERCHANTS = ("travel", "electronics", "jewelry")
START = pd.Timestamp("2026-01-01", tz="UTC")


@dataclass(frozen=True)
class World:
    customers: pd.DataFrame
    snapshots: pd.DataFrame
    transactions: pd.DataFrame


def generate(
    *, customers: int = 5_000, transactions: int = 200_000, days: int = 60, seed: int = 7
) -> World:
    """The seeded world. Every draw comes from one generator in a fixed order, so a
    seed always yields the same data (tests and the README's AUC depend on it)."""
    rng = np.random.default_rng(seed)
    n_c = customers
    cust = _customers(rng, n_c, days)
    snapshots = _snapshots(rng, cust, days)

    n_t = transactions
    # 3% of transactions come from customers the feature store has never seen.
    unknown = rng.random(n_t) < 0.03
    who = rng.integers(0, n_c, n_t)
    first_day = np.maximum(cust["opened_day"].to_numpy()[who], 0)
    t_day = first_day + rng.random(n_t) * (days - first_day)
    ts = START + pd.to_timedelta(t_day * 86_400, unit="s").round("s")
    d = np.floor(t_day).astype(int)
    avg = np.where(unknown, 50.0, _avg_amount(cust, who, d))
    home = np.where(unknown, "??", cust["home_country"].to_numpy()[who])
    age = np.where(unknown, 0, d - cust["opened_day"].to_numpy()[who])
    foreign_trip = rng.random(n_t) < 0.08
    country = np.where(foreign_trip | unknown, rng.choice(COUNTRIES, n_t), home)
    country = np.where(country == "??", "US", country)
    amount = np.round(avg * rng.lognormal(-0.1, 0.9, n_t), 2)
    merchant = rng.choice(MERCHANTS, n_t, p=[0.25, 0.18, 0.12, 0.08, 0.1, 0.12, 0.05, 0.1])
    hour = ts.hour.to_numpy()

    logit = (
        -6.2
        + 2.0 * np.log(np.clip(amount / (avg + 1.0), 0.05, None))
        + 2.2 * (country != home)
        + 1.3 * (hour < 6)
        + 1.4 * np.isin(merchant, RISKY_MERCHANTS)
        + 1.2 * (age < 30)
        + 1.0 * unknown
        + rng.normal(0, 0.4, n_t)
    )
    is_fraud = rng.random(n_t) < 1 / (1 + np.exp(-logit))
    customer_id = np.where(
        unknown,
        [f"u{i:07d}" for i in range(n_t)],
        cust["customer_id"].to_numpy()[who],
    )
    tx = pd.DataFrame(
        {
            "transaction_id": [f"t{i:08d}" for i in range(n_t)],
            "customer_id": customer_id,
            "amount": amount,
            "merchant_category": merchant,
            "ts": ts,
            "country": country,
            "is_fraud": is_fraud.astype("int64"),
        }
    ).sort_values("ts", kind="stable", ignore_index=True)
    return World(cust, snapshots, tx)


Array = np.ndarray[Any, np.dtype[Any]]


def _customers(rng: np.random.Generator, n_c: int, days: int) -> pd.DataFrame:
    """The customer table: the first draws of ``rng``."""
    return pd.DataFrame(
        {
            "customer_id": [f"c{i:06d}" for i in range(n_c)],
            "home_country": rng.choice(COUNTRIES, n_c, p=_weights(len(COUNTRIES), rng)),
            # Account opening: mostly long before the window, some during it.
            "opened_day": np.where(
                rng.random(n_c) < 0.9, -rng.integers(30, 2000, n_c), rng.integers(0, days - 1, n_c)
            ),
            "base_spend": rng.lognormal(3.7, 0.6, n_c),
            "daily_rate": rng.gamma(2.0, 0.7, n_c),
            "phase": rng.uniform(0, 2 * np.pi, n_c),
        }
    )


def _snapshots(rng: np.random.Generator, cust: pd.DataFrame, days: int) -> pd.DataFrame:
    """One snapshot per customer per day from the day the account exists."""
    n_c = len(cust)
    day = np.arange(days)
    grid_c = np.repeat(np.arange(n_c), days)
    grid_d = np.tile(day, n_c)
    alive = grid_d >= np.maximum(cust["opened_day"].to_numpy()[grid_c], 0)
    grid_c, grid_d = grid_c[alive], grid_d[alive]
    return pd.DataFrame(
        {
            "customer_id": cust["customer_id"].to_numpy()[grid_c],
            "event_time": START + pd.to_timedelta(grid_d, unit="D"),
            "avg_amount_30d": _avg_amount(cust, grid_c, grid_d),
            "txn_count_7d": rng.poisson(cust["daily_rate"].to_numpy()[grid_c] * 7).astype("int64"),
            "account_age_days": (grid_d - cust["opened_day"].to_numpy()[grid_c]).astype("int64"),
            "home_country": cust["home_country"].to_numpy()[grid_c],
        }
    )


def _avg_amount(cust: pd.DataFrame, c: Array, d: Array) -> Array:
    """The customer's 30-day average spend on day ``d``: a slow weekly wobble."""
    base = cust["base_spend"].to_numpy(dtype="float64")[c]
    phase = cust["phase"].to_numpy(dtype="float64")[c]
    avg: Array = np.round(base * (1 + 0.15 * np.sin(d / 7 + phase)), 2)
    return avg


def _weights(n: int, rng: np.random.Generator) -> Array:
    w: Array = rng.dirichlet(np.ones(n) * 2)
    normalized: Array = w / w.sum()
    return normalized
