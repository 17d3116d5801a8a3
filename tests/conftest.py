"""Fixtures shared by every test tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from stageline import Pipeline
from stageline.demo.train import DemoResult, build_demo
from stageline.spec import PipelineSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
FRAUD_SPEC = ROOT / "pipelines" / "fraud.yaml"

# Small enough to build in ~1 s, large enough for the model to learn the rule.
SMALL_DEMO = {"customers": 800, "transactions": 20_000, "days": 30, "rounds": 60}


@pytest.fixture(scope="session")
def fraud_spec() -> PipelineSpec:
    return load_spec(FRAUD_SPEC)


@pytest.fixture(scope="session")
def demo(fraud_spec: PipelineSpec, tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    """A demo world built once per test session. Treat it as read-only."""
    return build_demo(fraud_spec, tmp_path_factory.mktemp("demo-home"), **SMALL_DEMO)


@pytest.fixture(scope="session")
def demo_home(demo: DemoResult) -> Path:
    return demo.home


@pytest.fixture(scope="session")
def fraud_pipeline(fraud_spec: PipelineSpec, demo_home: Path) -> Pipeline:
    return Pipeline(fraud_spec, demo_home)


@pytest.fixture(scope="session")
def holdout(demo: DemoResult) -> pd.DataFrame:
    return pd.read_parquet(demo.holdout)


@pytest.fixture
def good_record() -> dict[str, object]:
    """One valid request record for the fraud spec."""
    return {
        "transaction_id": "t-1",
        "customer_id": "c000001",
        "amount": 42.5,
        "merchant_category": "grocery",
        "ts": "2026-01-20T10:15:00Z",
        "country": "US",
    }


# --------------------------------------------------------------------------- Ray
# One local Ray per test session, started on first use (tests/unit never asks).


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray on loopback for the whole session; shut down at the end."""
    import ray

    from stageline.localray import local_ray_options

    ray.init(**local_ray_options(num_cpus=8, object_store_mb=256), log_to_driver=False)
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()


@pytest.fixture(scope="session")
def serve_base(ray_session: None) -> str:
    """Serve's HTTP proxy on a free loopback port: ``http://127.0.0.1:PORT``."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy_app(serve_base: str, name: str, **args: object) -> str:
    """Deploy a stageline app as ``name`` at ``/name``; its base URL once it is running."""
    from ray import serve

    from serve_app import AppArgs, build_app

    serve.run(build_app(AppArgs.model_validate(args)), name=name, route_prefix=f"/{name}")
    return f"{serve_base}/{name}"


@pytest.fixture(scope="session")
def fraud_url(serve_base: str, demo_home: Path) -> str:
    """The demo pipeline served over HTTP (read-only: do not redeploy it)."""
    return deploy_app(serve_base, "fraud", spec=str(FRAUD_SPEC), home=str(demo_home))
