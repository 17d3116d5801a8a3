"""Outputs declared by the spec: a pipeline that does not end in ``Decision`` answers
with its own fields on every path (in process, HTTP, OIP, the batch schema)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from stageline.outputs import OutputContract
from stageline.pipeline import Pipeline
from stageline.registry import LocalRegistry
from stageline.spec import PipelineSpec, SpecError, load_spec
from stageline.stage import StageError
from tests.conftest import FRAUD_SPEC, GOOD_RECORD
from tests.unit.test_router import call

MINUTES = '''
import pandas as pd
from stageline import BaseStage

class Minutes(BaseStage):
    """A regression-style last stage: minutes from the model's score, and a band."""
    requires = ("score",)
    provides = ("minutes", "band")

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        out["minutes"] = batch["score"] * 60.0
        out["band"] = ["slow" if m > 30 else "fast" for m in out["minutes"]]
        return out
'''

OUTPUTS = [
    {"name": "minutes", "type": "float", "description": "Minutes to deliver."},
    {"name": "band", "type": "str"},
]


def own_spec(folder: Path, outputs: list[dict[str, Any]] | None) -> PipelineSpec:
    """The demo's stages, with a last stage of the user's own (given by file path) in
    place of ``Decision``, and ``outputs`` declared (or not)."""
    (folder / "minutes.py").write_text(MINUTES)
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    data["stages"][-1] = {"name": "minutes", "uses": "minutes.py:Minutes"}
    data["serve"]["inline"] = [s["name"] for s in data["stages"]]
    data["serve"]["graph"]["fuse"] = [["features", "transform"], ["model", "minutes"]]
    if outputs is not None:
        data["outputs"] = outputs
    path = folder / "eta.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(path)


def test_declared_outputs_are_the_answer_on_every_path(tmp_path: Path, demo_home: Path) -> None:
    spec = own_spec(tmp_path, OUTPUTS)
    frame = Pipeline(spec, demo_home).predict(pd.DataFrame([GOOD_RECORD]))
    assert list(frame.columns) == ["transaction_id", "minutes", "band", "model_name",
                                   "model_version", "error"]  # fmt: skip
    answer = call(spec, demo_home, "POST", "/predict", {"records": [GOOD_RECORD]}).json()
    [item] = answer["predictions"]
    assert set(item) == {"transaction_id", "minutes", "band"}, item
    assert item["minutes"] == pytest.approx(float(frame["minutes"].iloc[0]))
    assert answer["model"] is None  # no stage of this pipeline names the model
    meta = call(spec, demo_home, "GET", f"/v2/models/{spec.name}").json()
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        ("transaction_id", "BYTES"), ("minutes", "FP64"), ("band", "BYTES"),
    ]  # fmt: skip
    schema = OutputContract(spec).arrow_schema()
    assert [(f.name, str(f.type)) for f in schema][:3] == [
        ("transaction_id", "string"), ("minutes", "double"), ("band", "string"),
    ]  # fmt: skip


def test_without_declared_outputs_the_error_says_how_to_declare_them(tmp_path: Path) -> None:
    spec = own_spec(tmp_path, None)
    with pytest.raises(SpecError, match=r"declare what a prediction carries with `outputs:`"):
        OutputContract(spec)


def test_an_output_no_stage_provides_is_an_error_naming_it(tmp_path: Path, demo_home: Path) -> None:
    spec = own_spec(tmp_path, [*OUTPUTS, {"name": "eta_at", "type": "str"}])
    with pytest.raises(Exception, match=r"output\(s\) \['eta_at'\] that no stage provides"):
        Pipeline(spec, demo_home).predict(pd.DataFrame([GOOD_RECORD]))


def test_a_stage_after_the_declaring_one_passes_its_outputs_through(demo_home: Path) -> None:
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    data["stages"].append({"name": "audit", "uses": "stageline.stages.features:FeatureLookup",
                           "params": {"view": "customer_stats"}})  # fmt: skip
    data["serve"]["inline"] = [s["name"] for s in data["stages"]]
    spec = PipelineSpec.model_validate(data)
    assert [o.name for o in OutputContract(spec).outputs] == ["score", "label", "reasons"]


# -- outputs the stages cannot give: refused when the pipeline is built -----------------

PASSTHROUGH = '''
class Passthrough:
    """A plain class: it says nothing of the columns it adds."""

    def __init__(self, **params):
        pass

    def __call__(self, df):
        return df
