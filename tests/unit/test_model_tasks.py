"""XGBoostPredictor beyond binary: a regression and a multiclass model, registered with
their task, served through a pipeline whose spec declares their outputs; and the task
checks that keep a model of one task out of a pipeline built for another."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost

from stageline import Pipeline
from stageline.registry import LocalRegistry, ModelIntegrityError, RegistryError
from stageline.stages.model import ModelTaskError, XGBoostPredictor

FEATURES = ["x1", "x2", "x3"]
CLASSES = ["low", "mid", "high"]

SPEC = """\
name: tasks
request:
  id_field: ref
  fields:
    ref: {{type: str}}
    x1: {{type: float, le: 100}}
    x2: {{type: float}}
    x3: {{type: float}}
stages:
  - name: model
    uses: stageline.stages.model:XGBoostPredictor
    params: {params}
outputs: {outputs}
"""


def _rows(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    features = dict(zip(FEATURES, x.T, strict=True))
    return pd.DataFrame({"ref": [f"r{i}" for i in range(n)], **features})


def _train(objective: str, **params: Any) -> xgboost.Booster:
    x = _rows(300, seed=0)[FEATURES].to_numpy()
    if objective.startswith("multi:"):
        y: np.ndarray = np.digitize(x[:, 0] + 0.5 * x[:, 1], [-0.5, 0.5])  # 0, 1, 2
        params["num_class"] = 3
    elif objective in ("binary:logistic", "reg:logistic"):
        y = (x[:, 0] > 0).astype(int)
    else:
        y = 3 * x[:, 0] - x[:, 2] + 10
    return xgboost.train(
        {"objective": objective, "max_depth": 2, "nthread": 1, "seed": 0, **params},
        xgboost.DMatrix(x, label=y, feature_names=FEATURES),
        num_boost_round=8,
    )


def _matrix(rows: pd.DataFrame) -> np.ndarray:
    """The features as XGBoostPredictor feeds them: float32, in training order."""
    return rows[FEATURES].to_numpy(dtype=np.float32)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def registry(home: Path) -> LocalRegistry:
    return LocalRegistry(home / "models")


def _pipeline(tmp_path: Path, home: Path, params: dict[str, Any], outputs: list[Any]) -> Pipeline:
    path = tmp_path / "tasks.yaml"
    path.write_text(SPEC.format(params=json.dumps(params), outputs=json.dumps(outputs)))
    return Pipeline.from_spec(path, home=home)


# -- serving each task -------------------------------------------------------------------


def test_regression_answers_the_boosters_prediction_and_its_reasons(
    tmp_path: Path, home: Path, registry: LocalRegistry
) -> None:
    booster = _train("reg:squarederror")
    meta = registry.register(
        "eta", booster, features=FEATURES, metrics={"rmse": 0.4}, aliases=["champion"]
    )
    params = {"model": "eta", "task": "regression", "output": "eta", "reasons": 2}
    outputs = [{"name": "eta", "type": "float"}, {"name": "eta_reasons", "type": "str_list"}]
    pipe = _pipeline(tmp_path, home, {**params, "model_identity": True}, outputs)

    rows = _rows(40, seed=1)
    scored = pipe(rows)
    predicted = pipe.predict(rows)

    assert (meta.task, meta.threshold, meta.classes) == ("regression", None, None)
    expected = booster.inplace_predict(_matrix(rows), validate_features=False)
    assert np.array_equal(predicted["eta"].to_numpy(), np.asarray(expected, dtype=np.float64))
    assert "eta_threshold" not in scored
    assert "label" not in predicted
    contribs = booster.predict(
        xgboost.DMatrix(_matrix(rows), feature_names=FEATURES),
        pred_contribs=True,
        approx_contribs=True,
    )[:, :-1]
    top = [FEATURES[i] for i in contribs.argmax(axis=1)]
    assert [r[0] for r in predicted["eta_reasons"]] == top
    assert all(len(r) == 2 for r in predicted["eta_reasons"])
    # model_identity: the answer says which model, with no Decision stage.
    assert set(predicted["model_name"]) == {"eta"}
    assert set(predicted["model_version"]) == {meta.version}


@pytest.mark.parametrize("objective", ["multi:softprob", "multi:softmax"])
def test_multiclass_answers_each_class_probability_and_the_most_probable(
    tmp_path: Path, home: Path, registry: LocalRegistry, objective: str
) -> None:
    booster = _train(objective)
    meta = registry.register(
        "tier", booster, features=FEATURES, classes=CLASSES, aliases=["champion"]
    )
    probabilities = [{"name": f"tier_p_{c}", "type": "float"} for c in CLASSES]
    outputs = [{"name": "tier_class", "type": "str"}, *probabilities]
    params = {"model": "tier", "task": "multiclass", "output": "tier", "reasons": 3}
    pipe = _pipeline(
        tmp_path, home, params, [*outputs, {"name": "tier_reasons", "type": "str_list"}]
    )

    rows = _rows(60, seed=2)
    rows.loc[5, "x1"] = 1000.0  # over the schema's bound: rejected, the others scored
    scored = pipe(rows)
    predicted = pipe.predict(rows)

    assert (meta.task, meta.threshold, meta.classes) == ("multiclass", None, tuple(CLASSES))
    good = predicted["error"].isna().to_numpy()
    assert good.tolist() == [i != 5 for i in range(len(rows))]
    p = predicted[[f"tier_p_{c}" for c in CLASSES]].to_numpy(dtype=np.float64)
    assert np.allclose(p[good].sum(axis=1), 1.0, atol=1e-12)
    assert np.isnan(p[~good]).all()
    assert predicted["tier_class"][~good].isna().all()
    best = p[good].argmax(axis=1)
    assert predicted["tier_class"][good].tolist() == [CLASSES[i] for i in best]
    assert np.allclose(scored["tier"][good], p[good].max(axis=1))
    raw = booster.predict(xgboost.DMatrix(_matrix(rows[good]), feature_names=FEATURES))
    if objective == "multi:softprob":
        assert np.allclose(p[good], raw, atol=1e-6)
    else:  # multi:softmax predicts only the class: ours is the same one
        assert best.tolist() == raw.astype(int).tolist()
    assert len(set(predicted["tier_class"][good])) > 1  # the classes are actually told apart
    contribs = booster.predict(
        xgboost.DMatrix(_matrix(rows[good]), feature_names=FEATURES),
        pred_contribs=True,
        approx_contribs=True,
    )[np.arange(good.sum()), best, :-1]
    top = [FEATURES[i] for i in contribs.argmax(axis=1)]
    assert [r[0] for r in predicted["tier_reasons"][good]] == top
    assert predicted["model_name"].isna().all()  # no model_identity, no Decision: unsaid


def test_the_stage_reports_the_task_it_serves(home: Path, registry: LocalRegistry) -> None:
    registry.register("tier", _train("multi:softprob"), features=FEATURES, aliases=["champion"])
    stage = XGBoostPredictor(model="tier", task="multiclass", context=_context(home))

    status = stage.status()

    assert status.model is not None
    assert status.model.threshold is None
    assert status.details == {"task": "multiclass", "classes": ["0", "1", "2"]}
    assert stage.provided_columns()[:5] == (
        "score",
        "score_class",
        "score_p_0",
        "score_p_1",
        "score_p_2",
    )


# -- registering: the task, the threshold, the classes -----------------------------------


def test_the_task_is_read_from_the_objective(registry: LocalRegistry) -> None:
    tasks = {
        objective: registry.register(objective[:3], _train(objective), features=FEATURES).task
        for objective in ("binary:logistic", "reg:squarederror", "multi:softprob")
    }
    assert tasks == {
        "binary:logistic": "binary",
        "reg:squarederror": "regression",
        "multi:softprob": "multiclass",
    }
    assert registry.resolve("bin", 1).threshold == 0.5  # a binary model's default


@pytest.mark.parametrize(
    ("objective", "kwargs", "says"),
    [
        pytest.param(
            "binary:logistic", {"threshold": None}, "a binary model needs a threshold",
            id="binary-without-threshold",
        ),
        pytest.param(
            "reg:squarederror", {"threshold": 0.5}, "drop threshold=0.5", id="regression-threshold"
        ),
        pytest.param(
            "binary:logistic", {"task": "multiclass"},
            "task='multiclass' but the booster was trained with objective 'binary:logistic'",
            id="task-against-objective",
        ),
        pytest.param(
            "reg:logistic", {}, "say which with task='binary' or task='regression'",
            id="ambiguous-objective",
        ),
        pytest.param(
            "multi:softprob", {"classes": ["a", "b"]}, "3 classes but 2 class names",
            id="class-count",
        ),
        pytest.param(
            "multi:softprob", {"classes": ["low", "mid", "very high"]},
            "are not letters, digits and '_'", id="class-name",
        ),
        pytest.param(
            "reg:squarederror", {"classes": ["a", "b"]}, "only a multiclass model has class names",
            id="classes-for-regression",
        ),
        pytest.param(
            "reg:quantileerror", {"quantile_alpha": [0.1, 0.9]}, "predicts 2 targets",
            id="several-quantiles",
        ),
    ],
)  # fmt: skip
def test_register_refuses_what_does_not_fit_the_task(
    registry: LocalRegistry, objective: str, kwargs: dict[str, Any], says: str
) -> None:
    training = {k: v for k, v in kwargs.items() if k == "quantile_alpha"}
    registering = {k: v for k, v in kwargs.items() if k not in training}
    with pytest.raises(RegistryError, match="register\\('m'\\)") as raised:
        registry.register("m", _train(objective, **training), features=FEATURES, **registering)
    assert says in str(raised.value)
    assert registry.models() == []  # nothing half-registered


def test_register_regression_with_threshold_none(registry: LocalRegistry) -> None:
    meta = registry.register("eta", _train("reg:squarederror"), features=FEATURES, threshold=None)
    assert (meta.task, meta.threshold) == ("regression", None)


# -- a model of another task is refused, at load and at reload ---------------------------


def _context(home: Path) -> Any:
    from stageline.context import StageContext
    from stageline.spec import load_spec

    spec = home.parent / "tasks.yaml"
    params = {"model": "m"}
    spec.write_text(
        SPEC.format(params=json.dumps(params), outputs='[{"name": "score", "type": "float"}]')
    )
    return StageContext(stage_name="model", spec=load_spec(spec), home=home)


def test_a_model_of_another_task_is_refused_at_load(home: Path, registry: LocalRegistry) -> None:
    registry.register("eta", _train("reg:squarederror"), features=FEATURES, aliases=["champion"])

    with pytest.raises(ModelTaskError) as raised:
        XGBoostPredictor(model="eta", context=_context(home))  # task: binary, the default

    message = str(raised.value)
    assert "expects a binary model" in message
    assert "eta v1 (eta@champion) is registered as regression" in message
    assert "set `task: regression`" in message


def test_a_reload_to_a_model_of_another_task_keeps_serving(
    home: Path, registry: LocalRegistry
) -> None:
    first = _train("reg:squarederror")
    registry.register("eta", first, features=FEATURES, aliases=["champion"])
    registry.register("eta", _train("binary:logistic"), features=FEATURES, aliases=["next"])
    stage = XGBoostPredictor(model="eta", task="regression", context=_context(home))
    rows = _rows(5, seed=3)

    stage.reconfigure({"alias": "next"})

    assert stage.describe() == "eta v1"
    assert stage.load_error is not None
    assert "expects a regression model" in stage.load_error
    assert "registered as binary" in stage.load_error
    expected = first.inplace_predict(_matrix(rows), validate_features=False)
    assert np.array_equal(stage(rows)["score"].to_numpy(), expected.astype(np.float64))


def test_a_reload_that_changes_the_classes_keeps_serving(
    home: Path, registry: LocalRegistry
) -> None:
    booster = _train("multi:softprob")
    registry.register("tier", booster, features=FEATURES, classes=CLASSES, aliases=["champion"])
    registry.register("tier", booster, features=FEATURES, classes=["a", "b", "c"])
    stage = XGBoostPredictor(model="tier", task="multiclass", context=_context(home))

    stage.reconfigure({"version": 2})

    assert stage.describe() == "tier v1"
    assert "has classes ('a', 'b', 'c')" in (stage.load_error or "")


# -- metadata on disk --------------------------------------------------------------------


def _edit_metadata(registry: LocalRegistry, name: str, **changes: Any) -> None:
    path = registry.root / name / "1" / "metadata.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


def test_metadata_from_before_tasks_reads_as_binary(registry: LocalRegistry) -> None:
    registry.register("fraud", _train("binary:logistic"), features=FEATURES, threshold=0.3)
    _edit_metadata(registry, "fraud", task=None, classes=None)

    loaded = registry.load("fraud", 1)
    _edit_metadata(registry, "fraud", threshold=None)  # a hand-written one may leave it out

    assert (loaded.metadata.task, loaded.metadata.threshold) == ("binary", 0.3)
    assert registry.resolve("fraud", 1).threshold == 0.5


def test_metadata_whose_task_the_booster_contradicts_is_refused(registry: LocalRegistry) -> None:
    registry.register("fraud", _train("binary:logistic"), features=FEATURES)
    _edit_metadata(registry, "fraud", task="regression", threshold=None)

    with pytest.raises(ModelIntegrityError, match="is a binary:logistic model") as raised:
        registry.load("fraud", 1)
    assert "records a regression model" in str(raised.value)


def test_metrics_summary_shows_any_metrics_in_the_order_recorded(registry: LocalRegistry) -> None:
    metrics = {"rmse": 0.41234, "mae": 0.3, "r2": 0.9, "mape": 0.05}
    meta = registry.register("eta", _train("reg:squarederror"), features=FEATURES, metrics=metrics)
    bare = registry.register("eta", _train("reg:squarederror"), features=FEATURES)

    assert meta.metrics_summary() == "rmse 0.412, mae 0.3, r2 0.9 (+1)"
    assert bare.metrics_summary() == "-"
