"""End to end over real HTTP: the fraud demo served by Ray Serve, as a client sees it.

The demo app (``fraud_url``) is shared and read-only. Tests that need other
settings (small limits, a slow stage) deploy their own small app: every fraud stage
inline in the ingress, plus at most one slow stage of their own.

Hostile input (NaN and Infinity, deep nesting, 10 MB bodies, slow clients, fuzzing)
and the API key are in the fault suite: tests/faults/test_hostile_input.py and
tests/faults/test_security.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from ray import serve

from stageline.spec import PipelineSpec
from tests.conftest import FRAUD_SPEC, deploy_app

pytestmark = pytest.mark.e2e

TIMEOUT = 30.0
UNSET_ENV = "STAGELINE_E2E_KEY_NOT_SET"
"""An env var nobody sets, so an app reads its key from the file (or has none)."""

SLOW_STAGE = '''\
"""A user's stage that takes its time: a slow model, a slow dependency."""

import time


class Sleep:
    def __init__(self, seconds):
        self.seconds = seconds

    def __call__(self, batch):
        time.sleep(self.seconds)
        return batch
'''

Json = dict[str, Any]

MISSING = object()
"""A field left out of a record."""


# --------------------------------------------------------------------------- helpers


def post(url: str, body: Any, **kwargs: Any) -> requests.Response:
    return requests.post(url, json=body, timeout=TIMEOUT, **kwargs)


def assert_error(resp: requests.Response, status: int, code: str | None = None) -> Json:
    """The one error shape every failure has; returns its ``error`` object."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json"), resp.text
    body = resp.json()
    assert set(body) == {"error", "request_id"}, body
    error = body["error"]
    assert set(error) <= {"status", "code", "message", "details"}, error
    assert error["status"] == status
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error.get("details", []), list)
    if code is not None:
        assert error["code"] == code, error
    assert body["request_id"], body
    assert body["request_id"] == resp.headers["x-request-id"]
    return dict(error)


def fraud_variant(
    directory: Path,
    serve_options: Json,
    *,
    slow_seconds: float | None = None,
    slow_serve: Json | None = None,
) -> Path:
    """The fraud spec with every stage inline (one replica), ``serve_options`` on top,
    and optionally a slow user stage first, as its own deployment."""
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    stages = data["stages"]
    data["serve"] = {"inline": [s["name"] for s in stages], **serve_options}
    if slow_seconds is not None:
        (directory / "slow_stage.py").write_text(SLOW_STAGE)
        slow = {
            "name": "slow",
            "uses": "slow_stage.py:Sleep",
            "params": {"seconds": slow_seconds},
            "serve": {"num_cpus": 0.1, **(slow_serve or {})},
        }
        data["stages"] = [slow, *stages]
    path = directory / "fraud.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def extra_app(
    serve_base: str, demo_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., str]]:
    """``extra_app(name, serve_options, **variant, **app_args)``: deploy a fraud variant;
    every app deployed is deleted at the end of the module."""
    deployed: list[str] = []

    def deploy(name: str, serve_options: Json, **kwargs: Any) -> str:
        variant = {k: kwargs.pop(k) for k in ("slow_seconds", "slow_serve") if k in kwargs}
        spec = fraud_variant(tmp_path_factory.mktemp(name), serve_options, **variant)
        deployed.append(name)
        kwargs.setdefault("api_key_env", UNSET_ENV)
        return deploy_app(serve_base, name, spec=str(spec), home=str(demo_home), **kwargs)

    yield deploy
    running = serve.status().applications
    for name in deployed:
        if name in running:
            serve.delete(name)


# --------------------------------------------------------------------------- endpoints


def test_predict_answers_with_prediction_model_and_request_id(fraud_url: str, good_record: Json):
    # The second: a foreign electronics purchase at 3 am, which the demo's model flags.
    flagged = {"amount": 900.0, "country": "BR", "ts": "2026-01-15T03:00:00Z"}
    records = [
        good_record,
        {**good_record, **flagged, "transaction_id": "t-2", "merchant_category": "electronics"},
    ]
    resp = post(f"{fraud_url}/predict", {"records": records})

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"predictions", "model", "request_id"}
    assert body["model"] == {"name": "fraud", "version": 1}
    assert [p["transaction_id"] for p in body["predictions"]] == ["t-1", "t-2"]
    for p in body["predictions"]:
        assert set(p) == {"transaction_id", "score", "label", "reasons"}
        assert 0.0 <= p["score"] <= 1.0
        assert isinstance(p["label"], bool)
        # Reasons explain a positive label; a negative one has none.
        assert len(p["reasons"]) == (3 if p["label"] else 0), p
        assert all(isinstance(r, str) for r in p["reasons"])
    assert [p["label"] for p in body["predictions"]] == [False, True]
    assert body["request_id"] == resp.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/healthz", {"live": True}),
        ("/v2/health/live", {"live": True}),
        ("/readyz", {"ready": True, "app": {"name": "fraud", "status": "RUNNING"}}),
        ("/v2/health/ready", {"ready": True}),
    ],
)
def test_health_probes(fraud_url: str, path: str, expected: Json):
    resp = requests.get(f"{fraud_url}{path}", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    assert resp.json() == expected


def test_models_lists_the_served_model_and_request_schema(fraud_url: str, fraud_spec: PipelineSpec):
    resp = requests.get(f"{fraud_url}/models", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["pipeline"] == "fraud"
    [model] = body["models"]
    assert (model["stage"], model["model"], model["version"], model["ref"]) == (
        "model",
        "fraud",
        1,
        "champion",
    )
    schema = body["request_schema"]
    assert set(schema["properties"]) == set(fraud_spec.request.fields)
    assert set(schema["required"]) == set(fraud_spec.request.fields) - {"country"}


def test_docs_page_is_html(fraud_url: str):
    resp = requests.get(f"{fraud_url}/docs", timeout=TIMEOUT)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert "openapi.json" in resp.text


def test_openapi_documents_the_spec_request_schema(fraud_url: str, fraud_spec: PipelineSpec):
    resp = requests.get(f"{fraud_url}/openapi.json", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    schemas = doc["components"]["schemas"]
    body_ref = doc["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    body = schemas[body_ref["schema"]["$ref"].rsplit("/", 1)[1]]
    assert body["properties"]["records"]["maxItems"] == fraud_spec.serve.max_records
    assert body["properties"]["records"]["minItems"] == 1
    fields = schemas["FraudRecord"]["properties"]
    assert set(fields) == set(fraud_spec.request.fields)
    assert fields["merchant_category"]["enum"] == list(
        fraud_spec.request.fields["merchant_category"].values or ()
    )
    assert (fields["amount"]["minimum"], fields["amount"]["maximum"]) == (0, 1_000_000)
    assert "Transaction amount" in fields["amount"]["description"]


def test_oip_model_metadata(fraud_url: str, fraud_spec: PipelineSpec):
    resp = requests.get(f"{fraud_url}/v2/models/fraud", timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    meta = resp.json()
    assert meta["name"] == "fraud"
    assert meta["versions"] == ["1"]
    inputs = {i["name"]: i["datatype"] for i in meta["inputs"]}
    assert inputs == {
        "transaction_id": "BYTES",
        "customer_id": "BYTES",
        "amount": "FP64",
        "merchant_category": "BYTES",
        "ts": "BYTES",
        "country": "BYTES",
    }
    assert [o["name"] for o in meta["outputs"]] == ["transaction_id", "score", "label", "reasons"]


# The good_record fixture as tensors, written as the Open Inference Protocol (KServe V2)
# documentation writes a request.
OIP_REQUEST = """\
{
  "id" : "42",
  "inputs" : [
    {
      "name" : "transaction_id",
      "shape" : [ 1 ],
      "datatype" : "BYTES",
      "data" : [ "t-1" ]
    },
    {
      "name" : "customer_id",
      "shape" : [ 1 ],
      "datatype" : "BYTES",
      "data" : [ "c000001" ]
    },
    {
      "name" : "amount",
      "shape" : [ 1 ],
      "datatype" : "FP64",
      "data" : [ 42.5 ]
    },
    {
      "name" : "merchant_category",
      "shape" : [ 1 ],
      "datatype" : "BYTES",
      "data" : [ "grocery" ]
    },
    {
      "name" : "ts",
      "shape" : [ 1 ],
      "datatype" : "BYTES",
      "data" : [ "2026-01-20T10:15:00Z" ]
    },
    {
      "name" : "country",
      "shape" : [ 1 ],
      "datatype" : "BYTES",
      "data" : [ "US" ]
    }
  ]
}
"""


def test_oip_infer_as_the_protocol_documents_it(fraud_url: str, good_record: Json):
    resp = requests.post(
        f"{fraud_url}/v2/models/fraud/infer",
        data=OIP_REQUEST,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert {k: body[k] for k in ("model_name", "model_version", "id")} == {
        "model_name": "fraud",
        "model_version": "1",
        "id": "42",
    }
    outputs = {o["name"]: o for o in body["outputs"]}
    assert list(outputs) == ["transaction_id", "score", "label", "reasons"]
    for out in outputs.values():
        assert set(out) == {"name", "shape", "datatype", "data"}
        assert out["shape"] == [1]
        assert len(out["data"]) == 1
    assert outputs["transaction_id"]["data"] == ["t-1"]
    # The same record through /predict gets the same answer.
    [expected] = post(f"{fraud_url}/predict", {"records": [good_record]}).json()["predictions"]
    assert outputs["score"] == {
        "name": "score",
        "shape": [1],
        "datatype": "FP64",
        "data": [expected["score"]],
    }
    assert outputs["label"]["data"] == [expected["label"]]
    assert outputs["reasons"]["data"] == [",".join(expected["reasons"])]


def test_oip_infer_returns_only_the_outputs_asked_for(fraud_url: str):
    request = {**json.loads(OIP_REQUEST), "outputs": [{"name": "score"}]}
    resp = post(f"{fraud_url}/v2/models/fraud/infer", request)
    assert resp.status_code == 200, resp.text
    assert [o["name"] for o in resp.json()["outputs"]] == ["score"]


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v2/models/nope"), ("POST", "/v2/models/nope/infer"), ("GET", "/no/such/path")],
)
def test_unknown_model_or_path_is_404(fraud_url: str, method: str, path: str):
    body = OIP_REQUEST if method == "POST" else None
    resp = requests.request(
        method,
        f"{fraud_url}{path}",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert_error(resp, 404, "not_found")


# --------------------------------------------------------------------------- request ids


@pytest.mark.parametrize("valid", [True, False], ids=["answer", "error"])
def test_client_request_id_is_echoed(fraud_url: str, good_record: Json, valid: bool):
    body = {"records": [good_record if valid else {**good_record, "amount": -1}]}
    resp = post(f"{fraud_url}/predict", body, headers={"X-Request-ID": "client-id-123"})
    assert resp.status_code == (200 if valid else 422), resp.text
    assert resp.headers["x-request-id"] == "client-id-123"
    assert resp.json()["request_id"] == "client-id-123"


def test_request_id_is_generated_when_not_sent(fraud_url: str, good_record: Json):
    first, second = (post(f"{fraud_url}/predict", {"records": [good_record]}) for _ in range(2))
    ids = [r.json()["request_id"] for r in (first, second)]
    assert ids == [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert all(ids)
    assert ids[0] != ids[1]


# --------------------------------------------------------------------------- client errors


@pytest.mark.parametrize(
    ("field", "value"),
    [
        pytest.param("amount", "lots", id="wrong-type"),
        pytest.param("amount", True, id="bool-for-number"),
        pytest.param("ts", "yesterday", id="bad-datetime"),
        pytest.param("amount", -0.01, id="below-range"),
        pytest.param("amount", 1_000_001, id="above-range"),
        pytest.param("country", "USA", id="too-long"),
        pytest.param("merchant_category", "casino", id="unknown-category"),
        pytest.param("customer_id", MISSING, id="missing-field"),
        pytest.param("customer_id", None, id="null-required-field"),
        pytest.param("coupon", "FREE", id="extra-field"),
    ],
)
def test_invalid_record_is_422_naming_record_and_field(
    fraud_url: str, good_record: Json, field: str, value: Any
):
    bad = {k: v for k, v in good_record.items() if k != field}
    if value is not MISSING:
        bad[field] = value
    records = [good_record, {**good_record, "transaction_id": "t-2"}, bad]

    error = assert_error(post(f"{fraud_url}/predict", {"records": records}), 422)
    assert {(d.get("record"), d.get("field")) for d in error["details"]} == {(2, field)}
    assert all(d["message"] for d in error["details"]), error


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param('{"records": [', "invalid_json", id="malformed-json"),
        pytest.param("", "invalid_json", id="empty-body"),
        pytest.param('{"records": []}', "invalid_request", id="no-records"),
        pytest.param("{}", "invalid_request", id="no-records-key"),
        pytest.param('[{"transaction_id": "t-1"}]', "invalid_request", id="not-an-object"),
        pytest.param('{"records": [1, "x"]}', "invalid_request", id="records-not-objects"),
    ],
)
def test_unusable_body_is_422(fraud_url: str, body: str, code: str):
    resp = requests.post(
        f"{fraud_url}/predict",
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert_error(resp, 422, code)


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"]
)
@pytest.mark.parametrize("path", ["/predict", "/v2/models/fraud/infer"])
def test_wrong_content_type_is_415(fraud_url: str, good_record: Json, content_type: str, path: str):
    resp = requests.post(
        f"{fraud_url}{path}",
        data=json.dumps({"records": [good_record]}),
        headers={"Content-Type": content_type},
        timeout=TIMEOUT,
    )
    error = assert_error(resp, 415, "unsupported_media_type")
    assert "application/json" in error["message"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_on_predict_is_405(fraud_url: str, method: str):
    resp = requests.request(method, f"{fraud_url}/predict", timeout=TIMEOUT)
    assert_error(resp, 405)


# --------------------------------------------------------------------------- limits


@pytest.fixture(scope="module")
def limits_url(extra_app: Callable[..., str]) -> str:
    return extra_app("e2e-limits", {"max_records": 3, "max_body_bytes": 2048})


def test_too_many_records_is_422(limits_url: str, good_record: Json):
    records = [{**good_record, "transaction_id": f"t-{i}"} for i in range(4)]
    error = assert_error(post(f"{limits_url}/predict", {"records": records}), 422)
    assert [d.get("field") for d in error["details"]] == ["records"]
    assert "3" in error["details"][0]["message"]
    # At the limit is fine.
    assert post(f"{limits_url}/predict", {"records": records[:3]}).status_code == 200


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_413(limits_url: str, good_record: Json, chunked: bool):
    records = [{**good_record, "transaction_id": f"t-{i}"} for i in range(30)]
    body = json.dumps({"records": records}).encode()
    assert len(body) > 2048
    data: Any = iter([body[i : i + 512] for i in range(0, len(body), 512)]) if chunked else body
    resp = requests.post(
        f"{limits_url}/predict",
        data=data,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )
    assert ("Transfer-Encoding" in resp.request.headers) is chunked
    error = assert_error(resp, 413, "payload_too_large")
    assert "2048" in error["message"]


# --------------------------------------------------------------------------- overload


def test_full_queue_is_503_with_retry_after(extra_app: Callable[..., str], good_record: Json):
    """A stage whose queue is full answers 503 at once. (The ingress does not merge
    requests here: merged, the 10 requests would be one call of the slow stage.)"""
    url = extra_app(
        "e2e-queue",
        {"ingress": {"batch": None}},
        slow_seconds=0.3,
        slow_serve={"max_ongoing_requests": 1, "max_queued_requests": 1, "batch": None},
    )
    start = threading.Barrier(10)

    def one(i: int) -> requests.Response:
        start.wait()
        record = {**good_record, "transaction_id": f"t-{i}"}
        return post(f"{url}/predict", {"records": [record]})

    with ThreadPoolExecutor(max_workers=10) as pool:
        responses = list(pool.map(one, range(10)))
    statuses = sorted(r.status_code for r in responses)

    assert set(statuses) == {200, 503}, statuses
    for resp in responses:
        if resp.status_code == 503:
            assert_error(resp, 503, "unavailable")
            assert int(resp.headers["retry-after"]) >= 1
    serve.delete("e2e-queue")


REVIEW_STAGE = """\
import stageline


class ManualReview:
    \"\"\"A user's business rule: round amounts go to manual review.\"\"\"

    def __call__(self, batch):
        out = batch.copy()
        return stageline.mark_errors(out, (out["amount"] % 100 == 0).to_numpy(), "review",
                                     "round amount: manual review")
"""


def test_a_row_a_stage_rejects_is_reported_per_record(
    serve_base: str, demo_home: Path, tmp_path: Path, good_record: Json
):
    (tmp_path / "review.py").write_text(REVIEW_STAGE)
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    data["stages"].insert(
        0, {"name": "review", "uses": "review.py:ManualReview", "serve": {"num_cpus": 0.1}}
    )
    data["serve"] = {"inline": [s["name"] for s in data["stages"]]}
    spec = tmp_path / "fraud.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    url = deploy_app(
        serve_base, "e2e-review", spec=str(spec), home=str(demo_home), api_key_env=UNSET_ENV
    )
    try:
        records = [good_record, {**good_record, "transaction_id": "t-round", "amount": 300.0}]
        resp = post(f"{url}/predict", {"records": records})
        assert resp.status_code == 200, resp.text
        scored, rejected = resp.json()["predictions"]
        assert scored["transaction_id"] == "t-1"
        assert 0.0 <= scored["score"] <= 1.0
        assert rejected == {
            "transaction_id": "t-round",
            "error": {"stage": "review", "message": "round amount: manual review"},
        }
        # Every record rejected: nothing to score is a 422 naming each record.
        only_bad = post(f"{url}/predict", {"records": records[1:]})
        error = assert_error(only_bad, 422, "rejected")
        assert error["details"] == [
            {"record": 0, "stage": "review", "message": "round amount: manual review"}
        ]
    finally:
        serve.delete("e2e-review")
