"""Fixtures shared by every test tier."""

from __future__ import annotations

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
