"""Ensembles: the Combine stage's methods against hand-computed answers, its params
refused at load with what to change, rejected rows kept rejected, a record combined
alone as in a batch, and two model stages with a Combine in one pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost

from stageline import Pipeline
from stageline.context import StageContext
from stageline.demo.train import LITE_MODEL, LITE_TRAINING
from stageline.pipeline import build_stage
from stageline.registry import LocalRegistry
from stageline.spec import PipelineSpec, load_spec
from stageline.stage import ERROR_COLUMN, StageError, mark_errors
from stageline.stages.combine import Combine
from stageline_cli.main import main
from tests.conftest import ENSEMBLE_SPEC

REQUEST = {
    "id_field": "id",
    "fields": {"id": {"type": "str"}, "x": {"type": "float"}, "y": {"type": "float"}},
}
MODEL_STAGES: list[dict[str, Any]] = [
    {
        "name": "first",
        "uses": "stageline.stages.model:XGBoostPredictor",
        "params": {"model": "first", "output": "score_a"},
    },
    {
        "name": "second",
        "uses": "stageline.stages.model:XGBoostPredictor",
        "params": {"model": "second", "output": "score_b"},
    },
]

# Three rows, two models: a's threshold 0.5, b's 0.3.
SCORES = pd.DataFrame(
    {
        "id": ["r0", "r1", "r2"],
        "score_a": [0.2, 0.8, 0.6],
        "score_a_threshold": 0.5,
        "score_a_model": "first",
        "score_a_version": 1,
        "score_b": [0.4, 0.6, 0.1],
        "score_b_threshold": 0.3,
        "score_b_model": "second",
        "score_b_version": 1,
    }
)


def spec_with(
    params: dict[str, Any], model_stages: list[dict[str, Any]] = MODEL_STAGES
) -> PipelineSpec:
    combine = {"name": "combine", "uses": "stageline.stages.combine:Combine", "params": params}
    return PipelineSpec.model_validate(
        {"name": "ensemble", "request": REQUEST, "stages": [*model_stages, combine]}
    )


def combine(home: Path, **params: Any) -> Combine:
    spec = spec_with({"inputs": ["score_a", "score_b"], **params})
    return Combine(context=StageContext("combine", spec, home), **params_with_inputs(params))


def params_with_inputs(params: dict[str, Any]) -> dict[str, Any]:
    return {"inputs": ["score_a", "score_b"], **params}


def answer(stage: Combine, frame: pd.DataFrame = SCORES) -> tuple[list[float], list[bool]]:
    out = stage(frame.copy())
    return [round(float(s), 6) for s in out["score"]], [bool(v) for v in out["label"]]


# --------------------------------------------------------------------------- methods


def test_mean_averages_the_scores_and_the_thresholds(tmp_path: Path):
    scores, labels = answer(combine(tmp_path, method="mean"))
    # (0.2+0.4)/2, (0.8+0.6)/2, (0.6+0.1)/2 against (0.5+0.3)/2 = 0.4
    assert scores == [0.3, 0.7, 0.35]
    assert labels == [False, True, False]


def test_weighted_mean_uses_each_inputs_weight(tmp_path: Path):
    stage = combine(tmp_path, method="weighted", weights={"score_a": 3, "score_b": 1})
    scores, labels = answer(stage)
    # (3*0.2+0.4)/4, (3*0.8+0.6)/4, (3*0.6+0.1)/4 against (3*0.5+0.3)/4 = 0.45
    assert scores == [0.25, 0.75, 0.475]
    assert labels == [False, True, True]


def test_a_given_threshold_overrides_the_inputs_thresholds(tmp_path: Path):
    stage = combine(tmp_path, method="mean", threshold=0.32)
    out = stage(SCORES.copy())
    assert out["label"].tolist() == [False, True, True]
    assert out["score_threshold"].tolist() == [0.32] * 3


def test_vote_is_a_majority_of_each_inputs_label(tmp_path: Path):
    # a votes yes at >= 0.5: no, yes, yes; b at >= 0.3: yes, yes, no.
    scores, labels = answer(combine(tmp_path, method="vote"))
    assert scores == [0.5, 1.0, 0.5]
    assert labels == [False, True, False]  # one vote of two is no majority


def test_vote_with_weights_and_per_input_thresholds(tmp_path: Path):
    weighted = combine(tmp_path, method="vote", weights={"score_a": 2, "score_b": 1})
    assert answer(weighted) == ([0.333333, 1.0, 0.666667], [False, True, True])
    # b's threshold from the params instead of its model version's: b votes yes on none.
    strict = combine(tmp_path, method="vote", thresholds={"score_b": 0.9}, threshold=0.5)
    assert answer(strict) == ([0.0, 0.5, 0.5], [False, True, True])


REFERENCE_A = [0.0, 0.1, 0.2, 1.0]  # quantiles at 0, 1/3, 2/3, 1
REFERENCE_B = [0.0, 1.0]  # uniform: a score is its own rank


def test_rank_ranks_each_score_against_its_reference(tmp_path: Path):
    stage = combine(
        tmp_path, method="rank", reference={"score_a": REFERENCE_A, "score_b": REFERENCE_B}
    )
    scores, labels = answer(stage)
    # a: 0.2 -> 2/3, 0.8 -> 2/3 + (0.6/0.8)/3 = 11/12, 0.6 -> 2/3 + (0.4/0.8)/3 = 5/6
    expected = [(2 / 3 + 0.4) / 2, (11 / 12 + 0.6) / 2, (5 / 6 + 0.1) / 2]
    assert scores == [round(e, 6) for e in expected]
    # thresholds ranked alike: a's 0.5 -> 2/3 + (0.3/0.8)/3 = 19/24, b's 0.3 -> 0.3
    threshold = (19 / 24 + 0.3) / 2
    assert labels == [e >= threshold for e in expected] == [False, True, False]


def test_rank_of_ties_and_of_scores_outside_the_reference(tmp_path: Path):
    stage = combine(
        tmp_path,
        method="rank",
        reference={"score_a": [0.0, 0.0, 0.0, 0.5, 1.0], "score_b": REFERENCE_B},
        threshold=0.5,
    )
    frame = SCORES.assign(score_a=[0.0, -1.0, 2.0], score_b=[0.5, 0.5, 0.5])
    scores, _ = answer(stage, frame)
    # 0.0: three of the five quantiles are at or below it (probability 0.5); below the
    # lowest: 0; over the highest: 1.
    assert scores == [(0.5 + 0.5) / 2, (0.0 + 0.5) / 2, (1.0 + 0.5) / 2]


@pytest.mark.parametrize("method", ["mean", "weighted", "rank", "vote"])
def test_a_record_combined_alone_gets_what_it_gets_in_a_batch(tmp_path: Path, method: str):
    params: dict[str, Any] = {"method": method}
    if method in ("weighted", "vote"):
        params["weights"] = {"score_a": 0.7, "score_b": 0.3}
    if method == "rank":
        params["reference"] = {"score_a": REFERENCE_A, "score_b": REFERENCE_B}
    stage = combine(tmp_path, **params)
    rng = np.random.default_rng(3)
    frame = pd.DataFrame(
        {
            **{c: SCORES[c].iloc[0] for c in SCORES.columns},
            "score_a": rng.uniform(0, 1, 200),
            "score_b": rng.uniform(0, 1, 200),
        }
    )
    batch = stage(frame.copy())
    alone = pd.concat([stage(frame.iloc[[i]].reset_index(drop=True)) for i in range(0, 200, 7)])
    columns = ["score", "label", "score_threshold"]
    assert alone[columns].to_numpy().tolist() == batch[columns].iloc[::7].to_numpy().tolist()
    assert 0 < batch["label"].sum() < 200  # the threshold splits them


# --------------------------------------------------------------------------- rejected rows


def test_a_row_an_earlier_stage_rejected_stays_rejected(tmp_path: Path):
    frame = SCORES.copy()
    mark_errors(frame, np.array([False, True, False]), "first", "amount: not a finite number")
    out = combine(tmp_path, method="mean")(frame)
    assert out[ERROR_COLUMN].tolist() == [None, "first: amount: not a finite number", None]
    assert out["score"].isna().tolist() == [False, True, False]
    assert out["label"].isna().tolist() == [False, True, False]
    assert out["score"].iloc[2] == pytest.approx(0.35)


def test_a_row_without_an_input_score_is_rejected_naming_the_input(tmp_path: Path):
    frame = SCORES.assign(score_b=[0.4, np.nan, 0.1])
    out = combine(tmp_path, method="mean")(frame)
    errors = [e if isinstance(e, str) else None for e in out[ERROR_COLUMN]]
    assert errors == [None, "combine: score_b: no score to combine", None]
    assert out["score"].isna().tolist() == [False, True, False]
    assert out["label"].isna().tolist() == [False, True, False]


def test_the_models_behind_each_score_are_named(tmp_path: Path):
    out = combine(tmp_path, method="mean")(SCORES.assign(score_b_version=[1, 2, 2]))
    assert out["models"].tolist() == [
        ["first v1", "second v1"],
        ["first v1", "second v2"],
        ["first v1", "second v2"],
    ]
    assert out["model_name"].tolist() == ["first"] * 3  # the lead model: the first input
    assert out["model_version"].tolist() == [1] * 3


# --------------------------------------------------------------------------- params refused


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"method": "weighted"}, "method weighted needs weights, one per input"),
        ({"method": "mean", "weights": {"score_a": 1, "score_b": 1}}, "use method: weighted"),
        (
            {"method": "weighted", "weights": {"score_a": 1}},
            "weights must name every input exactly once",
        ),
        (
            {"method": "weighted", "weights": {"score_a": 1, "score_b": 1, "score_c": 1}},
            "weights must name every input exactly once",
        ),
        (
            {"method": "weighted", "weights": {"score_a": 1, "score_b": -1}},
            "weights must be positive numbers",
        ),
        ({"method": "weighted", "weights": {"score_a": 1, "score_b": 0}}, "positive"),
        ({"inputs": ["score_a"]}, "at least 2 items"),
        ({"inputs": ["score_a", "score_a"]}, "more than once"),
        ({"inputs": ["score", "score_b"]}, "give each model stage an output of its own"),
        ({"method": "median"}, "'mean', 'weighted', 'rank' or 'vote'"),
        ({"thresholds": {"score_c": 0.5}}, "thresholds names ['score_c'], which are not inputs"),
        ({"method": "rank", "reference": {"score_a": [0.3, 0.1]}}, "ascending"),
        ({"method": "mean", "reference": {"score_a": [0.1, 0.3]}}, "for method rank only"),
        ({"methd": "mean"}, "methd: Extra inputs are not permitted"),
    ],
)
def test_invalid_params_are_refused_at_load_saying_what_to_change(
    tmp_path: Path, params: dict[str, Any], message: str
):
    with pytest.raises(StageError, match="stage 'combine': invalid params") as caught:
        Combine(
            context=StageContext("combine", spec_with({}), tmp_path), **params_with_inputs(params)
        )
    assert message in str(caught.value)


def test_rank_without_a_reference_for_an_input_no_model_stage_gives_is_refused(tmp_path: Path):
    spec = spec_with({}, model_stages=[])
    with pytest.raises(StageError, match=r"no XGBoostPredictor stage .* has output 'score_a'"):
        Combine(
            context=StageContext("combine", spec, tmp_path),
            inputs=["score_a", "score_b"],
            method="rank",
        )


# --------------------------------------------------------------------------- with models


def _booster(seed: int, depth: int) -> xgboost.Booster:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (400, 2))
    y = ((x[:, 0] + rng.normal(0, 0.3, 400)) > 0.6).astype(int)
    return xgboost.train(
        {"objective": "binary:logistic", "max_depth": depth, "nthread": 1, "seed": seed},
        xgboost.DMatrix(x, label=y, feature_names=["x", "y"]),
        num_boost_round=10,
    )


def _register(home: Path, name: str, booster: xgboost.Booster, quantiles: list[float] | None):
    return LocalRegistry(home / "models").register(
        name,
        booster,
        features=["x", "y"],
        threshold=0.5,
        aliases=["champion"],
        profile={"score_quantiles": quantiles} if quantiles is not None else None,
    )


def _rows(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(5)
    return pd.DataFrame(
        {"id": [f"r{i}" for i in range(n)], "x": rng.uniform(0, 1, n), "y": rng.uniform(0, 1, n)}
    )


def test_two_model_stages_and_a_combine_score_like_the_boosters(tmp_path: Path):
    home = tmp_path / "home"
    first, second = _booster(1, 2), _booster(2, 4)
    _register(home, "first", first, [0.0, 1.0])
    _register(home, "second", second, [0.0, 0.5, 1.0])
    spec = spec_with({"method": "weighted", "inputs": ["score_a", "score_b"],
                      "weights": {"score_a": 1, "score_b": 3}})  # fmt: skip
    pipe = Pipeline(spec, home)
    rows = _rows(100)
    predicted = pipe.predict(rows)

    matrix = rows[["x", "y"]].to_numpy(dtype=np.float32)
    a = first.inplace_predict(matrix).astype(np.float64)
    b = second.inplace_predict(matrix).astype(np.float64)
    assert not np.allclose(a, b)  # two models, two opinions
    assert np.allclose(predicted["score"], (a + 3 * b) / 4, rtol=0, atol=1e-12)
    assert predicted["label"].tolist() == ((a + 3 * b) / 4 >= 0.5).tolist()
    assert set(map(tuple, predicted["models"])) == {("first v1", "second v1")}
    assert set(predicted["model_name"]) == {"first"}  # the lead model answers as `model`
    assert predicted["error"].isna().all()


def test_a_row_a_model_stage_rejected_stays_rejected_through_the_combine(tmp_path: Path):
    home = tmp_path / "home"
    _register(home, "first", _booster(1, 2), [0.0, 1.0])
    _register(home, "second", _booster(2, 4), [0.0, 1.0])
    spec = spec_with({"method": "rank", "inputs": ["score_a", "score_b"]})
    rows = _rows(4)
    rows.loc[2, "x"] = 1e39  # too large for the models' float32: the first model refuses it

    predicted = Pipeline(spec, home).predict(rows)

    assert predicted["error"].tolist() == [None, None, "first: x: not a finite number", None]
    assert predicted["score"].isna().tolist() == [False, False, True, False]
    assert predicted["label"].isna().tolist() == [False, False, True, False]


def test_rank_reads_each_model_versions_reference_from_the_registry(tmp_path: Path):
    home = tmp_path / "home"
    _register(home, "first", _booster(1, 2), [0.0, 1.0])
    _register(home, "second", _booster(2, 4), [0.0, 0.5, 1.0])
    _register(home, "second", _booster(2, 4), [0.0, 0.25, 1.0])  # v2, not served
    spec = spec_with({"method": "rank", "inputs": ["score_a", "score_b"]})
    stage = build_stage(spec, spec.stage("combine"), home)
    # v1 ranks 0.25 at 0.25; v2, at 0.5: a row scored by v2 (after a reload) ranks as v2.
    frame = SCORES.assign(score_a=0.5, score_b=0.25, score_b_version=[1, 2, 1])
    out = stage(frame)
    assert out["score"].tolist() == [(0.5 + 0.25) / 2, (0.5 + 0.5) / 2, (0.5 + 0.25) / 2]


def test_rank_refuses_at_load_a_model_registered_without_reference_scores(tmp_path: Path):
    home = tmp_path / "home"
    _register(home, "first", _booster(1, 2), [0.0, 1.0])
    _register(home, "second", _booster(2, 4), None)
    spec = spec_with({"method": "rank", "inputs": ["score_a", "score_b"]})
    with pytest.raises(StageError, match=r"second v1's reference scores.*stageline train"):
        Pipeline(spec, home)


def test_two_model_stages_writing_the_same_columns_are_refused_at_load(tmp_path: Path):
    home = tmp_path / "home"
    _register(home, "first", _booster(1, 2), None)
    _register(home, "second", _booster(2, 4), None)
    same = [{**s, "params": {"model": s["params"]["model"]}} for s in MODEL_STAGES]
    spec = PipelineSpec.model_validate({"name": "clash", "request": REQUEST, "stages": same})
    with pytest.raises(StageError, match="give each model stage an output of its own"):
        Pipeline(spec, home)


# --------------------------------------------------------------------------- the example


def test_the_example_ensemble_trains_its_second_model_on_first_use_and_scores(
    demo_copy: Path,
    fraud_pipeline: Pipeline,
    holdout: pd.DataFrame,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
):
    fields = list(fraud_pipeline.spec.request.fields)
    source, out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    holdout[fields].head(500).to_parquet(source)
    argv = ["predict", "--spec", str(ENSEMBLE_SPEC), "--home", str(demo_copy)]
    argv += ["--input", str(source), "--output", str(out)]

    assert main(argv) == 0
    assert "training the ensemble's second model, fraud_lite" in capsys.readouterr().err
    lite = LocalRegistry(demo_copy / "models").resolve(LITE_MODEL, "champion")
    assert tuple(lite.features) == LITE_TRAINING.features
    predicted = pd.read_parquet(out)
    declared = [o.name for o in load_spec(ENSEMBLE_SPEC).outputs or ()]
    assert declared == [
        "score",
        "label",
        "models",
        "score_main",
        "score_lite",
        "score_main_reasons",
    ]
    assert set(declared) <= set(predicted.columns)
    assert predicted["error"].isna().all()
    assert {tuple(m) for m in predicted["models"]} == {("fraud v1", "fraud_lite v1")}
    # The champion scores in the ensemble exactly as it does alone (fraud.yaml).
    alone = fraud_pipeline.predict(holdout[fields].head(500))
    assert predicted["score_main"].tolist() == alone["score"].tolist()
    assert predicted["score_lite"].tolist() != predicted["score_main"].tolist()
    assert predicted["score"].between(0, 1).all()
    assert 0 < predicted["label"].sum() < 500

    assert main(argv) == 0  # its second model is there now: used, not trained again
    assert "training" not in capsys.readouterr().err
    assert [m.version for m in LocalRegistry(demo_copy / "models").versions(LITE_MODEL)] == [1]
