"""Train __NAME__'s model from labelled events and register it as __NAME__@champion.

    python train.py                          # the labelled events in data/events.csv
    python train.py --events my.parquet      # yours (parquet or CSV): the request's
                                             # fields, the event time and the label
    python train.py --model booster.ubj      # register a booster trained elsewhere

The training set is built as serving computes features: the request schema's checks,
each feature view's values as of each event's time (never later ones: nothing leaks
from the future), then the spec's own stages up to the model (transforms.py,
stages.py). The model's features are the numeric request fields and every numeric
column those stages add; ``category`` fields are encoded (the encoding is stored with
the model and applied when it serves). The newest events (``--holdout``) evaluate it.
It is registered with its features, threshold and metrics, then the feature views'
latest values are copied to the online store, which serving reads.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from stageline import PipelineSpec, SpecError, StageError, load_spec
from stageline.context import resolve_home
from stageline.features import FeatureStoreError, OfflineStore, materialize
from stageline.pipeline import build_stage
from stageline.registry import LocalRegistry, ModelMetadata, RegistryError
from stageline.spec import resolve_class
from stageline.stage import ERROR_COLUMN, error_mask
from stageline.stages.features import FeatureLookup
from stageline.stages.model import XGBoostPredictor
from stageline.stages.transform import apply_encoders, fit_encoders
from stageline.stages.validate import validate_frame
from stageline.training import model_stage

HERE = Path(__file__).resolve().parent
SPEC = HERE / "__NAME__.yaml"
EVENTS = HERE / "data" / "events.csv"
LABEL = "label"  # CHANGE: the column holding the outcome: 1/0 or true/false
TIMESTAMP = "ts"  # CHANGE: the request field that says when an event happened
PARAMS: dict[str, Any] = {  # CHANGE: XGBoost's training parameters
    "objective": "binary:logistic",
    "eval_metric": "auc",
    "tree_method": "hist",
    "max_depth": 4,
    "eta": 0.1,
    "nthread": 2,
    "seed": 0,
}
EXPECTED = (SpecError, StageError, FeatureStoreError, RegistryError, OSError, ValueError)
"""Errors from stageline, the files or the data: one line, exit status 1."""
_LABELS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}


class TrainError(Exception):
    """Something to fix in the data, the spec or the arguments."""


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec, home = load_spec(args.spec), resolve_home(args.home)
        model_name = model_stage(spec).params["model"]
        frame, candidates = training_frame(spec, home, read_events(args.events), args.timestamp)
        train, test = split_by_time(frame, args.timestamp, args.holdout)
        if args.model:
            meta = register_booster(args, spec, model_name, home, test, candidates)
        else:
            meta = train_and_register(args, spec, model_name, home, train, test, candidates)
        for view, rows in materialize(spec, home).items():
            print(f"materialized {view}: {rows} entities -> the {online(spec)} online store")
    except (TrainError, *EXPECTED) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    auc = meta.metrics.get("auc")
    print(
        f"registered {meta.name} v{meta.version} as champion under {home / 'models'}: "
        + (f"holdout AUC {auc:.3f}, " if auc is not None else "")
        + f"threshold {meta.threshold}, {len(meta.features)} features"
    )
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--home", help="stageline home (default: $STAGELINE_HOME or ./.stageline)")
    p.add_argument("--spec", type=Path, default=SPEC, help="pipeline spec (default: %(default)s)")
    p.add_argument(
        "--events",
        type=Path,
        default=EVENTS,
        help="labelled events, .csv or .parquet (default: %(default)s)",
    )
    p.add_argument("--label", default=LABEL, help="label column (default: %(default)s)")
    p.add_argument("--timestamp", default=TIMESTAMP, help="event time field (default: %(default)s)")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.25,
        help="newest share of events held out to evaluate (default: %(default)s)",
    )
    p.add_argument("--rounds", type=int, default=100, help="boosting rounds (default: %(default)s)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="label is true at or over this score (default: %(default)s)",
    )
    p.add_argument(
        "--model",
        type=Path,
        help="register this trained booster (.ubj or .json, saved with "
        "its feature names) instead of training one",
    )
    return p.parse_args(argv)


def read_events(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise TrainError(f"no such events file: {path}")
    if path.suffix.lower() == ".parquet" or path.is_dir():
        return pd.read_parquet(path)
    if path.suffix.lower() == ".csv":
        # As `stageline predict` reads CSV: only an empty field is missing.
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    raise TrainError(f"{path}: expected a .csv or .parquet file of labelled events")


def training_frame(
    spec: PipelineSpec, home: Path, events: pd.DataFrame, timestamp: str
) -> tuple[pd.DataFrame, list[str]]:
    """The validated events with the columns the stages before the model add, and the
    names of the numeric ones (with the numeric request fields): the candidate features."""
    if timestamp not in spec.request.fields:
        raise TrainError(f"--timestamp {timestamp!r} is not a request field of {spec.name}")
    frame = validate_frame(events.reset_index(drop=True), spec.request)
    refuse_rejected(frame, "the request schema")
    request = spec.request
    columns = [n for n, f in request.fields.items() if f.type in ("int", "float", "bool")]
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    for stage in spec.stages:
        cls = resolve_class(stage.uses, spec.base_dir)
        if issubclass(cls, XGBoostPredictor):
            break
        before = set(frame.columns)
        if issubclass(cls, FeatureLookup):
            # Serving reads the latest values; training each event's values as of its time.
            view, key = stage.params["view"], stage.params.get("key")
            frame = offline.point_in_time_join(frame, view, key=key, timestamp=timestamp)
        else:
            frame = build_stage(spec, stage, home)(frame)
            refuse_rejected(frame, f"stage {stage.name!r}")
        columns += [c for c in frame.columns if c not in before]
    numeric = [
        c
        for c in dict.fromkeys(columns)
        if c not in (request.id_field, ERROR_COLUMN) and pd.api.types.is_numeric_dtype(frame[c])
    ]
    return frame, numeric


def refuse_rejected(frame: pd.DataFrame, what: str) -> None:
    bad = error_mask(frame)
    if bad.any():
        examples = "; ".join(frame.loc[bad, ERROR_COLUMN].astype(str).head(3))
        raise TrainError(f"{int(bad.sum())} event(s) fail {what}, e.g. {examples}; fix them")


def split_by_time(
    frame: pd.DataFrame, timestamp: str, holdout: float
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The oldest events to train on and the newest to evaluate, as production would."""
    ordered = frame.sort_values(timestamp, kind="stable").reset_index(drop=True)
    cut = round(len(ordered) * (1 - holdout))
    if not 0 < cut < len(ordered):
        raise TrainError(f"{len(ordered)} events cannot be split {1 - holdout:.0%}/{holdout:.0%}")
    return ordered.iloc[:cut], ordered.iloc[cut:]