'''


def regression_spec(folder: Path, outputs: list[dict[str, str]], *, plain: bool = False) -> Path:
    """A regression model stage (``task: regression``, as registered) declaring
    ``outputs``; with ``plain``, a plain class stage before it."""
    from tests.unit.test_model_tasks import FEATURES, SPEC, _train

    LocalRegistry(folder / "home" / "models").register(
        "eta", _train("reg:squarederror"), features=FEATURES, aliases=["champion"]
    )
    path = folder / "eta.yaml"
    model = {"model": "eta", "task": "regression"}
    path.write_text(SPEC.format(params=json.dumps(model), outputs=json.dumps(outputs)))
    if plain:
        (folder / "plain.py").write_text(PASSTHROUGH)
        data = yaml.safe_load(path.read_text())
        data["stages"].insert(0, {"name": "plain", "uses": "plain.py:Passthrough"})
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


BINARY = [{"name": "score", "type": "float"}, {"name": "label", "type": "bool"}]


def test_binary_outputs_over_a_regression_model_are_refused_at_build(tmp_path: Path) -> None:
    path = regression_spec(tmp_path, BINARY)

    with pytest.raises(SpecError) as raised:
        Pipeline.from_spec(path, home=tmp_path / "home")

    message = str(raised.value)
    assert "\n" not in message
    assert "pipeline 'tasks' declares output(s) ['label'] that no stage provides" in message
    assert "stage 'model': score, score_model, score_version" in message
    assert "the request: ref, x1, x2, x3" in message
    assert "`outputs:`" in message
    assert "`task`" in message


def test_outputs_the_model_stage_gives_pass_and_score(tmp_path: Path) -> None:
    path = regression_spec(tmp_path, [{"name": "score", "type": "float"}])
    pipe = Pipeline.from_spec(path, home=tmp_path / "home")

    frame = pipe.predict(pd.DataFrame({"ref": ["a"], "x1": [1.0], "x2": [0.0], "x3": [2.0]}))

    assert frame["error"].isna().all()
    assert frame["score"].notna().all()


def test_a_stage_that_declares_no_columns_leaves_it_to_the_request(tmp_path: Path) -> None:
    """A plain class may add any column: the build cannot judge, the request still says."""
    path = regression_spec(tmp_path, BINARY, plain=True)
    pipe = Pipeline.from_spec(path, home=tmp_path / "home")  # no error: cannot judge

    with pytest.raises(StageError, match=r"output\(s\) \['label'\] that no stage provides"):
        pipe.predict(pd.DataFrame({"ref": ["a"], "x1": [1.0], "x2": [0.0], "x3": [2.0]}))


def test_a_chain_of_some_stages_is_not_judged(tmp_path: Path) -> None:
    """One deployment of the graph placement: the other stages may give the outputs."""
    from stageline.pipeline import StageChain

    data = yaml.safe_load(regression_spec(tmp_path, BINARY).read_text())
    data["stages"].append({"name": "decide", "uses": "stageline.stages.postprocess:Decision"})
    spec = PipelineSpec.model_validate(data)

    chain = StageChain(spec, ["model"], tmp_path / "home", validate=True)

    assert [name for name, _ in chain] == ["validate", "model"]


def test_whole_number_outputs_stay_whole_beside_a_rejected_row(
    delivery_spec: PipelineSpec, delivery_world: Any
) -> None:
    """A rejected row's null must not turn an ``int`` output into ``35.0`` for the rows
    that were scored (in process, and so in every answer built from the same frame)."""
    from stageline.outputs import records

    rows = pd.read_parquet(delivery_world.holdout).head(3)
    rows.loc[1, "distance_km"] = -2.0
    answer = records(Pipeline(delivery_spec, delivery_world.home).predict(rows))

    assert [r["error"] is None for r in answer] == [True, False, True]
    for row in (answer[0], answer[2]):
        assert type(row["promise_minutes"]) is int
        assert row["promise_minutes"] % 5 == 0
        assert type(row["model_version"]) is int
    assert answer[1]["promise_minutes"] is None
    assert answer[1]["model_version"] is None
