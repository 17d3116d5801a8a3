"""``stageline train``: the model stage's model from labelled events, trained as the demo
trains, evaluated on the newest events, registered under an alias with its profile; a
spec, events or labels it cannot train from are refused with what to fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stageline.demo.train import EVENTS, DemoResult
from stageline.pipeline import Pipeline
from stageline.predlog import REQUEST_ID, PredictionLog, scored_rows
from stageline.registry import LocalRegistry
from stageline.spec import PipelineSpec, SpecError, load_spec
from stageline.stage import StageError
from stageline.stages.combine import SCORE_QUANTILES, Reference
from stageline.training import REFERENCE_QUANTILES, train
from stageline_cli.main import main
from tests.conftest import FRAUD_SPEC, SMALL_DEMO


@pytest.fixture
def home(demo_copy: Path) -> Path:
    return demo_copy


def test_train_on_the_demos_events_registers_a_challenger_as_good_as_the_champion(
    home: Path, demo: DemoResult, capsys: pytest.CaptureFixture[str]
) -> None:
    events = home / EVENTS
    argv = ["train", "--spec", str(FRAUD_SPEC), "--home", str(home), "--labels", str(events)]
    # The rounds the small demo was built with (the spec's are the full demo's).
    assert main([*argv, "--alias", "challenger", "--rounds", str(SMALL_DEMO["rounds"])]) == 0

    out = capsys.readouterr().out
    assert out.startswith("registered fraud v2 as fraud@challenger: trained on 16000 events")
    registry = LocalRegistry(home / "models")
    assert registry.aliases("fraud") == {"champion": 1, "challenger": 2}
    champion, challenger = (
        registry.resolve("fraud", "champion"),
        registry.resolve("fraud", "challenger"),
    )
    assert abs(challenger.metrics["auc"] - champion.metrics["auc"]) <= 0.01
    assert f"auc {challenger.metrics['auc']:.4g}" in out
    # The same events, spec and seed train the very same model: training is reproducible,
    # and the demo's model is what `stageline train` makes.
    assert challenger.sha256 == champion.sha256
    assert challenger.features == champion.features
    assert challenger.threshold == champion.threshold
    assert challenger.metrics["n_test"] == len(pd.read_parquet(demo.holdout))


def test_the_profile_bins_every_feature_and_the_score(demo: DemoResult) -> None:
    profile = demo.model.profile
    assert set(profile["features"]) == set(demo.model.features)
    assert profile["rows"] == 16_000
    for name, histogram in [*profile["features"].items(), ("score", profile["score"])]:
        assert len(histogram["shares"]) == len(histogram["edges"]) + 1, name
        assert sum(histogram["shares"]) == pytest.approx(1.0), name
        assert histogram["edges"] == sorted(histogram["edges"]), name
    # Deciles: a continuous feature's bins hold a tenth each; a flag's two values, two bins.
    assert np.allclose(profile["features"]["amount"]["shares"], 0.1, atol=0.01)
    found = profile["features"]["customer_stats_found"]
    assert len(found["shares"]) == 2
    assert found["missing"] == 0.0


def test_the_profile_keeps_the_held_out_scores_quantiles_to_rank_against(
    demo: DemoResult, fraud_pipeline: Pipeline, holdout: pd.DataFrame
) -> None:
    quantiles = demo.model.profile[SCORE_QUANTILES]
    assert len(quantiles) == REFERENCE_QUANTILES
    assert quantiles == sorted(quantiles)
    # Ranked against them (as an ensemble's rank method ranks), the held-out scores the
    # model gives spread evenly from 0 to 1: the reference is this model's.
    fields = list(fraud_pipeline.spec.request.fields)
    scores = fraud_pipeline.predict(holdout[fields])["score"]
    ranks = Reference(quantiles).rank(scores.to_numpy())
    assert np.quantile(ranks, [0.1, 0.5, 0.9]) == pytest.approx([0.1, 0.5, 0.9], abs=0.01)


def test_a_new_seed_is_a_new_version_and_the_serving_alias_by_default(home: Path) -> None:
    spec = load_spec(FRAUD_SPEC)
    events = pd.read_parquet(home / EVENTS)

    trained = train(spec, events, home, seed=8, rounds=20)

    registry = LocalRegistry(home / "models")
    assert (trained.model.version, trained.alias) == (2, "champion")
    assert registry.aliases("fraud") == {"champion": 2}
    assert trained.model.params["seed"] == 8
    assert trained.model.params["rounds"] == 20
    assert 0.8 < trained.metrics["auc"] <= 1.0
    assert 0 < trained.metrics["logloss"] < 0.3
    assert trained.holdout["ts"].min() >= events["ts"].sort_values().iloc[16_000 - 1]


def _spec(**training: object) -> PipelineSpec:
    spec = load_spec(FRAUD_SPEC)
    data = spec.model_dump()
    data["training"] = training or None
    made = PipelineSpec.model_validate(data)
    made._base_dir = spec.base_dir
    return made


def test_what_cannot_be_trained_is_refused_with_what_to_fix(home: Path) -> None:
    events = pd.read_parquet(home / EVENTS).head(2_000)
    with pytest.raises(SpecError, match="has no training: section"):
        train(_spec(), events, home)
    with pytest.raises(SpecError, match="no label column 'fraud'"):
        train(_spec(label="fraud"), events, home)
    with pytest.raises(SpecError, match="no event-time column 'ts'"):
        train(_spec(label="is_fraud"), events.drop(columns=["ts"]), home)
    bad = events.assign(is_fraud=events["is_fraud"].astype(str).where(events.index != 5, "maybe"))
    with pytest.raises(StageError, match="must be 1/0 or true/false, got 'maybe'"):
        train(_spec(label="is_fraud"), bad, home)
    negative = events.assign(amount=events["amount"].where(events.index != 3, -1.0))
    with pytest.raises(StageError, match="1 training event"):
        train(_spec(label="is_fraud"), negative, home)
    with pytest.raises(SpecError, match=r"training\.features names columns"):
        train(_spec(label="is_fraud", features=["amount", "nope"]), events, home)
    with pytest.raises(ValueError, match="multiclass model is trained elsewhere"):
        _spec(label="is_fraud", objective="multi:softprob")
    with pytest.raises(ValueError, match="holdout"):
        _spec(label="is_fraud", holdout=1.0)
    # Nothing was registered by any of them.
    assert LocalRegistry(home / "models").aliases("fraud") == {"champion": 1}


def test_train_from_the_log_learns_from_the_features_serving_saw(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = load_spec(FRAUD_SPEC)
    events = pd.read_parquet(home / EVENTS)
    # Every event scored as serving scored it at its time, and logged; but an upstream
    # bug doubled avg_amount_30d in what serving saw.
    frame = Pipeline(spec, home, as_of=True)(events[list(spec.request.fields)])
    frame[REQUEST_ID] = [f"r{i}" for i in range(len(frame))]
    frame["avg_amount_30d"] = frame["avg_amount_30d"] * 2
    log = PredictionLog(home, pipeline="fraud", spec=spec.prediction_log, prepare=scored_rows)
    log.log(frame)
    assert log.close()
    outcomes = home / "outcomes.parquet"
    events[["transaction_id", "is_fraud"]].to_parquet(outcomes)

    argv = ["train", "--spec", str(FRAUD_SPEC), "--home", str(home), "--labels", str(outcomes)]
    rounds = str(SMALL_DEMO["rounds"])
    assert main([*argv, "--from-log", "--alias", "challenger", "--rounds", rounds]) == 0

    assert "registered fraud v2 as fraud@challenger" in capsys.readouterr().out
    registry = LocalRegistry(home / "models")
    champion = registry.resolve("fraud", "champion")
    challenger = registry.resolve("fraud", "challenger")
    assert challenger.features == champion.features  # the serving version's features
    assert challenger.metrics["n_train"] == champion.metrics["n_train"]
    # It learned from what serving saw (the doubled values), not from the offline store.
    trained, served = (m.profile["features"]["avg_amount_30d"] for m in (champion, challenger))
    assert served["mean"] == pytest.approx(2 * trained["mean"])
    assert abs(challenger.metrics["auc"] - champion.metrics["auc"]) <= 0.01
    assert "logged predictions of fraud v1" in challenger.description
