"""The pipeline spec: what fraud.yaml declares, errors that point at the YAML, and the
request schema as a pydantic model that accepts exactly what batch validation accepts."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stageline.demo.data import MERCHANTS
from stageline.spec import PipelineSpec, SpecError, load_spec
from stageline.stages.validate import validate_frame
from tests.conftest import FRAUD_SPEC, GOOD_RECORD

CATEGORIES: tuple[str, ...] = MERCHANTS
"""The spec's merchant categories are the ones the demo's data has."""


# --------------------------------------------------------------------------- fraud.yaml


def test_fraud_spec_declares_its_stages_and_defaults(fraud_spec: PipelineSpec) -> None:
    assert fraud_spec.name == "fraud"
    assert fraud_spec.base_dir == FRAUD_SPEC.parent
    assert [(s.name, s.uses) for s in fraud_spec.stages] == [
        ("features", "stageline.stages.features:FeatureLookup"),
        ("transform", "stageline.stages.transform:OnDemandTransform"),
        ("model", "stageline.stages.model:XGBoostPredictor"),
        ("postprocess", "stageline.stages.postprocess:Decision"),
    ]
    assert fraud_spec.stage("model").params == {"model": "fraud", "alias": "champion", "reasons": 3}

    request = fraud_spec.request
    assert request.id_field == "transaction_id"
    assert request.fields["merchant_category"].values == CATEGORIES
    required = [name for name, f in request.fields.items() if f.is_required]
    assert required == ["transaction_id", "customer_id", "amount", "merchant_category", "ts"]
    assert request.fields["country"].default == "US"

    # What the YAML leaves out takes the documented defaults.
    postprocess = fraud_spec.stage("postprocess")
    assert postprocess.params == {}
    assert postprocess.serve.num_cpus == 0.25
    assert postprocess.serve.autoscaling.min_replicas == 1
    assert postprocess.serve.batch is not None
    assert postprocess.serve.batch.max_size == 64
    assert postprocess.batch.batch_size == 4096
    assert postprocess.batch.actors == (1, 2)
    assert fraud_spec.stage("model").batch.batch_size == 65536
    assert fraud_spec.serve.fuse == ()
    assert fraud_spec.serve.max_records == 1000
    assert fraud_spec.batch.fuse == "all"
    assert fraud_spec.batch.block_mb == 8.0


def test_spec_file_missing_is_a_spec_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(SpecError, match=r"nowhere\.yaml"):
        load_spec(path)


# --------------------------------------------------------------------------- spec errors


def _fraud_dict() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(FRAUD_SPEC.read_text())
    return data


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets ``a.b.0.c`` (dict keys and list indexes) to ``value``."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = data
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_fraud_spec_rewritten_by_the_test_harness_still_loads(tmp_path: Path) -> None:
    # The control for the cases below: only the mutation makes them fail.
    spec = load_spec(_write(tmp_path, _fraud_dict()))
    assert [s.name for s in spec.stages] == ["features", "transform", "model", "postprocess"]


@pytest.mark.parametrize(
    ("mutate", "where", "on_line", "says"),
    [
        pytest.param(_set("bogus", 1), "bogus", "bogus: 1", "unknown key", id="unknown-top"),
        pytest.param(
            _set("stages.1.bogus", 1),
            "stages[1].bogus",
            "bogus: 1",
            "unknown key",
            id="unknown-stage",
        ),
        pytest.param(
            _set("request.fields.amount.bogus", 1),
            "request.fields.amount.bogus",
            "bogus: 1",
            "unknown key",
            id="unknown-field-key",
        ),
        pytest.param(_set("stages", 5), "stages", "stages: 5", "valid tuple", id="stages-not-list"),
        pytest.param(
            _set("stages.0.serve.autoscaling.max_replicas", "lots"),
            "stages[0].serve.autoscaling.max_replicas",
            "max_replicas: lots",
            "valid integer",
            id="wrong-type",
        ),
        pytest.param(
            _drop("stages.1.uses"),
            "stages[1].uses",
            "name: transform",
            "required key is missing",
            id="missing-uses",
        ),
        pytest.param(
            _set("stages.1.uses", "nope.module:Thing"),
            "stages[1].uses",
            "uses: nope.module:Thing",
            "No module named 'nope'",
            id="unimportable-module",
        ),
        pytest.param(
            _set("stages.2.uses", "stageline.stages.model:Nope"),
            "stages[2].uses",
            "uses: stageline.stages.model:Nope",
            "has no class 'Nope'",
            id="unknown-class",
        ),
        pytest.param(
            _set("stages.3.params", {"bogus": 1}),
            "stages[3].params",
            "params:",
            "params do not fit Decision",
            id="params-do-not-fit",
        ),
        pytest.param(
            _drop("request.fields.merchant_category.values"),
            "request.fields.merchant_category",
            "merchant_category:",
            "needs 'values'",
            id="category-without-values",
        ),
        pytest.param(
            _set("request.fields.customer_id.ge", 0),
            "request.fields.customer_id",
            "customer_id:",
            "only apply to int and float",
            id="bounds-on-str",
        ),
        pytest.param(
            _set("stages.2.name", "features"),
            "stages[2].name",
            "name: features",
            "must be unique",
            id="duplicate-stage-name",
        ),
        pytest.param(
            _set("serve.fuse", [["features", "model"]]),
            "serve.fuse[0]",
            "- features",
            "not a run of adjacent stages",
            id="fuse-not-adjacent",
        ),
        pytest.param(
            _set("serve.fuse", [["ghost"]]),
            "serve.fuse[0]",
            "- ghost",
            "unknown stage(s) ['ghost']",
            id="fuse-unknown-stage",
        ),
        pytest.param(
            _set("batch", {"fuse": [["transform", "postprocess"]]}),
            "batch.fuse[0]",
            "- transform",
            "not a run of adjacent stages",
            id="batch-fuse-not-adjacent",
        ),
    ],
)
def test_spec_error_names_file_yaml_path_and_line(
    tmp_path: Path,
    mutate: Callable[[dict[str, Any]], None],
    where: str,
    on_line: str,
    says: str,
) -> None:
    data = _fraud_dict()
    mutate(data)
    path = _write(tmp_path, data)

    with pytest.raises(SpecError) as caught:
        load_spec(path)

    message = str(caught.value)
    assert str(path) in message
    assert says in message
    prefix = f"{where} (line "
    assert prefix in message, message
    line = int(message.split(prefix, 1)[1].split(")", 1)[0])
    # The line number takes the user to the offending text.
    assert on_line in path.read_text().splitlines()[line - 1], message


# --------------------------------------------------------------------------- record model


def test_record_model_accepts_a_good_record(
    fraud_spec: PipelineSpec, good_record: dict[str, object]
) -> None:
    record = fraud_spec.request.record_model().model_validate(good_record)
    assert record.model_dump() == {
        **good_record,
        "ts": datetime(2026, 1, 20, 10, 15, tzinfo=timezone.utc),
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("amount", -1),
        ("amount", 1_000_001),
        ("amount", "abc"),
        ("amount", math.inf),
        ("amount", True),
        ("amount", None),
        ("merchant_category", "casino"),
        ("merchant_category", 3),
        ("ts", "not-a-date"),
        ("ts", "2026-02-30T10:00:00Z"),
        ("ts", "9999-01-01T00:00:00Z"),
        ("customer_id", "c" * 65),
        ("customer_id", ["c1"]),
        ("transaction_id", True),
        ("country", "USA"),
    ],
)
def test_record_model_rejects_bad_value_naming_the_field(
    fraud_spec: PipelineSpec, good_record: dict[str, object], field: str, value: object
) -> None:
    model = fraud_spec.request.record_model()
    with pytest.raises(ValidationError) as caught:
        model.model_validate({**good_record, field: value})
    assert {e["loc"][0] for e in caught.value.errors()} == {field}


@pytest.mark.parametrize("field", ["transaction_id", "customer_id", "amount", "ts"])
def test_record_model_rejects_missing_required_field(
    fraud_spec: PipelineSpec, good_record: dict[str, object], field: str
) -> None:
    del good_record[field]
    with pytest.raises(ValidationError) as caught:
        fraud_spec.request.record_model().model_validate(good_record)
    assert [(e["loc"], e["type"]) for e in caught.value.errors()] == [((field,), "missing")]


def test_record_model_rejects_an_unknown_field(
    fraud_spec: PipelineSpec, good_record: dict[str, object]
) -> None:
    with pytest.raises(ValidationError) as caught:
        fraud_spec.request.record_model().model_validate({**good_record, "amout": 3})
    assert [(e["loc"], e["type"]) for e in caught.value.errors()] == [
        (("amout",), "extra_forbidden")
    ]


def test_record_model_fills_the_default_of_an_optional_field(
    fraud_spec: PipelineSpec, good_record: dict[str, object]
) -> None:
    del good_record["country"]
    record = fraud_spec.request.record_model().model_validate(good_record)
    assert record.model_dump()["country"] == "US"


def test_record_json_schema_documents_the_rules(fraud_spec: PipelineSpec) -> None:
    schema = fraud_spec.request.record_model().model_json_schema()
    props = schema["properties"]
    assert props["merchant_category"]["enum"] == list(CATEGORIES)
    assert (props["amount"]["minimum"], props["amount"]["maximum"]) == (0, 1_000_000)
    assert props["ts"]["format"] == "date-time"
    assert props["customer_id"]["maxLength"] == 64
    assert props["country"]["default"] == "US"
    assert schema["required"] == [
        "transaction_id",
        "customer_id",
        "amount",
        "merchant_category",
        "ts",
    ]
    assert schema["additionalProperties"] is False
    json.dumps(schema)  # the OpenAPI page serves it as it is


# --------------------------------------------------------------------------- one rule set


_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from([[], {}, ["a"], {"a": 1}]),
)
_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=70)


def _iso(value: datetime, layout: str) -> str:
    if layout == "date":
        return value.date().isoformat()
    text = value.isoformat(sep=layout if layout in "T " else "T")
    return text.replace("+00:00", "Z") if layout == "Z" else text


_VALID_TS = st.builds(
    _iso,
    st.datetimes(
        min_value=datetime(1600, 1, 1),
        max_value=datetime(2400, 1, 1),
        timezones=st.sampled_from([None, timezone.utc, timezone(timedelta(hours=-5, minutes=-30))]),
    ),
    st.sampled_from(["T", " ", "Z", "date"]),
)
_BAD_TS = st.sampled_from(
    [
        "not-a-date",
        "2026-13-01",
        "2026-02-30",
        "2026-01-20T25:00:00Z",
        "today",
        "now",
        " 2026-01-20",
        "2026-01",
        "20260120",
        "1700000000",
        "1700000000000",
        "9999-12-31T00:00:00Z",
        "0001-01-01",
    ]
)
_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "transaction_id": st.one_of(_TEXT, _JUNK),
    "customer_id": st.one_of(_TEXT, _JUNK),
    "amount": st.one_of(
        st.floats(min_value=-10, max_value=2e6),
        st.integers(min_value=-5, max_value=2_000_000),
        st.sampled_from(["42.5", " 7 ", "1e3", "-1", "abc", "", "nan", "inf", "1_000", "0x10"]),
        _JUNK,
    ),
    "merchant_category": st.one_of(
        st.sampled_from(CATEGORIES), st.sampled_from(["Grocery", "casino", ""]), _JUNK
    ),
    "ts": st.one_of(
        _VALID_TS,
        _BAD_TS,
        st.integers(min_value=-(10**13), max_value=10**13),
        st.floats(min_value=-1e13, max_value=1e13),
        _JUNK,
    ),
    "country": st.one_of(st.text(max_size=3), _JUNK),
}
_MISSING = object()


@st.composite
def _records(draw: st.DrawFn, good: dict[str, Any]) -> dict[str, Any]:
    """A good record with up to three fields replaced by anything or removed."""
    record = dict(good)
    for name in draw(st.sets(st.sampled_from(sorted(good)), max_size=3)):
        value = draw(st.one_of(st.just(_MISSING), _FIELD_VALUES[name]))
        if value is _MISSING:
            del record[name]
        else:
            record[name] = value
    return record


GOOD = GOOD_RECORD


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
)
@given(records=st.lists(_records(GOOD), min_size=1, max_size=6))
def test_record_model_and_validate_frame_accept_the_same_records(
    fraud_spec: PipelineSpec, records: list[dict[str, Any]]
) -> None:
    model = fraud_spec.request.record_model()

    def online(record: dict[str, Any]) -> bool:
        try:
            model.model_validate(record)
        except ValidationError:
            return False
        return True

    def batch(frame: pd.DataFrame) -> list[bool]:
        out = validate_frame(frame, fraud_spec.request)
        return out["_error"].isna().tolist()

    expected = [online(r) for r in records]
    # A record alone (pandas infers each column's type), and records together as the Python
    # values they are (inferring one type for a column would turn a 10 next to a 1.5 into 10.0).
    alone = [batch(pd.DataFrame([r]))[0] for r in records]
    together = batch(pd.DataFrame(records, dtype=object))
    assert alone == expected, list(zip(records, expected, alone, strict=True))
    assert together == expected, list(zip(records, expected, together, strict=True))


def test_batch_runs_the_whole_chain_in_one_pool_unless_told_otherwise(tmp_path: Path) -> None:
    spec = load_spec(FRAUD_SPEC)
    everything = ("features", "transform", "model", "postprocess")
    assert [s.stages for s in spec.batch_segments()] == [everything]
    # Online, the shipped spec runs them all inside the ingress: one inline segment.
    assert [(s.stages, s.inline) for s in spec.segments()] == [(everything, True)]

    data = _fraud_dict()
    data["batch"] = {"fuse": [["features", "transform"]]}
    split = load_spec(_write(tmp_path, data))
    assert [(s.name, s.stages) for s in split.batch_segments()] == [
        ("features+transform", ("features", "transform")),
        ("model", ("model",)),
        ("postprocess", ("postprocess",)),
    ]


def test_setup_builds_an_examples_world_and_a_bad_one_is_refused_at_load(tmp_path: Path) -> None:
    from stageline.spec import prepare_home

    spec_file = tmp_path / "mini.yaml"
    base = yaml.safe_load(FRAUD_SPEC.read_text())
    base["setup"] = "world.py:build"
    spec_file.write_text(yaml.safe_dump(base))
    (tmp_path / "world.py").write_text(
        "def build(spec, home):\n    (home / 'built').write_text(spec.name)\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    prepare_home(load_spec(spec_file), home)
    assert (home / "built").read_text() == "fraud"

    base["setup"] = "world.py:missing"
    spec_file.write_text(yaml.safe_dump(base))
    with pytest.raises(SpecError, match=r"setup.*has no function 'missing'"):
        load_spec(spec_file)


def test_online_placement_defaults_to_every_stage_inline_and_empty_inline_is_the_graph(
    tmp_path: Path,
) -> None:
    data = _fraud_dict()
    del data["serve"]["inline"]
    default = load_spec(_write(tmp_path, data))
    everything = ("features", "transform", "model", "postprocess")
    assert [(s.stages, s.inline) for s in default.segments()] == [(everything, True)]

    data["serve"]["fuse"] = [["transform", "model"]]
    fused = load_spec(_write(tmp_path, data))
    assert [(s.stages, s.inline) for s in fused.segments()] == [
        (("features",), True),
        (("transform", "model"), False),
        (("postprocess",), True),
    ]

    data["serve"] = {"inline": []}
    graph = load_spec(_write(tmp_path, data))
    assert [(s.stages, s.inline) for s in graph.segments()] == [((n,), False) for n in everything]


def test_graph_placement_runs_no_stage_inline_and_takes_its_ingress_options() -> None:
    local = load_spec(FRAUD_SPEC)
    assert local.serve.placement == "local"
    graph = local.with_placement("graph")

    # Each cheap stage rides with its neighbour (serve.graph.fuse): the feature lookup
    # and the model in deployments of their own.
    assert [(s.stages, s.inline) for s in graph.segments()] == [
        (("features", "transform"), False),
        (("model", "postprocess"), False),
    ]
    # The ingress only routes in the graph: it autoscales from one replica and keeps
    # several batches going down the graph, as serve.graph says.
    assert graph.serve.ingress.autoscaling == local.serve.graph.ingress
    assert graph.serve.ingress.autoscaling.min_replicas == 1
    assert graph.serve.ingress.autoscaling.max_replicas > 1
    assert graph.serve.ingress.in_flight == local.serve.graph.in_flight > 1
    # Everything else is the spec's own; placed back, every stage runs inline again.
    assert graph.serve.ingress.batch == local.serve.ingress.batch
    assert graph.base_dir == local.base_dir
    back = graph.with_placement("local")
    assert back.segments() == local.segments()
    assert graph.with_placement("graph") == graph


def test_graph_inline_keeps_cheap_stages_in_the_ingress_and_refuses_unknown_or_fused(
    tmp_path: Path,
) -> None:
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    data["serve"]["graph"] = {"inline": ["transform", "postprocess"]}
    graph = load_spec(_write(tmp_path, data)).with_placement("graph")
    # transform follows features' deployment inside the ingress; postprocess too.
    assert [(s.stages, s.inline) for s in graph.segments()] == [
        (("features",), False),
        (("transform",), True),
        (("model",), False),
        (("postprocess",), True),
    ]
    # The local placement ignores it.
    assert all(s.inline for s in graph.with_placement("local").segments())

    data["serve"]["graph"] = {"inline": ["ghost"]}
    with pytest.raises(SpecError, match=r"serve\.graph\.inline names unknown stage 'ghost'"):
        load_spec(_write(tmp_path, data))
    data["serve"]["graph"] = {"inline": ["model"], "fuse": [["transform", "model"]]}
    with pytest.raises(SpecError, match="both fused and inline"):
        load_spec(_write(tmp_path, data))


def test_graph_fuse_groups_stages_in_the_graph_only_and_is_checked(tmp_path: Path) -> None:
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    data["serve"]["graph"] = {"fuse": [["features", "transform"], ["model", "postprocess"]]}
    spec = load_spec(_write(tmp_path, data))
    graph = spec.with_placement("graph")
    assert [(s.name, s.stages, s.inline) for s in graph.segments()] == [
        ("features+transform", ("features", "transform"), False),
        ("model+postprocess", ("model", "postprocess"), False),
    ]
    # The local placement keeps its own: every stage inline (serve.inline).
    assert [s.stages for s in spec.segments()] == [
        ("features", "transform", "model", "postprocess")
    ]
    assert all(s.inline for s in spec.segments())

    data["serve"]["graph"] = {"fuse": [["features", "model"]]}
    with pytest.raises(SpecError, match=r"serve\.graph\.fuse group .* not a run of adjacent"):
        load_spec(_write(tmp_path, data))
    data["serve"]["graph"] = {"fuse": [["ghost"]]}
    with pytest.raises(SpecError, match=r"serve\.graph\.fuse names unknown stage"):
        load_spec(_write(tmp_path, data))


def test_an_int_field_takes_whole_bounds_only_and_any_size_of_them() -> None:
    """A fractional bound on an int field is a spec error naming it, at load; a whole one
    beyond int64 (written 1e20 in YAML, a float) works online and in batch alike."""
    from stageline.spec import RequestSchema

    with pytest.raises(ValidationError, match="bounds of an int field are whole numbers: le"):
        RequestSchema.model_validate(
            {"id_field": "id", "fields": {"id": {"type": "str"}, "n": {"type": "int", "le": 1.5}}}
        )
    schema = RequestSchema.model_validate(
        {
            "id_field": "id",
            "fields": {"id": {"type": "str"}, "n": {"type": "int", "ge": -1e20, "lt": 10}},
        }
    )
    model = schema.record_model()
    assert model.model_validate({"id": "a", "n": -(2**62)}).model_dump()["n"] == -(2**62)
    with pytest.raises(ValidationError):
        model.model_validate({"id": "a", "n": 10})
    checked = validate_frame(pd.DataFrame({"id": ["a", "b"], "n": [-(2**40), 10]}), schema)
    assert checked["_error"].isna().tolist() == [True, False]