def labels(frame: pd.DataFrame, label: str) -> np.ndarray[Any, Any]:
    if label not in frame.columns:
        raise TrainError(f"the events have no label column {label!r} (name yours with --label)")
    values = frame[label].astype(str).str.strip().str.lower().map(_LABELS)
    if values.isna().any():
        example = frame.loc[values.isna(), label].iloc[0]
        raise TrainError(f"label {label!r} must be 1/0 or true/false, got {example!r}")
    return values.to_numpy(dtype="int64")


def train_and_register(
    args: argparse.Namespace,
    spec: PipelineSpec,
    model_name: str,
    home: Path,
    train: pd.DataFrame,
    test: pd.DataFrame,
    candidates: list[str],
) -> ModelMetadata:
    y_train = labels(train, args.label)
    if len(set(y_train)) < 2:
        raise TrainError("the training events have only one label value; both are needed")
    categories = [n for n, f in spec.request.fields.items() if f.type == "category"]
    encoders = fit_encoders(train, categories)
    train, test = apply_encoders(train, encoders), apply_encoders(test, encoders)
    features = [*candidates, *(str(e["output"]) for e in encoders.values())]
    dtrain = xgb.DMatrix(matrix(train, features), y_train, feature_names=features)
    booster = xgb.train(PARAMS, dtrain, num_boost_round=args.rounds)
    metrics = evaluate(booster, test, features, args)
    print(f"trained on {len(train)} events, held out the newest {len(test)}: {features}")
    return LocalRegistry(home / "models").register(
        model_name,
        booster,
        features=features,
        encoders=encoders,
        task="binary",
        threshold=args.threshold,
        metrics={**metrics, "n_train": float(len(train))},
        params={**PARAMS, "rounds": args.rounds},
        description=f"trained by train.py on {args.events.name}",
        aliases=["champion"],
    )


def register_booster(
    args: argparse.Namespace,
    spec: PipelineSpec,
    model_name: str,
    home: Path,
    test: pd.DataFrame,
    candidates: list[str],
) -> ModelMetadata:
    """Register a booster trained elsewhere: its features must be numeric columns the
    pipeline computes (its stages turn a request into them exactly as here)."""
    path: Path = args.model
    if path.suffix.lower() not in (".ubj", ".json"):
        raise TrainError(
            f"{path}: expected XGBoost's own format, .ubj or .json "
            "(booster.save_model('model.ubj')); pickles are refused"
        )
    booster = xgb.Booster()
    try:
        booster.load_model(path)
    except xgb.core.XGBoostError as e:
        raise TrainError(f"{path}: not an XGBoost model ({str(e).splitlines()[0]})") from None
    features = list(booster.feature_names or ())
    if not features:
        raise TrainError(
            f"{path} has no feature names; set booster.feature_names = [...] (columns the "
            f"pipeline computes: {candidates}) and save it again"
        )
    unknown = [f for f in features if f not in candidates]
    if unknown:
        raise TrainError(
            f"the booster's features {unknown} are not numeric columns the pipeline computes "
            f"({candidates}); add a stage or transform that computes them"
        )
    metrics = evaluate(booster, test, features, args) if args.label in test.columns else {}
    return LocalRegistry(home / "models").register(
        model_name,
        booster,
        features=features,
        task="binary",
        threshold=args.threshold,
        metrics=metrics,
        description=f"registered by train.py from {path.name}",
        aliases=["champion"],
    )


def matrix(frame: pd.DataFrame, features: list[str]) -> np.ndarray[Any, Any]:
    """The features as the model stage feeds them: float32, missing as NaN."""
    return frame[features].to_numpy(dtype=np.float32, na_value=np.nan)


def evaluate(
    booster: xgb.Booster, test: pd.DataFrame, features: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """Held-out metrics: AUC (when both labels occur), accuracy and the positive rate."""
    y = labels(test, args.label)
    scores = np.asarray(booster.inplace_predict(matrix(test, features)), dtype="float64")
    metrics = {
        "accuracy": float(((scores >= args.threshold) == y).mean()),
        "positive_rate": float(y.mean()),
        "n_test": float(len(y)),
    }
    if 0 < y.sum() < len(y):
        metrics = {"auc": roc_auc(y, scores), **metrics}
    return metrics


def roc_auc(y: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    positive = y.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def online(spec: PipelineSpec) -> str:
    return spec.features.online.kind if spec.features.online else "memory"


if __name__ == "__main__":
    sys.exit(main())
