"""The HTTP API without Ray: ``make_router`` over a ScoringService that runs the demo
pipeline's real stages in this process, called through httpx's ASGI transport.

Every status code a client can meet and its one error shape, ``/predict``, the Open
Inference Protocol (V2), the probes, ``/models`` and the OpenAPI page."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from serve_app.http import ApiKey
from serve_app.router import make_router
from stageline.features import StoreUnavailableError
from stageline.outputs import OutputContract
from stageline.pipeline import StageChain
from stageline.service import Chain, ChainRunner, ScoringService
from stageline.spec import PipelineSpec
from stageline.stage import StageStatus, mark_errors
from tests.conftest import GOOD_RECORD

Json = dict[str, Any]
KEY_ENV = "STAGELINE_TEST_ROUTER_KEY"


class Broken:
    """A stage chain that fails as a real one can: slow, a dependency down, a bug, or
    not answering its status."""

    def __init__(
        self,
        *,
        delay_s: float = 0.0,
        error: Exception | None = None,
        status_error: Exception | None = None,
    ) -> None:
        self.delay_s = delay_s
        self.error = error
        self.status_error = status_error
        self.calls = 0

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        self.calls += 1
        time.sleep(self.delay_s)
        if self.error is not None:
            raise self.error
        return batch

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        pass

    def status(self) -> dict[str, StageStatus]:
        if self.status_error is not None:
            raise self.status_error
        return {"broken": StageStatus(stage_class="Broken")}


def with_serve(spec: PipelineSpec, **options: Any) -> PipelineSpec:
    """``spec`` with some of ``serve``'s options changed."""
    keys = ("max_ongoing_requests", "max_queued_requests")
    ingress = {k: options.pop(k) for k in keys if k in options}
    serve = spec.serve.model_copy(
        update={**options, "ingress": spec.serve.ingress.model_copy(update=ingress)}
    )
    return spec.model_copy(update={"serve": serve})


def client(
    spec: PipelineSpec,
    home: Path,
    *,
    before: Chain | None = None,
    after: Chain | None = None,
    api_key: ApiKey | None = None,
) -> httpx.AsyncClient:
    """An HTTP client of ``make_router`` over the whole of ``spec`` run in process, with
    ``before`` run ahead of the stages and ``after`` behind them."""
    chains: list[Chain] = [StageChain(spec, [], home, validate=True)]
    chains += [before] if before is not None else []
    chains.append(StageChain(spec, [s.name for s in spec.stages], home))
    chains += [after] if after is not None else []
    service = ScoringService(spec, ChainRunner(chains, OutputContract(spec)))
    app = make_router(service, api_key or ApiKey(KEY_ENV))
    # As a server would: an exception the app answered with a 500 is not raised here.
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://app")


def call(
    spec: PipelineSpec, home: Path, method: str, path: str, body: Any = None, **kw: Any
) -> httpx.Response:
    headers = kw.pop("headers", {})
    content = kw.pop("content", None)
    if content is None and body is not None:
        content = json.dumps(body)
        headers = {"content-type": "application/json", **headers}

    async def go() -> httpx.Response:
        async with client(spec, home, **kw) as http:
            return await http.request(method, path, content=content, headers=headers)

    return asyncio.run(go())


def assert_error(resp: httpx.Response, status: int, code: str) -> Json:
    """Our one error shape; a 503 says when to retry."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json", resp.headers
    body = resp.json()
    assert set(body) == {"error", "request_id"}, body
    assert body["request_id"], body
    error = body["error"]
    assert set(error) <= {"status", "code", "message", "details"}, error
    assert (error["status"], error["code"]) == (status, code), error
    if status == 503:
        assert resp.headers["retry-after"] == "1", resp.headers
    return dict(error)


def records(*changes: Json) -> Json:
    return {
        "records": [{**GOOD_RECORD, "transaction_id": f"t{i}", **c} for i, c in enumerate(changes)]
    }


def test_predict_scores_like_the_pipeline_in_process(
    fraud_spec: PipelineSpec, demo_home: Path, fraud_pipeline: Any
) -> None:
    body = records({}, {"amount": 5000.0})
    resp = call(fraud_spec, demo_home, "POST", "/predict", body, headers={"x-request-id": "r-1"})
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    expected = fraud_pipeline.predict(pd.DataFrame(body["records"]))
    assert [p["transaction_id"] for p in answer["predictions"]] == ["t0", "t1"]
    assert [p["score"] for p in answer["predictions"]] == pytest.approx(list(expected["score"]))
    assert [p["label"] for p in answer["predictions"]] == list(expected["label"])
    assert answer["model"] == {"name": "fraud", "version": 1}
    assert answer["request_id"] == "r-1"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ('{"records": [', 422, "invalid_json"),
        ('{"records": [{"amount": NaN}]}', 422, "invalid_json"),
        ('{"records": []}', 422, "invalid_request"),
        ('{"records": [{"amount": 1}], "extra": 1}', 422, "invalid_request"),
    ],
)
def test_an_unusable_body_is_422(
    fraud_spec: PipelineSpec, demo_home: Path, body: str, status: int, code: str
) -> None:
    headers = {"content-type": "application/json"}
    resp = call(fraud_spec, demo_home, "POST", "/predict", content=body, headers=headers)
    assert_error(resp, status, code)


def test_an_invalid_field_is_422_naming_the_record_and_field(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    resp = call(fraud_spec, demo_home, "POST", "/predict", records({}, {"amount": -3}))
    details = assert_error(resp, 422, "invalid_request")["details"]
    assert [(d["record"], d["field"]) for d in details] == [(1, "amount")], details


class Review(Broken):
    """A stage that rejects round amounts, one row at a time, as a user's stage may."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return mark_errors(batch.copy(), batch["amount"] % 100 == 0, "review", "round amount")


