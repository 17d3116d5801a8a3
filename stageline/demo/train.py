"""Build the demo world: data, offline features, a trained and registered model,
and the online store. Training goes through the pipeline's own stages."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from stageline._io import atomic_write_bytes, atomic_write_parquet
from stageline.context import as_of_field
from stageline.features import OfflineStore, found_column, materialize
from stageline.pipeline import build_stage
from stageline.registry import LocalRegistry, ModelMetadata
from stageline.spec import PipelineSpec, resolve_class
from stageline.stage import StageError, error_mask
from stageline.stages.transform import OnDemandTransform, apply_encoders, fit_encoders
from stageline.stages.validate import validate_frame

from . import data

log = logging.getLogger(__name__)

VIEW = "customer_stats"
MODEL = "fraud"
CATEGORICAL = ("merchant_category",)
MARKER = "demo/world.json"


@dataclass(frozen=True)
class DemoResult:
    model: ModelMetadata
    home: Path
    holdout: Path
    seconds: float


def demo_exists(home: Path) -> bool:
    return (home / MARKER).exists()


def build_demo(
    spec: PipelineSpec,
    home: Path,
    *,
    customers: int = 5_000,
    transactions: int = 200_000,
    days: int = 60,
    seed: int = 7,
    rounds: int = 150,
) -> DemoResult:
    """Generate, train, register ``fraud`` as champion, materialize; idempotent per home."""
    started = time.perf_counter()
    world = data.generate(customers=customers, transactions=transactions, days=days, seed=seed)
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    offline.write(VIEW, world.snapshots)

    cut = int(len(world.transactions) * 0.8)  # the newest 20% is held out, as in production
    train_tx, test_tx = world.transactions.iloc[:cut], world.transactions.iloc[cut:]
    request_cols = list(spec.request.fields)
    holdout = atomic_write_parquet(home / "demo" / "holdout.parquet", test_tx)

    transforms = transform_stages(spec, home)
    train_x, test_x = (
        training_frame(spec, offline, transforms, part[request_cols])
        for part in (train_tx, test_tx)
    )
    encoders = fit_encoders(train_x, CATEGORICAL)
    train_x, test_x = (apply_encoders(f, encoders) for f in (train_x, test_x))
    features = feature_names(spec, transforms, encoders)

    params: dict[str, Any] = {
        "objective": "binary:logistic",
        "eval_metric": "auc",
        "tree_method": "hist",
        "max_depth": 5,
        "eta": 0.1,
        "subsample": 0.9,
        "nthread": 2,
        "seed": seed,
    }
    dtrain = xgb.DMatrix(
        train_x[features].to_numpy(np.float32),
        train_tx["is_fraud"].to_numpy(),
        feature_names=features,
    )
    booster = xgb.train(params, dtrain, num_boost_round=rounds)
    scores = booster.inplace_predict(test_x[features].to_numpy(np.float32))
    y = test_tx["is_fraud"].to_numpy()
    threshold, f1 = best_f1_threshold(y, scores)
    metrics = {
        "auc": roc_auc(y, scores),
        "f1": f1,
        "fraud_rate": float(y.mean()),
        "n_train": float(len(train_tx)),
        "n_test": float(len(test_tx)),
    }
    registry = LocalRegistry(home / "models")
    meta = registry.register(
        MODEL,
        booster,
        features=features,
        encoders=encoders,
        threshold=threshold,
        metrics=metrics,
        params={**params, "rounds": rounds},
        description=f"demo fraud model: seed {seed}, {customers} customers, {transactions} rows",
        aliases=("champion",),
    )
    materialize(spec, home, [VIEW])
    seconds = time.perf_counter() - started
    marker = {
        "seed": seed,
        "customers": customers,
        "transactions": transactions,
        "days": days,
        "model": f"{meta.name} v{meta.version}",
        "seconds": round(seconds, 1),
    }
    atomic_write_bytes(home / MARKER, json.dumps(marker, indent=2).encode())
    return DemoResult(meta, home, holdout, seconds)


def transform_stages(spec: PipelineSpec, home: Path) -> list[OnDemandTransform]:
    """The pipeline's own on-demand transform stages, built as serving builds them."""
    stages = (build_stage(spec, s, home) for s in spec.stages if _is_transform(spec, s.uses))
    return [s for s in stages if isinstance(s, OnDemandTransform)]


def _is_transform(spec: PipelineSpec, uses: str) -> bool:
    return issubclass(resolve_class(uses, spec.base_dir), OnDemandTransform)


def training_frame(
    spec: PipelineSpec, offline: OfflineStore, transforms: list[OnDemandTransform], tx: pd.DataFrame
) -> pd.DataFrame:
    """Validated rows, features as of each row's time, then the pipeline's transform stages."""
    frame = validate_frame(tx.reset_index(drop=True), spec.request)
    if error_mask(frame).any():
        raise StageError(f"{int(error_mask(frame).sum())} training rows fail the request schema")
    # The time serving scores a row as of (--as-of): training sees exactly those values.
    frame = offline.point_in_time_join(frame, VIEW, timestamp=as_of_field(spec))
    for stage in transforms:
        frame = stage(frame)
    return frame


def feature_names(
    spec: PipelineSpec, transforms: list[OnDemandTransform], encoders: dict[str, dict[str, Any]]
) -> list[str]:
    """What the model sees: raw and looked-up numbers, transforms, encoded categories."""
    view = spec.features.views[VIEW]
    numeric = [n for n, f in view.features.items() if f.type != "str"]
    return [
        "amount",
        *numeric,
        found_column(VIEW),
        *(c for t in transforms for c in t.provided_columns()),
        *(str(e["output"]) for e in encoders.values()),
    ]


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    pos = y.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_f1_threshold(y: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The score threshold with the best F1 on held-out data, and that F1."""
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(y[order])
    k = np.arange(1, len(y) + 1)
    f1 = 2 * tp / (k + y.sum())
    best = int(np.argmax(f1))
    return float(scores[order][best]), float(f1[best])
