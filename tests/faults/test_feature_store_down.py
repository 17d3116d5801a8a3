"""Redis down or hung under a real Serve app: 503 with Retry-After, never a hang or
a 500, and full recovery when it returns, without restarting anything."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from ray import serve

from stageline.features import materialize
from stageline.spec import PipelineSpec
from tests.conftest import RedisServer, deploy_app, redis_spec

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def redis_url(
    serve_base: str,
    fraud_spec: PipelineSpec,
    redis_server: RedisServer,
    demo_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    spec = redis_spec(fraud_spec, redis_server.url, prefix="e2e")
    materialize(spec, demo_home)
    path = tmp_path_factory.mktemp("redis-spec") / "fraud-redis.yaml"
    path.write_text(
        yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False)
    )
    yield deploy_app(serve_base, "fraud-redis", spec=str(path), home=str(demo_home))
    serve.delete("fraud-redis")


def predict(url: str, record: dict[str, object]) -> requests.Response:
    return requests.post(f"{url}/predict", json={"records": [record]}, timeout=30)


def assert_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    body = response.json()
    assert body["error"]["code"] == "unavailable"
    assert "feature store" in body["error"]["message"]
    assert body["request_id"] == response.headers["x-request-id"]


def test_redis_hung_then_back(
    redis_url: str, redis_server: RedisServer, good_record: dict[str, object]
) -> None:
    healthy = predict(redis_url, good_record)
    assert healthy.status_code == 200, healthy.text
    redis_server.pause()
    try:
        started = time.monotonic()
        outage = [predict(redis_url, good_record) for _ in range(3)]
        # Each answer came from the store's own timeout, well inside the request deadline.
        assert time.monotonic() - started < 3 * 5
    finally:
        redis_server.resume()
    for response in outage:
        assert_unavailable(response)
    recovered = predict(redis_url, good_record)
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["predictions"] == healthy.json()["predictions"]


def test_redis_stopped_then_restarted(
    redis_url: str, redis_server: RedisServer, good_record: dict[str, object]
) -> None:
    healthy = predict(redis_url, good_record)
    redis_server.stop()
    try:
        assert_unavailable(predict(redis_url, good_record))
        # Liveness is about the server, not its dependencies.
        assert requests.get(f"{redis_url}/healthz", timeout=30).status_code == 200
    finally:
        redis_server.start()
    recovered = predict(redis_url, good_record)
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["predictions"] == healthy.json()["predictions"]
