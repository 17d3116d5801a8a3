"""Train the delivery-time model on labelled orders, register it, publish the features.

Only stageline's public API, and the spec as the one source of truth: the training
frame goes through the spec's own stages as serving runs them (each ``FeatureLookup``
as a point-in-time join on the offline store, so no order sees a snapshot from after
it was placed; each ``OnDemandTransform`` as the very stage serving builds), and the
model is registered under the name its ``XGBoostPredictor`` stage loads.

Run as a script to build the example's whole world on a home::

    python pipelines/delivery/train.py --home /tmp/delivery-home
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from stageline.features import OfflineStore, found_column, materialize
from stageline.pipeline import build_stage
from stageline.registry import LocalRegistry, ModelMetadata
from stageline.spec import PipelineSpec, StageSpec, load_spec, resolve_class
from stageline.spec_classes import resolve_object
from stageline.stage import ERROR_COLUMN, StageError, error_mask
from stageline.stages.features import FeatureLookup
from stageline.stages.model import XGBoostPredictor
from stageline.stages.transform import (
    OnDemandTransform,
    apply_encoders,
    fit_encoders,
    load_transform,
)
from stageline.stages.validate import validate_frame

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "delivery.yaml"
LABEL = "minutes"
TIMESTAMP = "placed_at"
"""When an order was placed (the spec's ``request.event_time``): features join as of it."""
HOLDOUT_SHARE = 0.2
"""The newest orders, held out: the model is judged on a future it has not seen."""


@dataclass(frozen=True)
class Trained:
    model: ModelMetadata
    metrics: dict[str, float]
    holdout: pd.DataFrame
    """The held-out orders as they came: request fields and the label."""


def model_stage(spec: PipelineSpec) -> StageSpec:
    """The spec's ``XGBoostPredictor`` stage: its params name the model to register."""
    for stage in spec.stages:
        if issubclass(resolve_class(stage.uses, spec.base_dir), XGBoostPredictor):
            return stage
    raise StageError(f"pipeline {spec.name!r} has no XGBoostPredictor stage to train for")


def train(
    spec: PipelineSpec,
    home: Path,
    orders: pd.DataFrame,
    *,
    seed: int = 7,
    rounds: int = 300,
) -> Trained:
    """Fit on the older orders, evaluate on the newest, register as the stage's alias,
    and materialize the views' latest values to the online store.

    ``orders``: the request fields and :data:`LABEL`; the offline store of ``home``
    holds the spec's feature views.
    """
    orders = orders.sort_values(TIMESTAMP, kind="stable", ignore_index=True)
    cut = int(len(orders) * (1 - HOLDOUT_SHARE))
    train_rows, test_rows = orders.iloc[:cut], orders.iloc[cut:]
    train_x, test_x = (training_frame(spec, home, part) for part in (train_rows, test_rows))
    categorical = [n for n, f in spec.request.fields.items() if f.type == "category"]
    encoders = fit_encoders(train_x, categorical)
    train_x, test_x = (apply_encoders(f, encoders) for f in (train_x, test_x))
    features = feature_names(spec, train_x, encoders)

    params: dict[str, Any] = {
        "objective": "reg:squarederror",
        "tree_method": "hist",
        "max_depth": 6,
        "eta": 0.08,
        "subsample": 0.8,
        "colsample_bytree": 0.9,
        "min_child_weight": 5,
        # One thread: on a machine shared with other work (a laptop, a CI runner, a Ray
        # node), a second OpenMP thread waits for a core far more than it helps.
        "nthread": 1,
        "seed": seed,
    }
    y_train = train_rows[LABEL].to_numpy(dtype="float64")
    booster = xgb.train(
        params,
        xgb.DMatrix(_matrix(train_x, features), y_train, feature_names=features, nthread=1),
        num_boost_round=rounds,
    )
    y = test_rows[LABEL].to_numpy(dtype="float64")
    predicted = np.asarray(booster.inplace_predict(_matrix(test_x, features)), dtype="float64")
    baseline = np.full(len(y), y_train.mean())
    metrics = {
        "mae": float(np.abs(predicted - y).mean()),
        "rmse": float(np.sqrt(((predicted - y) ** 2).mean())),
        "baseline_mae": float(np.abs(baseline - y).mean()),
        "baseline_rmse": float(np.sqrt(((baseline - y) ** 2).mean())),
        "n_train": float(len(train_rows)),
        "n_test": float(len(test_rows)),
    }
    stage = model_stage(spec)
    meta = LocalRegistry(home / "models").register(
        str(stage.params["model"]),
        booster,
        features=features,
        encoders=encoders,
        task="regression",
        threshold=None,
        metrics=metrics,
        params={**params, "rounds": rounds},
        description=(
            f"delivery minutes: {len(train_rows)} orders to {train_rows[TIMESTAMP].max()}, "
            f"held out the next {len(test_rows)}"
        ),
        aliases=[str(stage.params.get("alias") or "champion")],
    )
    materialize(spec, home)
    return Trained(meta, metrics, test_rows.reset_index(drop=True))


def training_frame(spec: PipelineSpec, home: Path, orders: pd.DataFrame) -> pd.DataFrame:
    """The orders as the model stage will see them when serving: validated, features as of
    each order's time, then the spec's transform stages."""
    frame = validate_frame(orders[list(spec.request.fields)].reset_index(drop=True), spec.request)
    _refuse_bad_rows(frame, "fail the request schema")
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    for stage in spec.stages:
        cls = resolve_class(stage.uses, spec.base_dir)
        if issubclass(cls, XGBoostPredictor):
            break
        if issubclass(cls, FeatureLookup):
            frame = offline.point_in_time_join(
                frame, stage.params["view"], key=stage.params.get("key"), timestamp=TIMESTAMP
            )
        elif issubclass(cls, OnDemandTransform):
            frame = build_stage(spec, stage, home)(frame)
            _refuse_bad_rows(frame, f"were rejected by stage {stage.name!r}")
    return frame


def feature_names(
    spec: PipelineSpec, frame: pd.DataFrame, encoders: dict[str, dict[str, Any]]
) -> list[str]:
    """What the model sees, in order: numeric request fields, the looked-up numbers and
    found flags, the transforms' columns, the encoded categories."""
    request = [
        n
        for n, f in spec.request.fields.items()
        if f.type in ("int", "float", "bool") and n != spec.request.id_field
    ]
    looked_up: list[str] = []
    for stage in spec.stages:
        cls = resolve_class(stage.uses, spec.base_dir)
        if issubclass(cls, XGBoostPredictor):
            break
        if issubclass(cls, FeatureLookup):
            view_name = str(stage.params["view"])
            view = spec.features.views[view_name]
            looked_up += [n for n, f in view.features.items() if f.type != "str"]
            looked_up.append(found_column(view_name))
        elif issubclass(cls, OnDemandTransform):
            looked_up += load_transform(stage.params["function"], spec.base_dir).provides
    names = [*request, *looked_up, *(str(e["output"]) for e in encoders.values())]
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise StageError(f"the training frame lacks feature column(s) {missing}")
    return names


def _matrix(frame: pd.DataFrame, features: list[str]) -> np.ndarray[Any, Any]:
    """As XGBoostPredictor builds it: float32, NaN for missing."""
    return frame[features].to_numpy(dtype=np.float32, na_value=np.nan)


def _refuse_bad_rows(frame: pd.DataFrame, what: str) -> None:
    bad = error_mask(frame)
    if bad.any():
        first = frame.loc[bad, ERROR_COLUMN].iloc[0]
        raise StageError(f"{int(bad.sum())} training rows {what} (first: {first})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Build the delivery example's world on a home.")
    parser.add_argument("--home", required=True, type=Path, help="stageline home to build in")
    parser.add_argument("--orders", type=int, default=60_000, help="orders to generate")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    spec = load_spec(SPEC)
    build = resolve_object(f"{HERE / 'world.py'}:build", kind="example", attr="function")
    world = build(spec, args.home.resolve(), orders=args.orders, seed=args.seed)
    print(world.summary(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