def test_a_record_a_stage_rejects_is_reported_with_its_reason(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    body = records({"amount": 12.5}, {"amount": 300.0})
    answer = call(fraud_spec, demo_home, "POST", "/predict", body, before=Review()).json()
    scored, rejected = answer["predictions"]
    assert 0.0 <= scored["score"] <= 1.0, scored
    assert rejected == {
        "transaction_id": "t1",
        "error": {"stage": "review", "message": "round amount"},
    }
    only_bad = call(
        fraud_spec, demo_home, "POST", "/predict", records({"amount": 300.0}), before=Review()
    )
    error = assert_error(only_bad, 422, "rejected")
    assert error["details"] == [{"record": 0, "stage": "review", "message": "round amount"}]


def test_a_body_declared_as_other_than_json_is_415(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    headers = {"content-type": "text/csv"}
    resp = call(fraud_spec, demo_home, "POST", "/predict", content="a,b", headers=headers)
    assert_error(resp, 415, "unsupported_media_type")


def test_a_body_over_the_limit_is_413(fraud_spec: PipelineSpec, demo_home: Path) -> None:
    spec = with_serve(fraud_spec, max_body_bytes=1000)
    resp = call(spec, demo_home, "POST", "/predict", records(*[{}] * 20))
    assert_error(resp, 413, "payload_too_large")


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/no/such/path", 404, "not_found"),
        ("POST", "/v2/models/other/infer", 404, "not_found"),
        ("GET", "/predict", 405, "method_not_allowed"),
    ],
)
def test_unknown_paths_models_and_methods(
    fraud_spec: PipelineSpec, demo_home: Path, method: str, path: str, status: int, code: str
) -> None:
    resp = call(fraud_spec, demo_home, method, path, {"inputs": []})
    assert_error(resp, status, code)


def test_without_the_key_only_the_probes_answer(
    fraud_spec: PipelineSpec, demo_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "s3cret")
    resp = call(fraud_spec, demo_home, "POST", "/predict", records({}))
    assert_error(resp, 401, "unauthorized")
    resp = call(fraud_spec, demo_home, "GET", "/models", headers={"x-api-key": "wrong"})
    assert_error(resp, 401, "unauthorized")
    assert call(fraud_spec, demo_home, "GET", "/healthz").json() == {"live": True}
    resp = call(fraud_spec, demo_home, "GET", "/models", headers={"x-api-key": "s3cret"})
    assert resp.status_code == 200, resp.text


