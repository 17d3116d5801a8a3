"""Build the demo world: data, offline features, a model trained from the spec
(:func:`stageline.training.train`, as ``stageline train`` trains), and the online store."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from stageline._io import atomic_write_bytes, atomic_write_parquet
from stageline.features import OfflineStore, materialize
from stageline.registry import ModelMetadata
from stageline.spec import PipelineSpec
from stageline.training import train

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
