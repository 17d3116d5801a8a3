"""``stageline init``: the project it creates trains and scores as created, registers a
booster trained elsewhere, and takes a user's own larger data; bad names and existing
folders are refused. The generated train.py runs as a user runs it: a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost

from stageline import load_spec
from stageline.registry import LocalRegistry
from stageline_cli import main
from stageline_cli.init import VIEW, next_steps, template_data

NAME = "shop"


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(project: Path, home: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """The project's train.py, run from elsewhere, as a user would."""
    return subprocess.run(
        [sys.executable, str(project / "train.py"), "--home", str(home), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=project.parent,
    )


def predict(
    capsys: pytest.CaptureFixture[str], project: Path, home: Path, rows: Path
) -> list[dict[str, Any]]:
    code, out, err = cli(
        capsys, "predict", "--spec", project / f"{NAME}.yaml", "--home", home, "--input", rows
    )
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture
def project(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    code, out, err = cli(capsys, "init", NAME, "--dir", tmp_path / "work")
    assert code == 0, err
    root = tmp_path / "work" / NAME
    for command, _ in next_steps(NAME, root=root):  # the steps it printed
        assert command in out
    return root


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_init_creates_a_project_that_trains_and_scores_as_created(
    project: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = load_spec(project / f"{NAME}.yaml")
    assert spec.name == NAME
    assert [s.name for s in spec.stages] == ["features", "transform", "band", "model", "decision"]
    assert spec.features.views[VIEW].source == f"data/{VIEW}.parquet"
    events = pd.read_csv(project / "data" / "events.csv")
    assert 20 <= len(events) <= 50
    assert set(events["label"]) == {0, 1}

    run = train(project, home)
    assert run.returncode == 0, run.stderr
    assert f"registered {NAME} v1 as champion" in run.stdout
    assert f"materialized {VIEW}: 8 entities" in run.stdout

    predictions = predict(capsys, project, home, project / "data" / "events.csv")
    assert [p["event_id"] for p in predictions] == events["event_id"].tolist()
    assert all(p["error"] is None and 0.0 <= p["score"] <= 1.0 for p in predictions)
    assert {(p["model_name"], p["model_version"]) for p in predictions} == {(NAME, 1)}
    meta = LocalRegistry(home / "models").resolve(NAME, "champion")
    # The custom stage, the transform, the view and the encoded category all feed it.
    assert {"amount_band", "amount_to_avg", "avg_amount_30d", "channel_code"} <= set(meta.features)
    assert "auc" in meta.metrics


def test_train_takes_a_users_larger_parquet_and_learns(
    project: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events, table = template_data(events=4000, customers=150, seed=11)
    table.to_parquet(project / "data" / f"{VIEW}.parquet", index=False)  # their features
    mine = tmp_path / "labelled.parquet"
    events.to_parquet(mine, index=False)

    run = train(project, home, "--events", mine)

    assert run.returncode == 0, run.stderr
    meta = LocalRegistry(home / "models").resolve(NAME, "champion")
    assert meta.metrics["n_test"] == 1000
    assert meta.metrics["auc"] > 0.8  # the template data's signal, learned
    predictions = predict(capsys, project, home, mine)
    assert len(predictions) == len(events)
    assert all(p["error"] is None for p in predictions)


MINE = ["amount", "avg_amount_30d", "amount_to_avg", "amount_band"]


def expected_features(project: Path, events: pd.DataFrame) -> np.ndarray:
    """MINE as serving computes them, from the files alone: the request's amount, the
    customer's latest feature values, the transform and the stage written out again."""
    table = pd.read_parquet(project / "data" / f"{VIEW}.parquet")
    latest = table.sort_values("event_time").groupby("customer_id").last()
    avg = latest.loc[events["customer_id"], "avg_amount_30d"].to_numpy()
    amount = events["amount"].to_numpy(dtype="float64")
    band = np.searchsorted([20.0, 100.0, 500.0], amount, side="right")
    return np.column_stack([amount, avg, amount / (avg + 1.0), band]).astype(np.float32)


def test_model_option_registers_an_existing_booster_and_serves_its_predictions(
    project: Path, home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(5)
    x = np.column_stack([rng.uniform(0, 900, 500), rng.uniform(10, 300, 500)])
    x = np.column_stack([x, x[:, 0] / (x[:, 1] + 1), np.searchsorted([20, 100, 500], x[:, 0])])
    booster = xgboost.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1},
        xgboost.DMatrix(x, label=(x[:, 2] > 2).astype(int), feature_names=MINE),
        num_boost_round=20,
    )
    file = tmp_path / "mine.ubj"
    booster.save_model(file)

    run = train(project, home, "--model", file, "--threshold", "0.4")

    assert run.returncode == 0, run.stderr
    meta = LocalRegistry(home / "models").resolve(NAME, "champion")
    assert list(meta.features) == MINE
    assert meta.threshold == 0.4
    events = pd.read_csv(project / "data" / "events.csv")
    output = tmp_path / "scores.parquet"
    code, _, err = cli(
        capsys, "predict", "--spec", project / f"{NAME}.yaml", "--home", home,
        "--input", project / "data" / "events.csv", "--output", output,
    )  # fmt: skip
    assert code == 0, err
    scored = pd.read_parquet(output)
    expected = booster.inplace_predict(expected_features(project, events))
    assert np.array_equal(scored["score"].to_numpy(), np.asarray(expected, dtype=np.float64))
    assert scored["label"].tolist() == (expected >= 0.4).tolist()
    assert 0 < scored["label"].sum() < len(scored)


def _unknown_feature(path: Path) -> None:
    names = ["amount", "nope"]
    xgboost.train(
        {"objective": "binary:logistic"},
        xgboost.DMatrix(np.ones((4, 2)), label=[0, 1, 0, 1], feature_names=names),
        num_boost_round=2,
    ).save_model(path)


def _no_feature_names(path: Path) -> None:
    xgboost.train(
        {"objective": "binary:logistic"},
        xgboost.DMatrix(np.ones((4, 2)), label=[0, 1, 0, 1]),
        num_boost_round=2,
    ).save_model(path)


BAD_MODELS = {
    "a feature the pipeline lacks": ("model.ubj", _unknown_feature, ["'nope'", "amount_band"]),
    "no feature names": ("model.json", _no_feature_names, ["no feature names", "amount_band"]),
    "a pickle": ("model.pkl", lambda p: p.write_bytes(b"\x80\x04."), ["pickles are refused"]),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_model_option_refuses_a_booster_the_pipeline_cannot_serve(
    project: Path, home: Path, tmp_path: Path, case: str
) -> None:
    filename, write, fragments = BAD_MODELS[case]
    file = tmp_path / filename
    write(file)

    run = train(project, home, "--model", file)

    assert run.returncode == 1
    assert run.stderr.startswith("train.py: error: ")
    assert run.stderr.count("\n") == 1
    assert all(f in run.stderr for f in fragments), run.stderr
    assert not (home / "models" / NAME).exists()


def test_init_refuses_a_folder_that_exists(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = project / f"{NAME}.yaml"
    spec.write_text("# edited by the user\n")

    code, out, err = cli(capsys, "init", NAME, "--dir", project.parent)

    assert code == 1
    assert err.startswith("stageline: error: ")
    assert err.count("\n") == 1
    assert "already exists" in err
    assert str(project) in err
    assert out == ""
    assert spec.read_text() == "# edited by the user\n"


@pytest.mark.parametrize("name", ["my model", "a/b", "../up", "Shop", "1st", "_x", "x" * 65])
def test_init_refuses_a_name_that_is_not_a_plain_lowercase_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    code, _, err = cli(capsys, "init", name, "--dir", tmp_path)

    assert code == 1
    assert err.startswith("stageline: error: bad project name")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_init_help_says_what_it_creates(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["init", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith("usage: stageline init")
    assert all(m in out for m in ("NAME", "--dir", "labelled", "overwritten"))
