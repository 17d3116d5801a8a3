"""Build the demo world: data, offline features, a model trained from the spec
(:func:`stageline.training.train`, as ``stageline train`` trains), and the online store."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stageline._io import atomic_write_bytes, atomic_write_parquet
from stageline.features import OfflineStore, materialize
from stageline.registry import ModelMetadata
from stageline.spec import PipelineSpec, SpecError, resolve_class
from stageline.spec_training import TrainingSpec
from stageline.stages.model import XGBoostPredictor
from stageline.training import Trained, train

from . import data

log = logging.getLogger(__name__)

VIEW = "customer_stats"
MODEL = "fraud"
MARKER = "demo/world.json"
EVENTS = "demo/events.parquet"
"""The demo's labelled transactions under the home: what ``stageline train --labels`` takes."""


@dataclass(frozen=True)
class DemoResult:
    model: ModelMetadata
    home: Path
    holdout: Path
    seconds: float


LITE_MODEL = "fraud_lite"
"""The ensemble example's second model (``pipelines/fraud-ensemble.yaml``)."""
LITE_TRAINING = TrainingSpec(
    label="is_fraud",
    params={"max_depth": 3, "eta": 0.3, "nthread": 2, "seed": 11},
    rounds=40,
    features=("amount_to_avg", "is_foreign", "is_night", "account_age_days", "txn_count_7d"),
)
"""How the demo trains ``fraud_lite``: shallower, fewer rounds and five of the features
the champion sees, so that it scores differently (an ensemble of two equal models is
one model)."""


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
    rounds: int | None = None,
) -> DemoResult:
    """Generate, train (``rounds`` in place of the spec's), register ``fraud`` as
    champion, materialize; idempotent per home."""
    started = time.perf_counter()
    world = data.generate(customers=customers, transactions=transactions, days=days, seed=seed)
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    offline.write(VIEW, world.snapshots)
    atomic_write_parquet(home / EVENTS, world.transactions)
    trained = train(
        spec,
        world.transactions,
        home,
        seed=seed,
        rounds=rounds,
        description=f"demo fraud model: seed {seed}, {customers} customers, {transactions} rows",
    )
    # The newest share, held out: what the model was judged on.
    holdout = atomic_write_parquet(home / "demo" / "holdout.parquet", trained.holdout)
    materialize(spec, home, [VIEW])
    seconds = time.perf_counter() - started
    meta = trained.model
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


def train_lite(spec: PipelineSpec, home: Path, *, seed: int = 11) -> Trained:
    """Train and register the ensemble's second model, :data:`LITE_MODEL`, on the demo's
    events under ``home`` (build the demo first), with :data:`LITE_TRAINING`: the stages
    of ``spec`` before its model stages compute its features, as when it serves."""
    lite = [s for s in spec.stages if s.params.get("model") == LITE_MODEL]
    if not lite:
        raise SpecError(
            f"pipeline {spec.name!r} has no model stage for {LITE_MODEL!r} (params: "
            f"{{model: {LITE_MODEL}}}) to train"
        )
    first = next(
        i
        for i, s in enumerate(spec.stages)
        if issubclass(resolve_class(s.uses, spec.base_dir), XGBoostPredictor)
    )
    # The stages up to the first model stage, then the lite one: train() trains that one.
    only_lite = spec.model_copy(
        update={"stages": (*spec.stages[:first], lite[0]), "training": LITE_TRAINING}
    )
    return train(
        only_lite,
        pd.read_parquet(home / EVENTS),
        home,
        seed=seed,
        description=f"demo ensemble's second model: {len(LITE_TRAINING.features or ())} features",
    )
