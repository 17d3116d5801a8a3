"""The second shipped example, pipelines/delivery.yaml: a regression pipeline with two
feature views, a transform and a stage of its own given by file path, outputs declared
in the spec, and a world builder the spec names as its ``setup``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stageline import Pipeline
from stageline.registry import LocalRegistry
from stageline.spec import PipelineSpec, load_spec, prepare_home
from stageline.spec_classes import resolve_object
from stageline_cli.main import main
from tests.conftest import DELIVERY_SPEC, DeliveryWorld

OUTPUTS = ["eta", "promise_minutes", "late_risk", "eta_reasons"]
ANSWER = ["order_id", *OUTPUTS, "model_name", "model_version", "error"]


@pytest.fixture(scope="module")
def pipe(delivery_spec: PipelineSpec, delivery_world: DeliveryWorld) -> Pipeline:
    return Pipeline(delivery_spec, delivery_world.home)


@pytest.fixture(scope="module")
def holdout(delivery_world: DeliveryWorld) -> pd.DataFrame:
    return pd.read_parquet(delivery_world.holdout)


@pytest.fixture
def records(delivery_spec: PipelineSpec, holdout: pd.DataFrame) -> pd.DataFrame:
    """Held-out orders as a client sends them: the request fields, nothing else."""
    return holdout[list(delivery_spec.request.fields)].copy()


def test_the_spec_loads_with_its_files_named_by_path() -> None:
    spec = load_spec(DELIVERY_SPEC)

    assert spec.request.id_field == "order_id"
    assert spec.request.event_time == "placed_at"
    assert [s.name for s in spec.stages] == ["restaurant", "zone", "transform", "model", "promise"]
    assert spec.stage("promise").uses == "delivery/stages.py:Promise"
    assert spec.stage("transform").params == {"function": "delivery/transforms.py:features"}
    assert spec.setup == "delivery/world.py:ensure"
    assert [o.name for o in spec.outputs or ()] == OUTPUTS
    assert set(spec.serve.inline or ()) == {s.name for s in spec.stages}


def test_the_holdout_is_request_records_with_the_label(
    delivery_spec: PipelineSpec, holdout: pd.DataFrame
) -> None:
    assert list(holdout.columns) == [*delivery_spec.request.fields, "minutes"]
    assert holdout["order_id"].is_unique


def test_predict_answers_exactly_the_declared_outputs(
    pipe: Pipeline, records: pd.DataFrame
) -> None:
    predicted = pipe.predict(records)

    assert list(predicted.columns) == ANSWER
    assert predicted["order_id"].tolist() == records["order_id"].tolist()
    assert predicted["error"].isna().all()
    assert set(predicted["model_name"]) == {"delivery_eta"}
    assert all(len(r) == 3 for r in predicted["eta_reasons"])
    assert predicted["promise_minutes"].dtype == "int64"
    assert predicted["late_risk"].dtype == bool


def test_predictions_are_far_better_than_the_mean(
    pipe: Pipeline, records: pd.DataFrame, holdout: pd.DataFrame, delivery_world: DeliveryWorld
) -> None:
    minutes = holdout["minutes"].to_numpy()
    eta = pipe.predict(records)["eta"].to_numpy()

    mae = np.abs(eta - minutes).mean()
    mean_mae = np.abs(minutes.mean() - minutes).mean()  # even knowing the holdout's mean
    assert mae < 0.6 * mean_mae, (mae, mean_mae)
    metrics = delivery_world.metrics
    assert metrics["mae"] < 0.6 * metrics["baseline_mae"]
    assert metrics["rmse"] >= metrics["mae"]


def test_scoring_as_of_each_order_reproduces_the_held_out_metric(
    delivery_spec: PipelineSpec,
    delivery_world: DeliveryWorld,
    records: pd.DataFrame,
    holdout: pd.DataFrame,
) -> None:
    # Features as of placed_at, as training joined them: the very predictions the
    # registered MAE was measured on, so training and serving cannot disagree.
    backtest = Pipeline(delivery_spec, delivery_world.home, as_of=True).predict(records)

    mae = np.abs(backtest["eta"].to_numpy() - holdout["minutes"].to_numpy()).mean()
    assert mae == pytest.approx(delivery_world.metrics["mae"], rel=1e-9)


def test_the_promise_follows_from_the_prediction(pipe: Pipeline, records: pd.DataFrame) -> None:
    predicted = pipe.predict(records)
    eta = predicted["eta"].to_numpy()
    promise = predicted["promise_minutes"].to_numpy()

    assert (promise % 5 == 0).all()
    assert ((promise >= eta) & (promise - eta < 5)).all()
    assert predicted["late_risk"].tolist() == (eta > 45).tolist()
    assert 0 < predicted["late_risk"].sum() < len(predicted)


def test_an_unknown_restaurant_is_scored_with_the_views_defaults(
    pipe: Pipeline, records: pd.DataFrame
) -> None:
    batch = records.head(3).reset_index(drop=True)
    batch.loc[1, "restaurant_id"] = "opened-yesterday"

    scored = pipe(batch)
    predicted = pipe.predict(batch)

    assert predicted["error"].isna().all()
    assert np.isfinite(predicted["eta"]).all()
    assert scored["restaurant_stats_found"].tolist() == [True, False, True]
    assert scored.loc[1, "prep_minutes_7d"] == 15.0  # the spec's default


def test_an_invalid_order_is_rejected_naming_the_field(
    pipe: Pipeline, records: pd.DataFrame
) -> None:
    batch = records.head(3).reset_index(drop=True)
    batch.loc[1, "distance_km"] = -2.0

    predicted = pipe.predict(batch)

    assert predicted["error"][[0, 2]].isna().all()
    assert predicted["error"][1] == "validate: distance_km: must be >= 0 (got -2.0)"
    assert predicted["eta"].notna().tolist() == [True, False, True]


def test_stageline_predict_prints_json_lines_keyed_by_order_id(
    tmp_path: Path,
    records: pd.DataFrame,
    delivery_world: DeliveryWorld,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "orders.parquet"
    records.head(4).to_parquet(path)

    argv = ["predict", "--spec", str(DELIVERY_SPEC), "--home", str(delivery_world.home)]
    assert main([*argv, "--input", str(path)]) == 0

    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["order_id"] for line in lines] == records["order_id"].head(4).tolist()
    assert list(lines[0]) == ANSWER
    assert isinstance(lines[0]["promise_minutes"], int)


def test_setup_builds_the_world_on_an_empty_home_once(
    tmp_path: Path, delivery_spec: PipelineSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"

    prepare_home(delivery_spec, home)
    first = capsys.readouterr().err
    prepare_home(delivery_spec, home)  # the model is there: nothing to do

    assert "building it first" in first
    assert capsys.readouterr().err == ""
    meta = LocalRegistry(home / "models").resolve("delivery_eta", "champion")
    assert (meta.task, meta.version, meta.threshold) == ("regression", 1, None)
    assert list(meta.metrics)[:2] == ["mae", "rmse"]
    assert (home / "online" / "restaurant_stats.parquet").exists()
    assert (home / "online" / "zone_stats.parquet").exists()


def test_the_training_script_builds_a_world(
    tmp_path: Path, delivery_spec: PipelineSpec, capsys: pytest.CaptureFixture[str]
) -> None:
    script = resolve_object("delivery/train.py:main", delivery_spec.base_dir, attr="function")

    assert script(["--home", str(tmp_path / "home"), "--orders", "3000"]) == 0

    assert "held-out MAE" in capsys.readouterr().err
    pipe = Pipeline(delivery_spec, tmp_path / "home")
    holdout = pd.read_parquet(tmp_path / "home" / "delivery" / "holdout.parquet")
    assert len(holdout) == 600
    assert pipe.predict(holdout.head(5))["error"].isna().all()
