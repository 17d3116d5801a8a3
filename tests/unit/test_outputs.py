"""Outputs declared by the spec: a pipeline that does not end in ``Decision`` answers
with its own fields on every path (in process, HTTP, OIP, the batch schema)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from stageline.outputs import OutputContract
from stageline.pipeline import Pipeline
from stageline.spec import PipelineSpec, SpecError, load_spec
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
