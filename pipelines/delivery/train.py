"""Train the delivery-time model on labelled orders, register it, publish the features.

Only stageline's public API, and the spec as the one source of truth: the spec's
``training:`` section, through :func:`stageline.training.train` (what ``stageline train``
runs): the training frame goes through the spec's own stages as serving runs them (each
``FeatureLookup`` as a point-in-time join on the offline store, so no order sees a
snapshot from after it was placed; each other stage as the very stage serving builds),
and the model is registered under the name its ``XGBoostPredictor`` stage loads.

Run as a script to build the example's whole world on a home::

    python pipelines/delivery/train.py --home /tmp/delivery-home
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from stageline.features import materialize
from stageline.spec import PipelineSpec, load_spec
from stageline.spec_classes import resolve_object
from stageline.training import Trained, model_stage
from stageline.training import train as train_from_spec

HERE = Path(__file__).resolve().parent
SPEC = HERE.parent / "delivery.yaml"
LABEL = "minutes"
"""The orders' label column (the spec's ``training.label``)."""

__all__ = ["LABEL", "Trained", "model_stage", "train"]


def train(
    spec: PipelineSpec,
    home: Path,
    orders: pd.DataFrame,
    *,
    seed: int = 7,
    rounds: int | None = None,
) -> Trained:
    """Fit on the older orders, evaluate on the newest, register as the stage's alias,
    and materialize the views' latest values to the online store.

    ``orders``: the request fields and :data:`LABEL`; the offline store of ``home``
    holds the spec's feature views.
    """
    trained = train_from_spec(spec, orders, home, seed=seed, rounds=rounds)
    materialize(spec, home)
    return trained


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
