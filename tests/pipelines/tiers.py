"""The world of the test-sized multiclass pipeline (tiers.yaml): seeded accounts and
their customers' history, an XGBoost ``multi:softprob`` model trained on what serving
computes, registered as ``tiers@champion`` with its classes, and the online store.

``build`` makes it in about a second; ``ensure`` is the spec's ``setup``. Only absolute
imports: the spec loads this file by its path, the tests import it as a module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xgboost as xgb

from stageline._io import atomic_write_bytes, atomic_write_parquet
from stageline.features import OfflineStore, found_column, materialize
from stageline.registry import LocalRegistry, ModelMetadata
from stageline.spec import PipelineSpec
from stageline.stage import StageError, error_mask
from stageline.stages.transform import apply_encoders, fit_encoders
from stageline.stages.validate import validate_frame

MODEL = "tiers"
VIEW = "customer_history"
CLASSES = ("bronze", "silver", "gold")
"""In label order: the model's class 0, 1, 2."""
CATEGORICAL = ("channel",)
CHANNELS = ("web", "app", "store", "phone")
START = pd.Timestamp("2026-01-01", tz="UTC")
SNAPSHOT_DAYS = (0, 10, 20)
"""When the customers' history was computed; accounts are reviewed on days 1 to 30."""
FOLDER = "tiers"
MARKER = f"{FOLDER}/world.json"


@dataclass(frozen=True)
class World:
    home: Path
    holdout: Path
    """Held-out request records (the spec's request fields): the newest 20%."""
    model: ModelMetadata


def ensure(spec: PipelineSpec, home: Path) -> None:
    """The spec's ``setup``: build the world on a home that has none."""
    if not (Path(home) / MARKER).exists():
        build(spec, Path(home))


def build(spec: PipelineSpec, home: Path, *, rows: int = 3_000, seed: int = 11) -> World:
    """Generate accounts and history, train and register ``tiers@champion``, materialize."""
    rng = np.random.default_rng(seed)
    customers = max(rows // 4, 10)
    history = _history(rng, customers)
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    offline.write(VIEW, history)
    accounts = _accounts(rng, rows, customers)

    request = validate_frame(accounts[list(spec.request.fields)], spec.request)
    if error_mask(request).any():
        raise StageError(f"{int(error_mask(request).sum())} generated rows fail the schema")
    frame = offline.point_in_time_join(request, VIEW, timestamp="ts")
    labels = _tiers(frame, rng)

    cut = int(rows * 0.8)  # the newest 20% is held out, as in production
    holdout = atomic_write_parquet(
        home / FOLDER / "holdout.parquet", accounts.iloc[cut:][list(spec.request.fields)]
    )
    encoders = fit_encoders(frame.iloc[:cut], CATEGORICAL)
    encoded = apply_encoders(frame, encoders)
    view = spec.features.views[VIEW]
    features = [
        "monthly_spend",
        "visits_30d",
        "discount_rate",
        *view.features,
        found_column(VIEW),
        *(str(e["output"]) for e in encoders.values()),
    ]
    x = encoded[features].to_numpy(np.float32)
    params = {
        "objective": "multi:softprob",
        "num_class": len(CLASSES),
        "tree_method": "hist",
        "max_depth": 3,
        "eta": 0.3,
        "nthread": 1,
        "seed": seed,
    }
    booster = xgb.train(
        params, xgb.DMatrix(x[:cut], labels[:cut], feature_names=features), num_boost_round=30
    )
    predicted = np.asarray(booster.inplace_predict(x[cut:])).argmax(axis=1)
    meta = LocalRegistry(home / "models").register(
        MODEL,
        booster,
        features=features,
        encoders=encoders,
        classes=list(CLASSES),
        metrics={"accuracy": float((predicted == labels[cut:]).mean())},
        params={**params, "rounds": 30},
        description=f"test tiers model: seed {seed}, {rows} accounts",
        aliases=["champion"],
    )
    materialize(spec, home, [VIEW])
    marker = {"seed": seed, "rows": rows, "model": f"{meta.name} v{meta.version}"}
    atomic_write_bytes(home / MARKER, json.dumps(marker).encode())
    return World(home=home, holdout=holdout, model=meta)


def _history(rng: np.random.Generator, customers: int) -> pd.DataFrame:
    """Each customer's history as of each snapshot day: it only grows."""
    spend = rng.lognormal(6.0, 1.0, customers)
    orders = rng.poisson(4.0, customers) + 1
    tenure = rng.integers(30, 2_000, customers)
    frames = [
        pd.DataFrame(
            {
                "customer_id": [f"c{i:05d}" for i in range(customers)],
                "event_time": START + pd.Timedelta(days=day),
                "lifetime_spend": spend * (1 + day / 100),
                "orders_90d": orders + day // 10,
                "tenure_days": tenure + day,
            }
        )
        for day in SNAPSHOT_DAYS
    ]
    return pd.concat(frames, ignore_index=True)


def _accounts(rng: np.random.Generator, rows: int, customers: int) -> pd.DataFrame:
    """Request records in time order; 5% of customers unknown to the history, a quarter
    without a discount rate."""
    known = rng.random(rows) > 0.05
    ids = rng.integers(0, customers, rows)
    discount = rng.uniform(0.0, 0.4, rows)
    seconds = np.round(np.sort(rng.uniform(1, 30, rows)) * 86_400)
    return pd.DataFrame(
        {
            "account_id": [f"a{i:06d}" for i in range(rows)],
            "customer_id": [
                f"c{i:05d}" if k else f"u{i:05d}" for i, k in zip(ids, known, strict=True)
            ],
            "monthly_spend": np.round(rng.lognormal(4.0, 1.0, rows), 2),
            "visits_30d": rng.poisson(6.0, rows).astype("int64"),
            "channel": rng.choice(CHANNELS, rows),
            "discount_rate": np.where(rng.random(rows) < 0.25, np.nan, discount),
            "ts": START + pd.to_timedelta(seconds, unit="s"),
        }
    )


def _tiers(frame: pd.DataFrame, rng: np.random.Generator) -> np.ndarray:
    """The label: a noisy value score, split at its 50th and 80th percentiles."""
    value = (
        np.log1p(frame["monthly_spend"].to_numpy(float))
        + 0.5 * np.log1p(frame["lifetime_spend"].to_numpy(float))
        + 0.1 * frame["visits_30d"].to_numpy(float)
        + 0.2 * (frame["channel"].astype(str) == "store").to_numpy(float)
        + rng.normal(0.0, 0.3, len(frame))
    )
    tiers: np.ndarray = np.digitize(value, np.quantile(value, [0.5, 0.8])).astype(np.int64)
    return tiers
