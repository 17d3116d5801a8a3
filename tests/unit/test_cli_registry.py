"""``stageline registry register``: a user's own trained XGBoost file, registered without
writing Python, listed with its task and metrics, and scored exactly as the booster does."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import xgboost

from stageline import Pipeline
from stageline.registry import LocalRegistry
from stageline_cli import main
from tests.unit.test_model_tasks import CLASSES, FEATURES, SPEC, _matrix, _rows, _train


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def register(
    capsys: pytest.CaptureFixture[str], home: Path, *argv: str | Path
) -> tuple[int, str, str]:
    return cli(capsys, "registry", "register", *argv, "--home", home)


def saved(booster: xgboost.Booster, path: Path, *, names: bool = True) -> Path:
    """``booster`` saved at ``path`` as a user saves one: with its feature names, or as a
    booster trained on a plain array (none)."""
    if not names:
        booster = booster.copy()
        booster.feature_names = None
    booster.save_model(path)
    return path


def scored(tmp_path: Path, home: Path, params: dict[str, Any], outputs: list[Any]) -> pd.DataFrame:
    """What a pipeline whose one stage serves the registered model answers for the rows
    of seed 7."""
    spec = tmp_path / "tasks.yaml"
    spec.write_text(SPEC.format(params=json.dumps(params), outputs=json.dumps(outputs)))
    return Pipeline.from_spec(spec, home=home).predict(_rows(50, seed=7))


# -- registering and serving a user's file --------------------------------------------------

CASES = {
    "binary-ubj-named": (
        "binary:logistic", "model.ubj", True, ["--metric", "auc=0.91", "--metric", "logloss=0.3"],
        "auc 0.91, logloss 0.3",
    ),
    "regression-json-unnamed": (
        "reg:squarederror", "model.json", False,
        ["--features", ",".join(FEATURES), "--metric", "rmse=0.412"], "rmse 0.412",
    ),
    "multiclass-ubj": (
        "multi:softprob", "model.ubj", True, ["--classes", ",".join(CLASSES)], "-",
    ),
}  # fmt: skip
TASK_OF = {"binary:logistic": "binary", "reg:squarederror": "regression",
           "multi:softprob": "multiclass"}  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_registered_file_is_listed_and_scores_as_the_booster_does(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    objective, file_name, names, options, metrics = CASES[case]
    booster = _train(objective)
    home = tmp_path / "home"
    path = saved(booster, tmp_path / file_name, names=names)

    code, out, err = register(capsys, home, "m", path, *options, "--alias", "champion")

    assert (code, err) == (0, "")
    task = TASK_OF[objective]
    meta = LocalRegistry(home / "models").resolve("m")
    assert (meta.version, meta.task, meta.features) == (1, task, tuple(FEATURES))
    headline, digest = out.splitlines()
    assert headline.startswith(f"registered m v1: {task}")
    assert headline.endswith("3 features, alias champion")
    assert digest == f"sha256 {meta.sha256}"

    code, out, _ = cli(capsys, "registry", "list", "--home", home)
    header, row = out.splitlines()
    assert header.split()[:5] == ["MODEL", "VERSION", "ALIASES", "TASK", "METRICS"]
    assert row.split()[:4] == ["m", "1", "champion", task]
    assert f"  {metrics}  " in row

    rows, params = _rows(50, seed=7), {"model": "m", "task": task}
    if task == "multiclass":
        probabilities = [f"score_p_{c}" for c in CLASSES]
        outputs = [{"name": "score_class", "type": "str"}]
        outputs += [{"name": p, "type": "float"} for p in probabilities]
        frame = scored(tmp_path, home, params, outputs)
        expected = booster.predict(xgboost.DMatrix(_matrix(rows), feature_names=FEATURES))
        assert np.allclose(frame[probabilities].to_numpy(dtype=np.float64), expected, atol=1e-6)
    else:
        frame = scored(tmp_path, home, params, [{"name": "score", "type": "float"}])
        expected = booster.inplace_predict(_matrix(rows), validate_features=False)
        assert np.array_equal(frame["score"].to_numpy(), expected.astype(np.float64))


def test_a_second_register_is_the_next_version_with_the_options_given(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    path = saved(_train("binary:logistic"), tmp_path / "model.ubj")
    register(capsys, home, "credit", path, "--alias", "champion")

    code, out, _ = register(
        capsys, home, "credit", path, "--threshold", "0.3", "--alias", "challenger",
        "--description", "retrained in June",
    )  # fmt: skip

    assert code == 0
    assert out.splitlines()[0] == (
        "registered credit v2: binary (threshold 0.3), 3 features, alias challenger"
    )
    registry = LocalRegistry(tmp_path / "home" / "models")
    assert registry.aliases("credit") == {"challenger": 2, "champion": 1}
    meta = registry.resolve("credit", 2)
    assert (meta.threshold, meta.description) == (0.3, "retrained in June")


# -- what a user gets wrong: one line each, nothing registered -----------------------------


def _pickle(tmp_path: Path) -> Path:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps(_train("binary:logistic")))
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "model.ubj"
    path.write_text("not a model\n")
    return path


def _unnamed(tmp_path: Path) -> Path:
    return saved(_train("binary:logistic"), tmp_path / "model.ubj", names=False)


def _ambiguous(tmp_path: Path) -> Path:
    return saved(_train("reg:logistic"), tmp_path / "model.json")


def _broken_json(tmp_path: Path) -> Path:
    path = tmp_path / "model.json"
    path.write_text('{"learner": ')
    return path


ERRORS = {
    "pickle": (_pickle, [], ["model.pkl is a Python pickle", "never loads pickle",
                             'save_model("model.ubj")']),
    "not a model": (_text, [], ["is not an XGBoost model in its JSON or UBJSON format"]),
    "cut short": (_broken_json, [], ["XGBoost cannot load", "model.json"]),
    "missing file": (lambda p: p / "nope.ubj", [], ["cannot read the model file", "nope.ubj"]),
    "no feature names": (_unnamed, [], ["carries no feature names", "--features a,b,c"]),
    "features that differ": (
        lambda p: saved(_train("binary:logistic"), p / "model.ubj"), ["--features", "x1,x2"],
        ["trained on features ['x1', 'x2', 'x3']"],
    ),
    "ambiguous objective": (_ambiguous, [], ["objective 'reg:logistic'",
                                             "--task binary or --task regression"]),
    "threshold of a regression": (
        lambda p: saved(_train("reg:squarederror"), p / "model.ubj"), ["--threshold", "0.5"],
        ["a regression model has no threshold"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_a_bad_file_or_option_is_one_line_and_registers_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, case: str
) -> None:
    make, options, fragments = ERRORS[case]
    home = tmp_path / "home"

    code, out, err = register(capsys, home, "m", make(tmp_path), *options)

    assert (code, out) == (1, "")
    assert err.startswith("stageline: error: ")
    assert err.count("\n") == 1, err
    missing = [f for f in fragments if f not in err]
    assert not missing, f"{err!r} does not mention {missing}"
    assert LocalRegistry(home / "models").models() == []


def test_a_metric_not_written_name_equals_value_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = saved(_train("binary:logistic"), tmp_path / "model.ubj")
    with pytest.raises(SystemExit) as exit_:
        register(capsys, tmp_path / "home", "m", path, "--metric", "auc")
    assert exit_.value.code == 2
    assert "write a metric as NAME=VALUE, e.g. auc=0.91" in capsys.readouterr().err


# -- the empty registry, and help ----------------------------------------------------------


def test_an_empty_registry_says_how_to_register_a_model_or_build_the_demo(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, _ = cli(capsys, "registry", "list", "--home", tmp_path)
    assert code == 0
    assert f"no models registered under {tmp_path / 'models'}" in out
    assert "stageline registry register NAME MODEL_FILE" in out
    assert "stageline demo" in out


def test_register_help_names_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["registry", "register", "--help"])
    out = capsys.readouterr().out
    wanted = ["--features", "--task", "--threshold", "--classes", "--metric", "--alias",
              "--description", "--home", ".ubj", "pickle"]  # fmt: skip
    assert not [w for w in wanted if w not in out]
