"""Train the pipeline's model from its spec: ``stageline train`` and :func:`train`.

The training set is built as serving and batch compute features: the request schema's
checks, each ``FeatureLookup`` as a point-in-time join on the offline store (each event
sees its features as of its ``request.event_time``, never later ones), then the spec's
own stages up to the model, built as serving builds them. Category encoders are fitted
on the training part only. The newest events (``training.holdout``) evaluate the model;
it is registered with its features, encoders, threshold, metrics and a profile of what
it was trained on (:func:`profile`), which monitoring compares live traffic with.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from stageline.context import as_of_field
from stageline.features import OfflineStore, found_column
from stageline.pipeline import build_stage
from stageline.predlog import TIME_COLUMN
from stageline.registry import ModelMetadata, open_registry
from stageline.spec import PipelineSpec, SpecError, StageSpec, resolve_class
from stageline.spec_training import TrainingSpec
from stageline.stage import ERROR_COLUMN, StageError, error_mask
from stageline.stages.combine import SCORE_QUANTILES
from stageline.stages.features import FeatureLookup
from stageline.stages.model import XGBoostPredictor
from stageline.stages.transform import apply_encoders, fit_encoders
from stageline.stages.validate import validate_frame
from stageline.storage import StorageLocations

PROFILE_BINS = 10
"""Histogram bins per feature in a training profile (deciles of the training part)."""
REFERENCE_QUANTILES = 1001
"""Quantiles of the held-out scores a training profile keeps (every 0.1 %): fine enough
to rank a fraud score in the top percent, small enough (about 20 kB) for the metadata."""
_LABELS = {"1": 1, "0": 0, "1.0": 1, "0.0": 0, "true": 1, "false": 0}


@dataclass(frozen=True)
class Trained:
    """A model :func:`train` registered, and what it was judged on."""

    model: ModelMetadata
    alias: str
    """The alias pointed at it."""
    metrics: dict[str, float]
    """Held-out metrics (also on ``model.metrics``)."""
    holdout: pd.DataFrame
    """The held-out events as given: the request fields and the label."""
    seconds: float

    def summary(self) -> str:
        m = self.metrics
        shown = ", ".join(f"{k} {v:.4g}" for k, v in m.items() if not k.startswith("n_"))
        return (
            f"registered {self.model.name} v{self.model.version} as "
            f"{self.model.name}@{self.alias}: trained on "
            f"{int(m['n_train'])} events, held out the newest {int(m['n_test'])}: {shown} "
            f"({self.seconds:.1f} s)"
        )


def train(
    spec: PipelineSpec,
    events: pd.DataFrame,
    home: Path,
    *,
    alias: str | None = None,
    seed: int | None = None,
    rounds: int | None = None,
    description: str | None = None,
) -> Trained:
    """Train the model stage's model on ``events``, evaluate it on the newest of them,
    and register it under ``home``'s registry as ``alias`` (default: the alias the model
    stage serves, else ``champion``).

    ``events``: the request's fields (the event time among them) and the spec's
    ``training.label``. ``seed`` and ``rounds`` override ``training.params.seed`` and
    ``training.rounds``.
    """
    started = time.perf_counter()
    training = training_spec(spec)
    if training.label not in events.columns:
        raise SpecError(
            f"the events have no label column {training.label!r} (training.label in the spec)"
        )
    train_rows, test_rows = split_by_time(spec, events)
    (train_x, candidates), (test_x, _) = (
        training_frame(spec, home, part) for part in (train_rows, test_rows)
    )
    return _fit(
        spec, home, train_rows, test_rows, train_x, test_x, candidates,
        alias=alias, seed=seed, rounds=rounds, description=description, started=started,
    )  # fmt: skip


def train_from_log(
    spec: PipelineSpec,
    logged: pd.DataFrame,
    outcomes: pd.DataFrame,
    home: Path,
    *,
    alias: str | None = None,
    seed: int | None = None,
    rounds: int | None = None,
) -> Trained:
    """Train on the prediction log joined with outcomes that arrived later: the features
    the model saw at serving time are the training features (the serving version's, in
    its order; categories encoded afresh on the training part), so what serving computed
    (the online store's values, the transforms as they ran) is what the model learns
    from. ``logged``: rows of the log (``stageline.predlog.read_log``); ``outcomes``: the
    request's id field and ``training.label``. The last logged prediction of an id is
    its row."""
    started = time.perf_counter()
    training = training_spec(spec)
    id_field = spec.request.id_field
    for column in (id_field, training.label):
        if column not in outcomes.columns:
            raise SpecError(f"the outcomes have no column {column!r}")
    stage = model_stage(spec)
    version_column = f"{stage.params.get('output') or 'score'}_version"
    served = logged[logged[version_column].notna()] if version_column in logged else logged[:0]
    if served.empty:
        raise SpecError("the prediction log has no scored rows to train from")
    latest = served.sort_values(TIME_COLUMN, kind="stable").drop_duplicates(id_field, keep="last")
    truth = outcomes[[id_field, training.label]].drop_duplicates(id_field, keep="last")
    joined = latest.drop(columns=[training.label], errors="ignore").merge(truth, on=id_field)
    if joined.empty:
        raise SpecError(f"no logged prediction has an outcome (joined on {id_field!r})")
    version = int(joined[version_column].max())
    meta = open_registry(StorageLocations.resolve(spec, home).models).resolve(
        str(stage.params["model"]), version
    )
    encoded = set(str(e["output"]) for e in meta.encoders.values())
    candidates = [f for f in meta.features if f not in encoded]
    missing = [f for f in candidates if f not in joined.columns]
    if missing:
        raise SpecError(f"the log lacks feature column(s) {missing} of {meta.name} v{version}")
    train_rows, test_rows = split_by_time(spec, joined)
    return _fit(
        spec, home, train_rows, test_rows, train_rows, test_rows, candidates,
        alias=alias, seed=seed, rounds=rounds, started=started,
        description=(
            f"{spec.name}: trained on {len(train_rows)} logged predictions of "
            f"{meta.name} v{version} with their outcomes, held out the newest {len(test_rows)}"
        ),
    )  # fmt: skip


def split_by_time(spec: PipelineSpec, events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The older events to train on and the newest ``training.holdout`` to evaluate."""
    training = training_spec(spec)
    timestamp = as_of_field(spec)
    if timestamp not in events.columns:
        raise SpecError(f"the events have no event-time column {timestamp!r} (request.event_time)")
    ordered = events.sort_values(timestamp, kind="stable", ignore_index=True)
    cut = int(len(ordered) * (1 - training.holdout))
    if not 0 < cut < len(ordered):
        raise SpecError(
            f"{len(ordered)} events cannot be split {1 - training.holdout:.0%} to train, "
            f"{training.holdout:.0%} to evaluate"
        )
    return ordered.iloc[:cut], ordered.iloc[cut:]


def _fit(
    spec: PipelineSpec,
    home: Path,
    train_rows: pd.DataFrame,
    test_rows: pd.DataFrame,
    train_x: pd.DataFrame,
    test_x: pd.DataFrame,
    candidates: list[str],
    *,
    alias: str | None,
    seed: int | None,
    rounds: int | None,
    description: str | None,
    started: float,
) -> Trained:
    """Encode, train, evaluate on the held-out part and register: what every way of
    training shares, once the features of each part are known."""
    training = training_spec(spec)
    stage = model_stage(spec)
    timestamp = as_of_field(spec)
    binary = training.objective.startswith("binary:")
    y_train, y_test = (labels(part[training.label], binary) for part in (train_rows, test_rows))
    categorical = training.categorical
    if categorical is None:
        categorical = tuple(n for n, f in spec.request.fields.items() if f.type == "category")
    encoders = fit_encoders(train_x, categorical)
    train_x, test_x = (apply_encoders(f, encoders) for f in (train_x, test_x))
    features = list(
        training.features or (*candidates, *(str(e["output"]) for e in encoders.values()))
    )
    missing = [f for f in features if f not in train_x.columns]
    if missing:
        raise SpecError(f"training.features names columns the stages do not give: {missing}")

    params: dict[str, Any] = {
        "objective": training.objective,
        "tree_method": "hist",
        "nthread": 1,
        **training.params,
    }
    if seed is not None:
        params["seed"] = seed
    booster = xgb.train(
        params,
        xgb.DMatrix(matrix(train_x, features), y_train, feature_names=features),
        num_boost_round=rounds or training.rounds,
    )
    scores = np.asarray(booster.inplace_predict(matrix(test_x, features)), dtype="float64")
    metrics, threshold = evaluate(y_test, scores, binary=binary, train_mean=float(y_train.mean()))
    metrics |= {"n_train": float(len(train_rows)), "n_test": float(len(test_rows))}
    alias = alias or str(stage.params.get("alias") or "champion")
    meta = open_registry(StorageLocations.resolve(spec, home).models).register(
        str(stage.params["model"]),
        booster,
        features=features,
        encoders=encoders,
        task="binary" if binary else "regression",
        threshold=threshold,
        metrics=metrics,
        params={**params, "rounds": rounds or training.rounds},
        description=description
        or (
            f"{spec.name}: trained on {len(train_rows)} events to "
            f"{train_rows[timestamp].max()}, held out the next {len(test_rows)}"
        ),
        aliases=(alias,),
        profile=profile(train_x, features, scores),
    )
    holdout = test_rows.reset_index(drop=True)
    return Trained(meta, alias, metrics, holdout, time.perf_counter() - started)


def training_spec(spec: PipelineSpec) -> TrainingSpec:
    if spec.training is None:
        raise SpecError(
            f"pipeline {spec.name!r} has no training: section; add one (label, objective, "
            "params, rounds) to train with stageline, or register a model trained "
            "elsewhere with stageline registry register"
        )
    return spec.training


def model_stage(spec: PipelineSpec) -> StageSpec:
    """The spec's ``XGBoostPredictor`` stage: its params name the model to register."""
    for stage in spec.stages:
        if issubclass(resolve_class(stage.uses, spec.base_dir), XGBoostPredictor):
            return stage
    raise SpecError(f"pipeline {spec.name!r} has no XGBoostPredictor stage to train for")


def training_frame(
    spec: PipelineSpec, home: Path, events: pd.DataFrame
) -> tuple[pd.DataFrame, list[str]]:
    """The events as the model stage sees them when serving, and the candidate features
    in order: the numeric request fields (not the id), each lookup's numeric features
    and found flag, each other stage's numeric columns."""
    fields = [n for n in spec.request.fields if n in events.columns]
    frame = validate_frame(events[fields].reset_index(drop=True), spec.request)
    refuse_rejected(frame, "the request schema")
    candidates = [
        n
        for n, f in spec.request.fields.items()
        if f.type in ("int", "float", "bool") and n != spec.request.id_field
    ]
    offline = OfflineStore.for_spec(spec, home)
    timestamp = as_of_field(spec)
    for stage in spec.stages:
        cls = resolve_class(stage.uses, spec.base_dir)
        if issubclass(cls, XGBoostPredictor):
            break
        if issubclass(cls, FeatureLookup):
            # Serving reads the latest values; training each event's values as of its time.
            view_name = str(stage.params["view"])
            key = stage.params.get("key")
            frame = offline.point_in_time_join(frame, view_name, key=key, timestamp=timestamp)
            view = spec.features.views[view_name]
            candidates += [n for n, f in view.features.items() if f.type != "str"]
            candidates.append(found_column(view_name))
        else:
            before = set(frame.columns)
            built = build_stage(spec, stage, home)
            frame = built(frame)
            refuse_rejected(frame, f"stage {stage.name!r}")
            provided = getattr(built, "provided_columns", None)
            added = list(provided()) if callable(provided) else []
            added += [c for c in frame.columns if c not in before and c not in added]
            candidates += [
                c
                for c in added
                if c in frame.columns
                and c != ERROR_COLUMN
                and pd.api.types.is_numeric_dtype(frame[c])
            ]
    return frame, list(dict.fromkeys(candidates))


def refuse_rejected(frame: pd.DataFrame, what: str) -> None:
    bad = error_mask(frame)
    if bad.any():
        examples = "; ".join(frame.loc[bad, ERROR_COLUMN].astype(str).head(3))
        raise StageError(f"{int(bad.sum())} training event(s) fail {what}, e.g. {examples}")


def labels(values: pd.Series, binary: bool) -> np.ndarray[Any, Any]:
    """The label as XGBoost takes it: 1/0 for a binary objective, a float otherwise."""
    if binary:
        mapped = values.astype(str).str.strip().str.lower().map(_LABELS)
        if mapped.isna().any():
            raise StageError(
                f"label {values.name!r} must be 1/0 or true/false, "
                f"got {values[mapped.isna()].iloc[0]!r}"
            )
        return mapped.to_numpy(dtype="int64")
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        raise StageError(
            f"label {values.name!r} must be a number, got {values[numbers.isna()].iloc[0]!r}"
        )
    return numbers.to_numpy(dtype="float64")


def matrix(frame: pd.DataFrame, features: Sequence[str]) -> np.ndarray[Any, Any]:
    """As ``XGBoostPredictor`` builds it: float32, NaN for missing."""
    return frame[list(features)].to_numpy(dtype=np.float32, na_value=np.nan)


def evaluate(
    y: np.ndarray[Any, Any], scores: np.ndarray[Any, Any], *, binary: bool, train_mean: float
) -> tuple[dict[str, float], float | None]:
    """Held-out metrics, the headline first, and a binary model's threshold (the one
    with the best F1 on these events)."""
    if binary:
        threshold, f1 = best_f1_threshold(y, scores)
        return {
            "auc": roc_auc(y, scores),
            "logloss": log_loss(y, scores),
            "f1": f1,
            "positive_rate": float(y.mean()),
        }, threshold
    baseline = np.full(len(y), train_mean)
    return {
        "mae": float(np.abs(scores - y).mean()),
        "rmse": rmse(y, scores),
        "baseline_mae": float(np.abs(baseline - y).mean()),
        "baseline_rmse": rmse(y, baseline),
    }, None


def roc_auc(y: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> float:
    """Area under the ROC curve (Mann-Whitney U), ties counted half."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    pos = y.astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(y: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> float:
    p = np.clip(scores, 1e-15, 1 - 1e-15)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def rmse(y: np.ndarray[Any, Any], predicted: np.ndarray[Any, Any]) -> float:
    return float(np.sqrt(((predicted - y) ** 2).mean()))


def best_f1_threshold(y: np.ndarray[Any, Any], scores: np.ndarray[Any, Any]) -> tuple[float, float]:
    """The score threshold with the best F1 on held-out data, and that F1."""
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(y[order])
    k = np.arange(1, len(y) + 1)
    f1 = 2 * tp / (k + y.sum())
    best = int(np.argmax(f1))
    return float(scores[order][best]), float(f1[best])


def profile(
    frame: pd.DataFrame, features: Sequence[str], scores: np.ndarray[Any, Any]
) -> dict[str, Any]:
    """What a model was trained on, for monitoring: each feature's histogram over the
    training part (bin edges at its deciles) and the score's over the held-out part
    (what the model gives on events it has not seen). Live traffic binned on the same
    edges gives the population stability index of each (:func:`psi`).

    Also the held-out scores' quantiles (:data:`REFERENCE_QUANTILES`, evenly spaced from
    the lowest to the highest): the reference an ensemble's ``rank`` method ranks this
    model's scores against (:mod:`stageline.stages.combine`)."""
    present = scores[~np.isnan(scores)].astype("float64")
    quantiles = np.quantile(present, np.linspace(0, 1, REFERENCE_QUANTILES)) if len(present) else []
    return {
        "bins": PROFILE_BINS,
        "rows": len(frame),
        "features": {
            f: histogram(frame[f].to_numpy(dtype="float64", na_value=np.nan)) for f in features
        },
        "score": histogram(scores.astype("float64")),
        SCORE_QUANTILES: [float(q) for q in quantiles],
    }


def histogram(values: np.ndarray[Any, Any]) -> dict[str, Any]:
    """Inner bin edges at the deciles of ``values`` (repeated ones merged), the share of
    values in each bin, the share missing and the mean."""
    present = values[~np.isnan(values)]
    if len(present) == 0:
        return {"edges": [], "shares": [1.0], "missing": 1.0, "mean": None}
    inner = np.unique(np.quantile(present, np.linspace(0, 1, PROFILE_BINS + 1)[1:-1]))
    return {
        "edges": [float(e) for e in inner],
        "shares": [float(s) for s in shares(present, inner)],
        "missing": float(1 - len(present) / len(values)),
        "mean": float(present.mean()),
    }


def shares(
    values: np.ndarray[Any, Any], edges: Sequence[float] | np.ndarray[Any, Any]
) -> np.ndarray[Any, Any]:
    """The share of ``values`` (no NaN) in each bin: below the first edge, between each
    two, at or over the last (as :func:`histogram` bins them)."""
    counts = np.bincount(
        np.searchsorted(np.asarray(edges), values, side="right"), minlength=len(edges) + 1
    )
    return counts / max(len(values), 1)


def psi(
    expected: Sequence[float] | np.ndarray[Any, Any],
    actual: Sequence[float] | np.ndarray[Any, Any],
    floor: float = 1e-4,
) -> float:
    """Population stability index of ``actual`` bin shares against ``expected`` ones (an
    empty bin counts as ``floor``): under 0.1 stable, 0.1 to 0.25 a shift, over 0.25
    a drift, by the usual reading."""
    e = np.maximum(np.asarray(expected, dtype="float64"), floor)
    a = np.maximum(np.asarray(actual, dtype="float64"), floor)
    return float(((a - e) * np.log(a / e)).sum())
