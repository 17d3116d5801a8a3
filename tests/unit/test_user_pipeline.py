"""Acceptance: a user's own pipeline. Their stage file next to their spec (one plain class,
one BaseStage), their own XGBoost model in a registry, their own request schema and no
feature store; then a two-model ensemble. Scores must equal calling the boosters directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost

from stageline import Pipeline
from stageline.registry import LocalRegistry

USER_STAGES = '''\
"""A user's stages: one plain class, one on stageline's BaseStage."""

import pandas as pd

from stageline import BaseStage


class DebtRatio:
    """Subclasses nothing: constructed with the spec's params, called on a DataFrame."""

    def __init__(self, **params):
        self.offset = params.get("offset", 0.0)

    def __call__(self, df):
        out = df.copy()
        out["debt_ratio"] = df["debt"] / (df["income"] + self.offset)
        return out


class Squared(BaseStage):
    def __init__(self, *, column, context):
        super().__init__(name=context.stage_name)
        self.column = column

    def required_columns(self):
        return (self.column,)

    def provided_columns(self):
        return (f"{self.column}_sq",)

    def process(self, batch):
        out = batch.copy()
        out[f"{self.column}_sq"] = batch[self.column].astype("float64") ** 2
        return out
'''

REQUEST = """\
request:
  id_field: applicant_id
  fields:
    applicant_id: {type: str}
    income: {type: float, gt: 0}
    debt: {type: float, ge: 0}
    age: {type: int, ge: 18, le: 120}
"""

CREDIT_SPEC = f"""\
name: credit
{REQUEST}
stages:
  - name: ratio
    uses: my_stages.py:DebtRatio
    params: {{offset: 1.0}}
  - name: square
    uses: my_stages.py:Squared
    params: {{column: age}}
  - name: model
    uses: stageline.stages.model:XGBoostPredictor
    params: {{model: credit}}
  - name: decide
    uses: stageline.stages.postprocess:Decision
"""

ENSEMBLE_SPEC = f"""\
name: two-step
{REQUEST}
stages:
  - name: first
    uses: stageline.stages.model:XGBoostPredictor
    params: {{model: first, output: score_a}}
  - name: second
    uses: stageline.stages.model:XGBoostPredictor
    params: {{model: second, output: score_b}}
  - name: decide
    uses: stageline.stages.postprocess:Decision
    params: {{score: score_b}}
"""

CREDIT_FEATURES = ["income", "debt_ratio", "age_sq"]
THRESHOLD = 0.3


def _applicants(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "applicant_id": [f"a-{seed}-{i}" for i in range(n)],
            "income": rng.uniform(1_000, 9_000, n).round(2),
            "debt": rng.uniform(0, 8_000, n).round(2),
            "age": rng.integers(18, 90, n),
        }
    )


def _train(features: np.ndarray, label: np.ndarray, names: list[str]) -> xgboost.Booster:
    return xgboost.train(
        {"objective": "binary:logistic", "max_depth": 3, "nthread": 1, "seed": 0},
        xgboost.DMatrix(features, label=label, feature_names=names),
        num_boost_round=15,
    )


def _predict(booster: xgboost.Booster, columns: list[Any]) -> np.ndarray:
    """The booster called directly, as XGBoostPredictor feeds it: float32 features."""
    matrix = np.column_stack(columns).astype(np.float32)
    return np.asarray(booster.inplace_predict(matrix, validate_features=False))


def _write_spec(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "my_stages.py").write_text(USER_STAGES)
    path = folder / "pipeline.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def test_users_own_stages_and_model_score_like_the_booster(tmp_path: Path, home: Path) -> None:
    train = _applicants(300, seed=1)
    ratio = train["debt"] / (train["income"] + 1.0)
    label = ((ratio > 0.8) | (train["age"] < 25)).to_numpy(dtype=int)
    columns = [train["income"], ratio, train["age"].astype(float) ** 2]
    booster = _train(np.column_stack(columns), label, CREDIT_FEATURES)
    meta = LocalRegistry(home / "models").register(
        "credit", booster, features=CREDIT_FEATURES, threshold=THRESHOLD, aliases=["champion"]
    )
    # The stage file resolves against the spec's folder, not the working directory.
    spec_path = _write_spec(tmp_path / "project", CREDIT_SPEC)

    pipe = Pipeline.from_spec(spec_path, home=home)
    rows = _applicants(200, seed=2)
    predicted = pipe.predict(rows)

    assert [name for name, _ in pipe] == ["validate", "ratio", "square", "model", "decide"]
    assert predicted["error"].isna().all()
    ratio = rows["debt"] / (rows["income"] + 1.0)
    expected = _predict(booster, [rows["income"], ratio, rows["age"].astype(float) ** 2])
    assert np.array_equal(predicted["score"].to_numpy(), expected.astype(np.float64))
    assert predicted["label"].tolist() == (expected >= THRESHOLD).tolist()
    assert 0 < predicted["label"].sum() < len(rows)  # the threshold actually splits them
    assert predicted["applicant_id"].tolist() == rows["applicant_id"].tolist()
    assert set(predicted["model_name"]) == {"credit"}
    assert set(predicted["model_version"]) == {meta.version}


def test_users_request_schema_rejects_bad_rows_and_scores_the_rest(
    tmp_path: Path, home: Path
) -> None:
    train = _applicants(300, seed=1)
    ratio = train["debt"] / (train["income"] + 1.0)
    columns = [train["income"], ratio, train["age"].astype(float) ** 2]
    booster = _train(np.column_stack(columns), (ratio > 0.8).to_numpy(dtype=int), CREDIT_FEATURES)
    LocalRegistry(home / "models").register(
        "credit", booster, features=CREDIT_FEATURES, aliases=["champion"]
    )
    pipe = Pipeline.from_spec(_write_spec(tmp_path / "project", CREDIT_SPEC), home=home)

    rows = _applicants(3, seed=3)
    rows.loc[1, "age"] = 12
    predicted = pipe.predict(rows)

    assert predicted["error"].tolist()[0] is None
    assert predicted["error"].tolist()[1] == "validate: age: must be >= 18 (got 12)"
    assert predicted["score"].notna().tolist() == [True, False, True]


def test_ensemble_second_model_reads_the_first_models_score(tmp_path: Path, home: Path) -> None:
    train = _applicants(300, seed=4)
    ratio = (train["debt"] / train["income"]).to_numpy()
    first = _train(
        np.column_stack([train["income"], train["debt"]]),
        (ratio > 0.8).astype(int),
        ["income", "debt"],
    )
    score_a = _predict(first, [train["income"], train["debt"]])
    second = _train(
        np.column_stack([score_a, train["age"]]),
        ((score_a > 0.5) & (train["age"].to_numpy() < 40)).astype(int),
        ["score_a", "age"],
    )
    registry = LocalRegistry(home / "models")
    registry.register("first", first, features=["income", "debt"], aliases=["champion"])
    registry.register(
        "second", second, features=["score_a", "age"], threshold=0.4, aliases=["champion"]
    )
    spec_path = tmp_path / "ensemble.yaml"
    spec_path.write_text(ENSEMBLE_SPEC)

    pipe = Pipeline.from_spec(spec_path, home=home)
    rows = _applicants(150, seed=5)
    frame = pipe(rows)
    predicted = pipe.predict(rows)

    expected_a = _predict(first, [rows["income"], rows["debt"]])
    expected_b = _predict(second, [expected_a, rows["age"]])
    assert np.array_equal(frame["score_a"].to_numpy(), expected_a.astype(np.float64))
    assert np.array_equal(predicted["score"].to_numpy(), expected_b.astype(np.float64))
    assert not np.array_equal(expected_a, expected_b)  # the decision used the second model
    assert predicted["label"].tolist() == (expected_b >= 0.4).tolist()
    assert set(predicted["model_name"]) == {"second"}