def test_a_dependency_down_is_503_with_retry_after(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    down = Broken(error=StoreUnavailableError("redis at 127.0.0.1:1: refused"))
    resp = call(fraud_spec, demo_home, "POST", "/predict", records({}), before=down)
    error = assert_error(resp, 503, "unavailable")
    assert "feature store is unavailable" in error["message"], error


def test_past_the_deadline_is_504_and_later_stages_never_run(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    spec = with_serve(fraud_spec, request_timeout_s=0.3)
    slow, behind = Broken(delay_s=1.0), Broken()
    resp = call(spec, demo_home, "POST", "/predict", records({}), before=slow, after=behind)
    assert_error(resp, 504, "deadline_exceeded")
    time.sleep(1.0)  # the abandoned call finishes in its thread; nothing runs after it
    assert (slow.calls, behind.calls) == (1, 0)


def test_a_bug_in_a_stage_is_500_naming_the_request(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    bug = Broken(error=ZeroDivisionError("division by zero"))
    resp = call(
        fraud_spec, demo_home, "POST", "/predict", records({}), before=bug,
        headers={"x-request-id": "r-bug"},
    )  # fmt: skip
    error = assert_error(resp, 500, "internal")
    assert "r-bug" in error["message"], error


def test_over_capacity_is_503_at_once(fraud_spec: PipelineSpec, demo_home: Path) -> None:
    spec = with_serve(fraud_spec, max_ongoing_requests=1, max_queued_requests=0)
    body = json.dumps(records({}))
    headers = {"content-type": "application/json"}

    async def go() -> list[httpx.Response]:
        async with client(spec, demo_home, before=Broken(delay_s=0.5)) as http:
            first = asyncio.create_task(http.post("/predict", content=body, headers=headers))
            await asyncio.sleep(0.1)
            second = await http.post("/predict", content=body, headers=headers)
            return [await first, second]

    first, second = asyncio.run(go())
    assert first.status_code == 200, first.text
    assert_error(second, 503, "unavailable")


def test_readiness_follows_the_stages(fraud_spec: PipelineSpec, demo_home: Path) -> None:
    ready = call(fraud_spec, demo_home, "GET", "/readyz")
    assert ready.json() == {"ready": True}
    mute = Broken(status_error=ConnectionError("replica gone"))
    for path in ("/readyz", "/v2/health/ready", "/v2/models/fraud/ready"):
        error = assert_error(
            call(fraud_spec, demo_home, "GET", path, before=mute), 503, "not_ready"
        )
        assert "replica gone" in error["message"], error


def test_models_and_openapi_describe_the_spec(fraud_spec: PipelineSpec, demo_home: Path) -> None:
    models = call(fraud_spec, demo_home, "GET", "/models").json()
    assert models["pipeline"] == "fraud"
    [model] = models["models"]
    assert (model["stage"], model["model"], model["version"], model["ref"]) == (
        "model", "fraud", 1, "champion",
    )  # fmt: skip
    assert set(models["request_schema"]["properties"]) == set(fraud_spec.request.fields)
    doc = call(fraud_spec, demo_home, "GET", "/openapi.json").json()
    assert "FraudRecord" in doc["components"]["schemas"], doc["components"]["schemas"].keys()


def test_oip_infer_metadata_and_health(fraud_spec: PipelineSpec, demo_home: Path) -> None:
    inputs = [
        {"name": f, "shape": [1], "datatype": "BYTES", "data": [GOOD_RECORD[f]]}
        for f in fraud_spec.request.fields
    ]
    body = {"id": "q1", "inputs": inputs, "outputs": [{"name": "score"}]}
    answer = call(fraud_spec, demo_home, "POST", "/v2/models/fraud/infer", body).json()
    assert (answer["id"], answer["model_version"]) == ("q1", "1"), answer
    [score] = answer["outputs"]
    assert (score["name"], score["datatype"], score["shape"]) == ("score", "FP64", [1])
    meta = call(fraud_spec, demo_home, "GET", "/v2/models/fraud").json()
    assert [o["name"] for o in meta["outputs"]] == ["transaction_id", "score", "label", "reasons"]
    assert meta["versions"] == ["1"]
    assert call(fraud_spec, demo_home, "GET", "/v2/health/live").json() == {"live": True}
    bad = call(fraud_spec, demo_home, "POST", "/v2/models/fraud/infer", {"inputs": "x"})
    assert_error(bad, 422, "invalid_request")


def test_the_openapi_page_documents_the_answer(fraud_spec: PipelineSpec, demo_home: Path) -> None:
    doc = call(fraud_spec, demo_home, "GET", "/openapi.json").json()
    answer = doc["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]
    assert answer["schema"]["$ref"].endswith("/FraudPredictAnswer"), answer
    item = doc["components"]["schemas"]["FraudPrediction"]["properties"]
    assert {"transaction_id", "error", "score", "label", "reasons"} <= set(item), item


def test_partial_scores_the_valid_records_and_answers_each_invalid_one(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    body = records({}, {"amount": -3}, {"merchant_category": "casino"})
    whole = call(fraud_spec, demo_home, "POST", "/predict", body)
    assert_error(whole, 422, "invalid_request")  # by default one bad record fails them all
    answer = call(fraud_spec, demo_home, "POST", "/predict?partial=true", body).json()
    good, negative, unknown = answer["predictions"]
    assert (good["transaction_id"], negative["transaction_id"], unknown["transaction_id"]) == (
        "t0",
        "t1",
        "t2",
    )
    assert 0.0 <= good["score"] <= 1.0, good
    assert negative["error"]["stage"] == "request", negative
    assert "amount" in negative["error"]["message"], negative
    assert "merchant_category" in unknown["error"]["message"], unknown
    assert answer["model"] == {"name": "fraud", "version": 1}
    none_valid = call(
        fraud_spec, demo_home, "POST", "/predict?partial=true", records({"amount": -1})
    )
    assert assert_error(none_valid, 422, "rejected")["details"][0]["stage"] == "request"
