"""Every example pipeline (tests/cases.py), through every runtime.

The same held-out records, some with an entity no feature table holds and some
without a field the spec makes optional, answer identically in process, over HTTP
(Ray Serve) and in batch (Ray Data). And each runtime answers with exactly what the
spec declares: the ``/predict`` items, the Open Inference Protocol's metadata and
tensors, the OpenAPI page, the batch parquet schema; an invalid record is named
(a 422, its place in a partial answer, the quarantine).

Each example gets one Serve app and one batch run for the module: the fraud demo's
is the session's ``fraud_url``; the others are deployed here and deleted after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from batch_app.manifest import QUARANTINE
from batch_app.run import Summary, run
from stageline import Pipeline
from stageline.outputs import records
from stageline.spec import OutputType
from tests.cases import Case
from tests.conftest import deploy_app
from tests.integration.serve_helpers import (
    Answer,
    answers,
    client_records,
    delete_apps,
    in_process_answers,
)

pytestmark = pytest.mark.e2e

TIMEOUT = 30.0
PARITY_ROWS = 200
WHOLE_FILE = 150
"""Records from here on arrive without the optional fields at all (a file without the
columns; JSON without the keys)."""
MODEL = ["model_name", "model_version"]
"""What the batch writer and ``/predict`` add to the declared outputs: the model."""

# What a client of each protocol sees of an output type, written out here rather than
# read from the code under test.
OIP_DATATYPES: dict[OutputType, str] = {
    "float": "FP64",
    "bool": "BOOL",
    "int": "INT64",
    "str": "BYTES",
    "str_list": "BYTES",
}
OIP_INPUT_DATATYPES = {
    "str": "BYTES",
    "category": "BYTES",
    "datetime": "BYTES",
    "int": "INT64",
    "float": "FP64",
    "bool": "BOOL",
}
JSON_SCHEMAS: dict[OutputType, dict[str, Any]] = {
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "str_list": {"type": "array", "items": {"type": "string"}},
}

Json = dict[str, Any]


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Parity:
    """The held-out records every runtime scores, as the in-process pipeline gets them
    (None where a field is left out), and what was changed to make them."""

    frame: pd.DataFrame
    original: pd.DataFrame
    """The same records as held out, before the changes."""
    changed: dict[str, list[str]]
    """Ids of the records changed, by change: ``unknown entity``, ``left out``."""

    def complete(self, n: int) -> pd.DataFrame:
        """``n`` records with every field."""
        rows = self.frame.dropna().head(n)
        assert len(rows) == n
        return rows


@pytest.fixture(scope="module")
def parity(case: Case) -> Parity:
    original = case.held_out(PARITY_ROWS)
    frame = original.copy()
    changed: dict[str, list[str]] = {}
    unknown = frame.index % 10 == 3
    for field in case.entity_fields:
        frame[field] = frame[field].astype(object)
        frame.loc[unknown, field] = [case.unknown_entity(field, i) for i in frame.index[unknown]]
    if case.entity_fields:
        changed["unknown entity"] = list(frame.loc[unknown, case.id_field])
    left_out = (frame.index % 7 == 4) | (frame.index >= WHOLE_FILE)
    for field in case.optional_fields:
        frame[field] = frame[field].astype(object)
        frame.loc[left_out, field] = None
    if case.optional_fields:
        changed["left out"] = list(frame.loc[left_out, case.id_field])
    return Parity(frame, original, changed)


@pytest.fixture(scope="module")
def pipeline(case: Case) -> Pipeline:
    return Pipeline(case.spec, case.home)


@pytest.fixture(scope="module")
def reference(pipeline: Pipeline, parity: Parity) -> dict[str, Answer]:
    """What the in-process pipeline answers for the parity records."""
    return in_process_answers(pipeline, parity.frame)


@pytest.fixture(scope="module")
def url(case: Case, serve_base: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """The example served by Ray Serve, as it ships."""
    if case.name == "fraud":
        yield request.getfixturevalue("fraud_url")  # the session's, read-only
        return
    name = f"pipelines-{case.name}"
    yield deploy_app(serve_base, name, spec=str(case.spec_path), home=str(case.home))
    delete_apps([name])


@dataclass(frozen=True)
class BatchRun:
    source: Path
    output: Path
    summary: Summary
    invalid: list[Json]
    """The invalid records written beside the parity records, one per rule broken."""


@pytest.fixture(scope="module")
def batch(
    case: Case, parity: Parity, ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> BatchRun:
    """One batch run over the parity records (their second file without the optional
    columns, as a warehouse export of another day lands) and a file of invalid records."""
    folder = tmp_path_factory.mktemp(f"batch-{case.name}")
    source, output = folder / "in", folder / "out"
    source.mkdir()
    frame = parity.frame
    frame.iloc[:WHOLE_FILE].to_parquet(source / "part-0.parquet")
    frame.iloc[WHOLE_FILE:].drop(columns=case.optional_fields).to_parquet(source / "part-1.parquet")
    base = {str(k): v for k, v in parity.original.iloc[0].items()}
    invalid = case.invalid_records(base)
    bad = pd.DataFrame.from_records(invalid, columns=case.fields)
    bad.astype(parity.original.dtypes.to_dict()).to_parquet(source / "part-2.parquet")
    summary = run(case.spec, source, output, case.home)
    return BatchRun(source, output, summary, invalid)


def post(url: str, body: Any, path: str = "/predict") -> requests.Response:
    return requests.post(f"{url}{path}", json=body, timeout=TIMEOUT)


def batch_answers(output: Path, id_field: str) -> dict[str, Answer]:
    """The published scored rows under ``output``, by record id (without the run id)."""
    frame = pd.concat(pd.read_parquet(p) for p in sorted(output.glob("run=*/*.parquet")))
    return {
        str(r[id_field]): {k: v for k, v in r.items() if k not in (id_field, "run_id")}
        for r in records(frame)
    }


def of_type(value: Any, kind: OutputType) -> bool:
    """Whether a JSON value is of an output type (never null for a scored record)."""
    if kind == "str_list":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind in ("float", "int"):
        plain = {"float": float, "int": int}[kind]
        return isinstance(value, plain) and not isinstance(value, bool)
    return isinstance(value, {"bool": bool, "str": str}[kind])


def arrow_kind(t: pa.DataType) -> str:
    """The output type an Arrow column holds, as the spec names it."""
    if pa.types.is_list(t) and pa.types.is_string(t.value_type):
        return "str_list"
    checks = (
        (pa.types.is_float64, "float"),
        (pa.types.is_boolean, "bool"),
        (pa.types.is_int64, "int"),
        (pa.types.is_string, "str"),
    )
    return next((name for check, name in checks if check(t)), str(t))


def schema_ref(doc: Json, node: Json) -> Json:
    """The component a ``$ref`` node points at."""
    return dict(doc["components"]["schemas"][node["$ref"].rsplit("/", 1)[1]])


# --------------------------------------------------------------------------- parity


def test_in_process_http_and_batch_answer_identically(
    case: Case,
    parity: Parity,
    pipeline: Pipeline,
    reference: dict[str, Answer],
    url: str,
    batch: BatchRun,
):
    # Online: the records as clients send them (what is left out is not sent), 50 a
    # request, three clients at a time: the ingress merges concurrent requests.
    sent = client_records(parity.frame)
    for field in case.optional_fields:
        assert sum(field not in r for r in sent) >= PARITY_ROWS - WHOLE_FILE
    chunks = [sent[i : i + 50] for i in range(0, len(sent), 50)]
    online: dict[str, Answer] = {}
    with ThreadPoolExecutor(max_workers=3) as pool:
        for part in pool.map(lambda c: answers(url, c, case.id_field), chunks):
            online.update(part)
    offline = batch_answers(batch.output, case.id_field)

    assert len(reference) == PARITY_ROWS
    keys = {*case.output_names, *MODEL}
    assert all(set(a) == keys for a in reference.values())
    for runtime, got in (("HTTP", online), ("batch", offline)):
        assert set(got) == set(reference), f"{runtime} answered other records"
        mismatched = {k: (got[k], v) for k, v in reference.items() if got[k] != v}
        example = next(iter(mismatched.items()), None)
        assert not mismatched, (
            f"{case.name}: {runtime} differs from in process on {len(mismatched)} of "
            f"{len(reference)} records; e.g. {example} (got, expected)"
        )

    # Not vacuous: the records tell apart, and what was changed changes answers.
    first_float = next(o.name for o in case.outputs if o.type == "float")
    assert len({a[first_float] for a in reference.values()}) > PARITY_ROWS // 2
    as_held_out = in_process_answers(pipeline, parity.original)
    for change, ids in parity.changed.items():
        moved = [i for i in ids if reference[i] != as_held_out[i]]
        assert moved, f"{case.name}: no record's answer depends on its {change}"


# --------------------------------------------------------------------------- HTTP


def test_predict_answers_the_id_and_the_declared_outputs(
    case: Case, parity: Parity, reference: dict[str, Answer], url: str
):
    sent = client_records(parity.frame.head(3))
    resp = post(url, {"records": sent})

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"predictions", "model", "request_id"}
    expected = reference[str(sent[0][case.id_field])]
    assert body["model"] == {"name": expected["model_name"], "version": expected["model_version"]}
    assert [p[case.id_field] for p in body["predictions"]] == [r[case.id_field] for r in sent]
    for p in body["predictions"]:
        assert list(p) == [case.id_field, *case.output_names]
        wrong = {o.name: p[o.name] for o in case.outputs if not of_type(p[o.name], o.type)}
        assert not wrong, f"{case.name}: outputs not of their declared type: {wrong}"


def test_oip_metadata_lists_the_declared_outputs_with_datatypes(case: Case, url: str):
    resp = requests.get(f"{url}/v2/models/{case.spec.name}", timeout=TIMEOUT)

    assert resp.status_code == 200, resp.text
    meta = resp.json()
    assert meta["name"] == case.spec.name
    assert meta["inputs"] == [
        {"name": n, "datatype": OIP_INPUT_DATATYPES[f.type], "shape": [-1]}
        for n, f in case.spec.request.fields.items()
    ]
    assert meta["outputs"] == [
        {"name": case.id_field, "datatype": "BYTES", "shape": [-1]},
        *({"name": o.name, "datatype": OIP_DATATYPES[o.type], "shape": [-1]} for o in case.outputs),
    ]


def test_oip_infer_returns_the_declared_outputs(
    case: Case, parity: Parity, reference: dict[str, Answer], url: str
):
    sent = client_records(parity.complete(3))
    tensors = [
        {
            "name": name,
            "shape": [len(sent)],
            "datatype": OIP_INPUT_DATATYPES[field.type],
            "data": [r[name] for r in sent],
        }
        for name, field in case.spec.request.fields.items()
    ]
    resp = post(url, {"id": "oip-1", "inputs": tensors}, f"/v2/models/{case.spec.name}/infer")

    assert resp.status_code == 200, resp.text
    body = resp.json()
    ids = [str(r[case.id_field]) for r in sent]
    expected = [reference[i] for i in ids]
    assert (body["model_name"], body["model_version"], body["id"]) == (
        case.spec.name,
        str(expected[0]["model_version"]),
        "oip-1",
    )
    outputs = {o["name"]: o for o in body["outputs"]}
    assert list(outputs) == [case.id_field, *case.output_names]
    assert outputs[case.id_field]["data"] == ids
    for o in case.outputs:
        tensor = outputs[o.name]
        assert (tensor["datatype"], tensor["shape"]) == (OIP_DATATYPES[o.type], [len(sent)])
        # The values /predict and the in-process pipeline give (a list joined by commas).
        want = [",".join(e[o.name]) if o.type == "str_list" else e[o.name] for e in expected]
        assert tensor["data"] == want, o.name


def test_openapi_documents_the_declared_outputs(case: Case, url: str):
    resp = requests.get(f"{url}/openapi.json", timeout=TIMEOUT)

    assert resp.status_code == 200, resp.text
    doc = resp.json()
    ok = doc["paths"]["/predict"]["post"]["responses"]["200"]
    answer = schema_ref(doc, ok["content"]["application/json"]["schema"])
    item = schema_ref(doc, answer["properties"]["predictions"]["items"])
    props = item["properties"]
    # ``model`` names a record's own model when one answer mixes models (a canary).
    assert set(props) == {case.id_field, *case.output_names, "error", "model"}
    assert "different models" in props["model"]["description"]
    for o in case.outputs:
        documented = props[o.name].get("anyOf", [props[o.name]])
        assert JSON_SCHEMAS[o.type] in documented, (o.name, props[o.name])
        if o.description:
            assert props[o.name]["description"] == o.description


def test_an_invalid_record_is_422_naming_the_record_and_the_field(
    case: Case, parity: Parity, url: str
):
    good = client_records(parity.complete(2))
    for bad, rule in zip(case.invalid_records(good[0]), case.invalid, strict=True):
        resp = post(url, {"records": [*good, bad]})

        assert resp.status_code == 422, resp.text
        error = resp.json()["error"]
        assert error["code"] == "invalid_request", error
        assert [(d.get("record"), d.get("field")) for d in error["details"]] == [(2, rule.field)]


def test_partial_scores_the_valid_records_and_answers_each_invalid_one_in_its_place(
    case: Case, parity: Parity, reference: dict[str, Answer], url: str
):
    good = client_records(parity.complete(2))
    bad = case.invalid_records(good[0])
    resp = post(url, {"records": [good[0], *bad, good[1]]}, "/predict?partial=true")

    assert resp.status_code == 200, resp.text
    first, *rejected, last = resp.json()["predictions"]
    for record, answer in ((good[0], first), (good[1], last)):
        expected = reference[str(record[case.id_field])]
        assert answer == {case.id_field: record[case.id_field]} | {
            n: expected[n] for n in case.output_names
        }
    assert len(rejected) == len(case.invalid)
    for record, answer, rule in zip(bad, rejected, case.invalid, strict=True):
        assert set(answer) == {case.id_field, "error"}
        assert answer[case.id_field] == record[case.id_field]
        assert answer["error"]["stage"] == "request"
        assert answer["error"]["message"].startswith(f"{rule.field}: "), answer


# --------------------------------------------------------------------------- batch


def test_batch_output_is_the_id_and_the_declared_outputs_with_their_types(
    case: Case, batch: BatchRun
):
    parts = sorted(batch.output.glob("run=*/*.parquet"))
    assert parts
    for part in parts:
        schema = pq.read_schema(part)
        assert schema.names == [case.id_field, *case.output_names, *MODEL, "run_id"]
        kinds = {f.name: arrow_kind(f.type) for f in schema}
        assert kinds == {
            case.id_field: "str",
            **{o.name: o.type for o in case.outputs},
            "model_name": "str",
            "model_version": "int",
            "run_id": "str",
        }


def test_batch_quarantines_each_invalid_row_with_its_stage_and_reason(case: Case, batch: BatchRun):
    summary = batch.summary
    n = len(case.invalid)
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (
        PARITY_ROWS + n,
        PARITY_ROWS,
        n,
    )
    parts = sorted((batch.output / QUARANTINE).glob("run=*/*.parquet"))
    quarantined = pd.concat(pd.read_parquet(p) for p in parts)
    reasons = dict(zip(quarantined[case.id_field], quarantined["reason"], strict=True))
    assert set(quarantined["stage"]) == {"validate"}
    assert sorted(reasons) == sorted(r[case.id_field] for r in batch.invalid)
    for record, rule in zip(batch.invalid, case.invalid, strict=True):
        assert reasons[record[case.id_field]].startswith(f"{rule.field}: "), reasons
    # The record as it arrived, for the user to find and fix.
    assert all(set(json.loads(r)) == set(case.fields) for r in quarantined["record"])


def test_an_incremental_rerun_over_the_same_input_writes_nothing_new(case: Case, batch: BatchRun):
    def published() -> dict[str, int]:
        files = [*batch.output.glob("run=*/*"), *(batch.output / QUARANTINE).glob("run=*/*")]
        return {str(p.relative_to(batch.output)): p.stat().st_size for p in files}

    before = published()
    again = run(case.spec, batch.source, batch.output, case.home)

    assert again.run_id is None
    assert (again.rows_in, again.rows_out, again.rows_quarantined) == (0, 0, 0)
    assert again.skipped_files == 3
    assert published() == before
    assert len({p.split("/")[0] for p in before if p.startswith("run=")}) == 1
