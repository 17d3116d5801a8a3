"""Case 4: the online feature store (Redis) stopped or hung for a few seconds under a
steady load: 503 with Retry-After within the deadline, never a hang or a 500, and full
recovery when it returns, without restarting anything."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import yaml

from stageline.features import materialize
from stageline.spec import PipelineSpec
from tests.conftest import GOOD_RECORD, RedisServer, deploy_app, redis_spec
from tests.faults.load import Attempt, Load
from tests.faults.online import TIMEOUT, TWO_REPLICAS, one_record
from tests.integration.serve_helpers import delete_apps

APP = "fault-redis"
OUTAGE_S = 3.0


@pytest.fixture(scope="module")
def redis_url(
    serve_base: str,
    fraud_spec: PipelineSpec,
    redis_server: RedisServer,
    demo_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """The shipped placement (two ingress replicas, every stage inline) on Redis."""
    spec = redis_spec(fraud_spec, redis_server.url, prefix="faults")
    materialize(spec, demo_home)
    data = spec.model_dump(mode="json", exclude_defaults=True)
    data["serve"] = {**data.get("serve", {}), "ingress": TWO_REPLICAS}
    path = tmp_path_factory.mktemp("redis-spec") / "fraud-redis.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    yield deploy_app(serve_base, APP, spec=str(path), home=str(demo_home))
    delete_apps([APP])


def predict(url: str) -> requests.Response:
    return requests.post(f"{url}/predict", json={"records": [GOOD_RECORD]}, timeout=TIMEOUT)


def assert_unavailable(attempt: Attempt) -> None:
    """A 503 as the README promises: Retry-After, the common JSON shape, the reason."""
    assert attempt.status == 503, attempt
    assert attempt.retry_after == "1", attempt
    assert '"code":"unavailable"' in attempt.body, attempt
    assert "feature store" in attempt.body, attempt


def stop_and_restart(server: RedisServer) -> Callable[[], None]:
    server.stop()
    return server.start


def pause_and_resume(server: RedisServer) -> Callable[[], None]:
    server.pause()
    return server.resume


FAULTS = {"stopped": stop_and_restart, "hung": pause_and_resume}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_feature_store_down_under_load(
    redis_url: str, redis_server: RedisServer, fraud_spec: PipelineSpec, fault: str
) -> None:
    """4 clients; Redis stopped (then restarted on the same data) or hung (SIGSTOP, then
    SIGCONT) for 3 s. Every answer is a 200 or a 503 naming the feature store, each one
    within the request deadline; once Redis is back, every request succeeds again, with
    the same predictions as before."""
    deadline = fraud_spec.serve.request_timeout_s
    healthy = predict(redis_url)
    assert healthy.status_code == 200, healthy.text
    load = Load(f"{redis_url}/predict", one_record, concurrency=4, max_seconds=60)
    load.start()
    try:
        load.wait_for(lambda r: r.statuses()[200] >= 20, 30, "20 answers before the fault")
        down_at = load.now()
        back = FAULTS[fault](redis_server)
        time.sleep(OUTAGE_S)
    finally:
        back()
    back_at = load.now()
    recovered = load.wait_for(
        lambda r: any(a.ok for a in r.between(back_at)), 30, "an answer after Redis returned"
    )
    first_ok = min(a.started for a in recovered.between(back_at) if a.ok)
    load.wait(3)
    report = load.stop()
    after = report.between(first_ok)

    during = report.between(down_at, back_at)
    unavailable = [a for a in report.attempts if a.status == 503]
    print(
        f"\ncase 4 feature store {fault}: load 4 clients closed loop, no retry; fault Redis "
        f"{fault} for {OUTAGE_S:g} s at {down_at:.1f} s; {report.summary()}; "
        f"{len(during)} requests during the outage, 503s {len(unavailable)}, slowest answer "
        f"{max(a.latency for a in report.attempts):.2f} s (deadline {deadline:g} s); first "
        f"200 {first_ok - back_at:.2f} s after Redis returned; after that {len(after)} "
        f"requests, failed {len(report.failures(after))} (timeline {report.timeline()})"
    )
    assert set(report.statuses()) <= {200, 503}, report.statuses()
    assert unavailable, "no request noticed the outage"
    for attempt in unavailable:
        assert_unavailable(attempt)
    assert all(a.latency < deadline for a in report.attempts)  # no hang
    assert report.failures(after) == [], report.failures(after)[:3]
    assert len(after) > 0
    recovered_answer = predict(redis_url)
    assert recovered_answer.status_code == 200, recovered_answer.text
    assert recovered_answer.json()["predictions"] == healthy.json()["predictions"]


def test_liveness_does_not_depend_on_the_feature_store(
    redis_url: str, redis_server: RedisServer
) -> None:
    """Liveness is about the server, not its dependencies: /healthz is 200 with Redis down."""
    redis_server.stop()
    try:
        assert predict(redis_url).status_code == 503
        assert requests.get(f"{redis_url}/healthz", timeout=TIMEOUT).status_code == 200
    finally:
        redis_server.start()
    assert predict(redis_url).status_code == 200
