"""The example record ``stageline serve`` prints as a curl: one for any spec, made from its
request schema, that the spec's own checks accept online and in batch."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from stageline.demo.world import example_record as demo_example
from stageline.examples import EXAMPLE_ID, example_record
from stageline.spec import PipelineSpec, load_spec
from stageline.stage import ERROR_COLUMN
from stageline.stages.validate import validate_frame

EVERY_TYPE_SPEC = """\
name: every-type
request:
  id_field: order_no
  fields:
    order_no: {type: str, max_length: 5}
    note: {type: str}
    count: {type: int}
    age: {type: int, ge: 18, le: 120}
    above_one: {type: int, gt: 1}
    negative: {type: int, lt: 0}
    narrow: {type: int, gt: 10, lt: 12}
    price: {type: float, gt: 0}
    share: {type: float, ge: 0, le: 0.5}
    big: {type: float, ge: 100}
    below: {type: float, le: -3.5}
    flag: {type: bool}
    colour: {type: category, values: [red, green]}
    at: {type: datetime}
    region: {type: str, default: EU}
    weight: {type: float, required: false}
stages:
  - name: decide
    uses: stageline.stages.postprocess:Decision
"""


@pytest.fixture
def every_type_spec(tmp_path: Path) -> PipelineSpec:
    path = tmp_path / "every-type.yaml"
    path.write_text(EVERY_TYPE_SPEC)
    return load_spec(path)


def assert_valid_everywhere(spec: PipelineSpec, record: dict[str, object]) -> None:
    """Valid for the online record model and for batch validation, after a JSON round trip
    (the curl sends JSON)."""
    sent = json.loads(json.dumps({"records": [record]}))["records"][0]
    assert set(sent) == set(spec.request.fields)
    spec.request.record_model().model_validate(sent)
    checked = validate_frame(pd.DataFrame([sent]), spec.request)
    assert checked[ERROR_COLUMN].isna().all(), checked[ERROR_COLUMN].tolist()


def test_an_example_for_every_field_type_passes_the_specs_checks(
    every_type_spec: PipelineSpec,
) -> None:
    record = example_record(every_type_spec.request)

    assert_valid_everywhere(every_type_spec, record)
    assert record["order_no"] == EXAMPLE_ID[:5]
    assert record["colour"] == "red"
    assert record["region"] == "EU"  # a default is the value to show
    assert record["narrow"] == 11
    assert 18 <= int(str(record["age"])) <= 120


def test_the_fraud_example_passes_the_specs_checks(fraud_spec: PipelineSpec) -> None:
    record = example_record(fraud_spec.request)

    assert_valid_everywhere(fraud_spec, record)
    assert record["transaction_id"] == EXAMPLE_ID
    assert record["country"] == "US"


def test_serve_shows_a_real_demo_record_on_the_demo_home(
    fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame
) -> None:
    record = demo_example(fraud_spec, demo_home)

    assert_valid_everywhere(fraud_spec, record)
    # A held-out customer, whose features the online store has: not a made-up one.
    assert record["transaction_id"] == holdout["transaction_id"].iloc[0]
    assert record["customer_id"] == holdout["customer_id"].iloc[0]


def test_serve_shows_a_schema_example_for_another_spec_on_the_demo_home(
    every_type_spec: PipelineSpec, demo_home: Path
) -> None:
    record = demo_example(every_type_spec, demo_home)

    assert_valid_everywhere(every_type_spec, record)
    assert record == {**example_record(every_type_spec.request), "at": record["at"]}
