"""The prediction log of the HTTP API, without Ray: ``make_router`` over a service whose
runner logs each finished frame (as the Serve ingress builds it), called through httpx's
ASGI transport. Every answered record is logged once, with the request id the client
got, its fields, the features the model received, the model and its outputs; a slow or
unwritable sink fails no request and counts what it drops."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

import stageline.predlog as predlog
from serve_app.http import ApiKey
from serve_app.router import make_router
from stageline.pipeline import StageChain
from stageline.predlog import PredictionLog, read_log, scored_rows
from stageline.service import ChainRunner, LoggedContract, ScoringService
from stageline.spec import PipelineSpec
from tests.conftest import GOOD_RECORD

KEY_ENV = "STAGELINE_TEST_PREDLOG_KEY"


def with_log(spec: PipelineSpec, **options: Any) -> PipelineSpec:
    return spec.model_copy(
        update={"prediction_log": spec.prediction_log.model_copy(update=options)}
    )


class Server:
    """The router over the whole pipeline in process, logging to ``home``'s log."""

    def __init__(self, spec: PipelineSpec, home: Path, log_home: Path) -> None:
        self.spec = spec
        self.dropped: dict[str, int] = {}
        self.log = PredictionLog(
            log_home,
            pipeline=spec.name,
            spec=spec.prediction_log,
            on_drop=self._count,
            prepare=scored_rows,
        )
        chains = [
            StageChain(spec, [], home, validate=True),
            StageChain(spec, [s.name for s in spec.stages], home),
        ]
        service = ScoringService(spec, ChainRunner(chains, LoggedContract(spec, self.log)))
        self.app = make_router(service, ApiKey(KEY_ENV))

    def _count(self, n: int, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + n

    def post_all(self, bodies: list[dict[str, Any]]) -> list[tuple[httpx.Response, float]]:
        """Every body posted to /predict at once; each response with its latency."""

        async def one(
            http: httpx.AsyncClient, body: dict[str, Any]
        ) -> tuple[httpx.Response, float]:
            started = time.perf_counter()
            resp = await http.post("/predict", json=body)
            return resp, time.perf_counter() - started

        async def go() -> list[tuple[httpx.Response, float]]:
            transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
                return list(await asyncio.gather(*(one(http, b) for b in bodies)))

        return asyncio.run(go())


def bodies(n: int, per_request: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "records": [
                {**GOOD_RECORD, "transaction_id": f"t{i}-{j}", "amount": 10.0 + i + j}
                for j in range(per_request)
            ]
        }
        for i in range(n)
    ]


def test_every_answered_record_is_logged_once_with_its_request_id_features_and_outputs(
    fraud_spec: PipelineSpec, demo_home: Path, tmp_path: Path
) -> None:
    server = Server(fraud_spec, demo_home, tmp_path)
    sent = bodies(30, per_request=2)
    answers = server.post_all(sent)
    assert server.log.close()

    assert all(resp.status_code == 200 for resp, _ in answers)
    logged = read_log(server.log.location)
    assert len(logged) == 60
    by_id = logged.set_index("transaction_id")
    for resp, _ in answers:
        answer = resp.json()
        for prediction in answer["predictions"]:
            row = by_id.loc[prediction["transaction_id"]]
            assert row["request_id"] == answer["request_id"]
            assert row["score"] == pytest.approx(prediction["score"])
            assert row["label"] == prediction["label"]
            assert list(row["reasons"]) == prediction["reasons"]
    # The request's fields, the features the model received, the model, the latency.
    first = logged.iloc[0]
    assert {*fraud_spec.request.fields, "avg_amount_30d", "amount_to_avg"} <= set(logged.columns)
    assert (first["model_name"], first["model_version"]) == ("fraud", 1)
    assert logged["error"].isna().all()
    assert (logged["latency_ms"] > 0).all()
    assert (logged["latency_ms"] < 30_000).all()
    assert logged["request_id"].nunique() == 30
    assert not [c for c in logged.columns if c.startswith("_")]
    assert server.dropped == {}


def test_a_sampled_log_keeps_whole_requests(
    fraud_spec: PipelineSpec, demo_home: Path, tmp_path: Path
) -> None:
    server = Server(with_log(fraud_spec, sample=0.5), demo_home, tmp_path)
    answers = server.post_all(bodies(60, per_request=2))
    assert server.log.close()

    logged = read_log(server.log.location)
    kept = logged.groupby("request_id").size()
    assert (kept == 2).all()  # a request is logged whole or not at all
    assert 15 <= len(kept) <= 45
    assert set(kept.index) <= {resp.json()["request_id"] for resp, _ in answers}


def test_a_slow_sink_fails_no_request_and_counts_its_drops(
    fraud_spec: PipelineSpec, demo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = predlog.write_parquet

    def stuck(fs: Any, path: str, table: Any) -> None:
        release.wait(30)  # a sink that hangs until the test lets it go
        real(fs, path, table)

    monkeypatch.setattr(predlog, "write_parquet", stuck)
    spec = with_log(fraud_spec, max_buffered_rows=4, flush_rows=2, flush_interval_s=0.05)
    server = Server(spec, demo_home, tmp_path)
    try:
        answers = server.post_all(bodies(40))
    finally:
        release.set()
    assert server.log.close()

    assert [resp.status_code for resp, _ in answers] == [200] * 40
    slowest = max(latency for _, latency in answers)
    assert slowest < spec.serve.request_timeout_s, f"a request took {slowest:.2f} s"
    assert server.dropped["full"] >= 40 - 4
    assert server.log.written_rows + server.log.dropped_rows == 40
    assert len(read_log(server.log.location)) == server.log.written_rows


def test_an_unwritable_sink_fails_no_request_and_counts_its_drops(
    fraud_spec: PipelineSpec, demo_home: Path, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("not a folder")
    spec = with_log(fraud_spec, uri=str(tmp_path / "a-file" / "logs"))
    server = Server(spec, demo_home, tmp_path)
    answers = server.post_all(bodies(20))
    server.log.close()

    assert [resp.status_code for resp, _ in answers] == [200] * 20
    assert server.dropped == {"write_failed": 20}
    assert server.log.written_rows == 0


def test_logging_off_logs_nothing_and_answers_the_same(
    fraud_spec: PipelineSpec, demo_home: Path, tmp_path: Path
) -> None:
    on = Server(fraud_spec, demo_home, tmp_path / "on")
    off = Server(with_log(fraud_spec, enabled=False), demo_home, tmp_path / "off")
    sent = bodies(5)
    got = [[r.json()["predictions"] for r, _ in s.post_all(sent)] for s in (on, off)]
    on.log.close()
    off.log.close()
    assert got[0] == got[1]
    assert len(read_log(on.log.location)) == 5
    assert len(read_log(off.log.location)) == 0
    assert pd.Series([p[0]["score"] for p in got[0]]).nunique() > 1  # the records differ
