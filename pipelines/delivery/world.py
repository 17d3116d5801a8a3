"""The delivery example's world on a home: data, feature history, model, online store.

``setup: delivery/world.py:ensure`` in the spec: ``stageline predict``, ``batch`` and
``serve`` call :func:`ensure` before they run, and it builds the world where the home
has no model yet. :func:`build` builds it at any size (tests build a small one).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stageline.features import OfflineStore
from stageline.registry import LocalRegistry, ModelMetadata, ModelNotFoundError
from stageline.spec import PipelineSpec
from stageline.spec_classes import resolve_object

HERE = Path(__file__).resolve().parent
FOLDER = "delivery"
"""This example's files under the home: ``holdout.parquet``, ``world.json``."""


@dataclass(frozen=True)
class World:
    home: Path
    holdout: Path
    """Held-out orders (the newest): the spec's request fields and the label ``minutes``."""
    metrics: dict[str, float]
    """The model's held-out metrics: ``mae``, ``rmse`` and the mean's ``baseline_*``."""
    model: ModelMetadata
    seconds: float

    def summary(self) -> str:
        m = self.metrics
        return (
            f"delivery world under {self.home}: {self.model.name} v{self.model.version}, "
            f"held-out MAE {m['mae']:.2f} min (predicting the mean: {m['baseline_mae']:.2f}), "
            f"RMSE {m['rmse']:.2f}; built in {self.seconds:.1f} s; "
            f"holdout records in {self.holdout}"
        )


def ensure(spec: PipelineSpec, home: Path) -> None:
    """Build the world where ``home`` has no model for the spec's model stage; else
    return at once. Progress goes to stderr: stdout may carry predictions."""
    stage = _sibling("train.py:model_stage")(spec)
    name, alias = str(stage.params["model"]), str(stage.params.get("alias") or "champion")
    try:
        LocalRegistry(home / "models").resolve(name, alias)
        return
    except ModelNotFoundError:
        pass
    print(f"no delivery world under {home} yet: building it first ...", file=sys.stderr)
    print(build(spec, home).summary(), file=sys.stderr)


def build(
    spec: PipelineSpec,
    home: Path,
    *,
    orders: int = 60_000,
    seed: int = 7,
    restaurants: int = 400,
    days: int = 42,
    rounds: int | None = None,
) -> World:
    """Generate the world, write the feature views' history, train and register the
    model on the older orders, hold out the newest, materialize the online store."""
    started = time.perf_counter()
    generated = _sibling("data.py:generate")(
        orders=orders, restaurants=restaurants, days=days, seed=seed
    )
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    offline.write("restaurant_stats", generated.restaurant_stats)
    offline.write("zone_stats", generated.zone_stats)
    trained = _sibling("train.py:train")(spec, home, generated.orders, seed=seed, rounds=rounds)
    folder = home / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    holdout = folder / "holdout.parquet"
    columns = [*spec.request.fields, _sibling("train.py:LABEL")]
    trained.holdout[columns].to_parquet(holdout, index=False)
    seconds = time.perf_counter() - started
    sizes = {"orders": orders, "restaurants": restaurants, "days": days, "seed": seed}
    marker: dict[str, Any] = {
        **sizes,
        "rounds": rounds,
        "model": f"{trained.model.name} v{trained.model.version}",
        "metrics": trained.metrics,
        "seconds": round(seconds, 1),
    }
    (folder / "world.json").write_text(json.dumps(marker, indent=2) + "\n")
    return World(home, holdout, dict(trained.metrics), trained.model, seconds)


def _sibling(ref: str) -> Any:
    """``file.py:name`` next to this file, imported by path as the spec imports this one:
    the same whether a spec's ``setup`` imported this file or it runs as a script."""
    return resolve_object(ref, HERE, kind="example", attr="function")
