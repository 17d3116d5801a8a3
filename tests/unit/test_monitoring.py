"""``stageline monitor`` and ``stageline evaluate`` over a prediction log written as
serving writes it: the holdout scored by the pipeline's own stages, logged by
``PredictionLog``. Monitor flags the one feature a drift was injected into; evaluate
reproduces each model version's registered held-out AUC from the log and late labels."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from stageline.demo.train import EVENTS, DemoResult
from stageline.monitoring import DRIFT, DriftMeter, drift, parse_since
from stageline.pipeline import Pipeline
from stageline.predlog import REQUEST_ID, PredictionLog, read_log, scored_rows
from stageline.registry import LocalRegistry
from stageline.spec import PipelineSpec, SpecError
from stageline.training import train
from stageline_cli.main import main
from tests.conftest import FRAUD_SPEC


@pytest.fixture
def home(demo_copy: Path) -> Path:
    return demo_copy


def log_holdout(
    spec: PipelineSpec,
    home: Path,
    holdout: pd.DataFrame,
    *,
    alias: str = "champion",
    **change: float,
) -> None:
    """The held-out records scored as training scored them (features as of each one's
    time), each feature in ``change`` multiplied (an upstream gone wrong), logged."""
    pipe = Pipeline(spec, home, as_of=True)
    pipe.reconfigure({"model": {"alias": alias}})
    frame = pipe(holdout[list(spec.request.fields)])
    frame[REQUEST_ID] = [f"r-{alias}-{i}" for i in range(len(frame))]
    for column, factor in change.items():
        frame[column] = frame[column] * factor
    log = PredictionLog(home, pipeline=spec.name, spec=spec.prediction_log, prepare=scored_rows)
    log.log(frame)
    assert log.close()


def test_monitor_flags_the_one_drifted_feature_and_not_the_others(
    fraud_spec: PipelineSpec, home: Path, demo: DemoResult, capsys: pytest.CaptureFixture[str]
) -> None:
    holdout = pd.read_parquet(demo.holdout)
    log_holdout(fraud_spec, home, holdout)
    [steady] = drift(fraud_spec, home)
    assert steady.flagged() == []
    assert steady.rows == len(holdout)

    shutil.rmtree(home / "logs")
    log_holdout(fraud_spec, home, holdout, txn_count_7d=4.0)
    [report] = drift(fraud_spec, home, parse_since("1h"))
    assert [d.name for d in report.flagged()] == ["txn_count_7d"]
    by_name = {d.name: d for d in report.features}
    assert by_name["txn_count_7d"].psi >= DRIFT
    assert all(d.psi < DRIFT for d in report.features if d.name != "txn_count_7d")
    assert set(by_name) == set(demo.model.features)

    argv = ["monitor", "--spec", str(FRAUD_SPEC), "--home", str(home), "--fail-on-drift"]
    assert main(argv) == 3
    out = capsys.readouterr().out
    assert "drift (PSI >= 0.25) in: txn_count_7d" in out
    page = (home / "reports" / "fraud-drift.html").read_text()
    assert page.count("<svg") == len(demo.model.features) + 1  # each feature, and the score
    assert "Drift in txn_count_7d." in page
    assert main(argv[:-1]) == 0  # without --fail-on-drift: a report, not a failure


def test_evaluate_reproduces_each_versions_held_out_auc_from_the_log(
    fraud_spec: PipelineSpec, home: Path, demo: DemoResult, capsys: pytest.CaptureFixture[str]
) -> None:
    challenger = train(
        fraud_spec, pd.read_parquet(home / EVENTS), home, alias="challenger", seed=8, rounds=20
    )
    holdout = pd.read_parquet(demo.holdout)
    log_holdout(fraud_spec, home, holdout)
    log_holdout(fraud_spec, home, holdout, alias="challenger")
    labels = home / "labels.parquet"
    holdout[["transaction_id", "is_fraud"]].to_parquet(labels)

    argv = ["evaluate", "--spec", str(FRAUD_SPEC), "--home", str(home), "--labels", str(labels)]
    assert main([*argv, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    assert [(r["version"], r["n"]) for r in rows] == [(1, len(holdout)), (2, len(holdout))]
    champion = LocalRegistry(home / "models").resolve("fraud", "champion")
    assert rows[0]["auc"] == pytest.approx(champion.metrics["auc"], abs=1e-9)
    assert rows[1]["auc"] == pytest.approx(challenger.metrics["auc"], abs=1e-9)
    assert rows[0]["logloss"] == pytest.approx(champion.metrics["logloss"], abs=1e-6)
    assert rows[0]["positive_rate"] == pytest.approx(holdout["is_fraud"].mean())
    assert main(argv) == 0
    assert "auc" in capsys.readouterr().out


def test_nothing_to_read_is_an_error_that_says_where(fraud_spec: PipelineSpec, home: Path) -> None:
    with pytest.raises(SpecError, match=r"no predictions logged under .*logs/fraud"):
        drift(fraud_spec, home)
    with pytest.raises(SpecError, match="give a duration"):
        parse_since("yesterday")
    assert read_log(home / "logs" / "fraud").empty


def test_the_serving_replicas_meter_gives_the_figures_monitor_gives(
    fraud_spec: PipelineSpec, home: Path, demo: DemoResult
) -> None:
    log_holdout(fraud_spec, home, pd.read_parquet(demo.holdout), txn_count_7d=4.0)
    rows = read_log(home / "logs" / "fraud")
    [report] = drift(fraud_spec, home, frame=rows)

    meter = DriftMeter(fraud_spec, home)
    for start in range(0, len(rows), 700):  # batch by batch, as the log writes them
        figures = meter.observe(rows.iloc[start : start + 700])

    assert set(figures) == {(1, d.name) for d in [*report.features, report.score]}
    for d in [*report.features, report.score]:
        assert figures[(1, d.name)] == pytest.approx(d.psi), d.name
    assert figures[(1, "txn_count_7d")] >= DRIFT
