"""Fixtures shared by every test tier."""

# ruff: noqa: E402 - use_loopback() first, before anything here or in a test imports Ray

from __future__ import annotations

from stageline.localray import use_loopback

# Ray reads this setting once, when it is first imported: every local Ray this run
# starts (tests/integration's, `stageline serve` in a child process) stays on loopback.
use_loopback()

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pytest

from stageline import Pipeline
from stageline.demo.train import DemoResult, build_demo
from stageline.spec import PipelineSpec, load_spec
from tests.support.processes import OWN_SESSION, interrupt_on_sigterm, stop_group
from tests.support.processes import free_port as free_port  # re-exported for the tests

if TYPE_CHECKING:
    from tests.multinode import Cluster

S3_TEST_ENV = {
    # Any key works with the test S3 server; set, so the AWS SDK never looks further.
    "AWS_ACCESS_KEY_ID": "stageline-test",
    "AWS_SECRET_ACCESS_KEY": "stageline-test",
    "AWS_REGION": "us-east-1",
    # Never ask a cloud metadata service for credentials or a region.
    "AWS_EC2_METADATA_DISABLED": "true",
}
# Set before any Ray starts, so its workers inherit them too: a test's S3 client, in
# this process or a worker, talks to the test server only.
for _name, _value in S3_TEST_ENV.items():
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parents[1]
FRAUD_SPEC = ROOT / "pipelines" / "fraud.yaml"

# Small enough to build in ~1 s, large enough for the model to learn the rule.
SMALL_DEMO = {"customers": 800, "transactions": 20_000, "days": 30, "rounds": 60}


def pytest_configure(config: pytest.Config) -> None:
    # Tests start their processes in sessions of their own: a SIGTERM to this run (CI
    # cancelling, `timeout`) must interrupt it, so that they are stopped too.
    interrupt_on_sigterm()


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


@pytest.fixture
def demo_copy(demo: DemoResult, tmp_path: Path) -> Path:
    """A copy of the demo's home, this test's own: to register versions in, log to. Its
    prediction log starts empty (the session's servers log to the demo's home)."""
    copy = tmp_path / "home"
    shutil.copytree(demo.home, copy, ignore=shutil.ignore_patterns("logs", "reports"))
    return copy


@pytest.fixture(scope="session")
def fraud_pipeline(fraud_spec: PipelineSpec, demo_home: Path) -> Pipeline:
    return Pipeline(fraud_spec, demo_home)


@pytest.fixture(scope="session")
def holdout(demo: DemoResult) -> pd.DataFrame:
    return pd.read_parquet(demo.holdout)


GOOD_RECORD: dict[str, object] = {
    "transaction_id": "t-1",
    "customer_id": "c000001",
    "amount": 42.5,
    "merchant_category": "grocery",
    "ts": "2026-01-20T10:15:00Z",
    "country": "US",
}
"""One valid request record for the fraud spec."""


@pytest.fixture
def good_record() -> dict[str, object]:
    return dict(GOOD_RECORD)


def register_challenger(home: Path) -> int:
    """Register the champion's model again as a new version aliased ``challenger``."""
    from stageline.registry import LocalRegistry

    registry = LocalRegistry(home / "models")
    champion = registry.load("fraud")
    meta = champion.metadata
    return registry.register(
        "fraud",
        champion.booster,
        features=meta.features,
        encoders=meta.encoders,
        threshold=meta.threshold,
        aliases=["challenger"],
    ).version


# The ensemble example: the demo's champion and a second model, combined.
ENSEMBLE_SPEC = ROOT / "pipelines" / "fraud-ensemble.yaml"


@dataclass(frozen=True)
class EnsembleWorld:
    home: Path
    holdout: Path


@pytest.fixture(scope="session")
def ensemble_world(demo: DemoResult, tmp_path_factory: pytest.TempPathFactory) -> EnsembleWorld:
    """The demo's world with the ensemble's second model trained in, as the example's
    setup does on first use; a copy of its own, built once per session. Read-only."""
    from stageline.demo.world import ensure_ensemble

    home = tmp_path_factory.mktemp("ensemble-home") / "home"
    shutil.copytree(demo.home, home, ignore=shutil.ignore_patterns("logs", "reports"))
    ensure_ensemble(load_spec(ENSEMBLE_SPEC), home)
    return EnsembleWorld(home, demo.holdout)


# The second shipped example: delivery-time regression (pipelines/delivery/).
from typing import Protocol

DELIVERY_SPEC = ROOT / "pipelines" / "delivery.yaml"

# A second or so to build; the model still beats the mean by far.
SMALL_DELIVERY = {"orders": 5_000, "restaurants": 150, "days": 28, "rounds": 150}


class DeliveryWorld(Protocol):
    """What ``pipelines/delivery/world.py:build`` returns (its ``World``; that file is
    imported by path, as the spec names it, so its class is not importable here)."""

    @property
    def home(self) -> Path: ...

    @property
    def holdout(self) -> Path:
        """Held-out orders: the spec's request fields and the label ``minutes``."""
        ...

    @property
    def metrics(self) -> dict[str, float]: ...


def build_delivery(spec: PipelineSpec, home: Path, **sizes: int) -> DeliveryWorld:
    """Build the delivery example's world on ``home`` with the example's own builder."""
    from stageline.spec_classes import resolve_object

    build = resolve_object("delivery/world.py:build", spec.base_dir, attr="function")
    world: DeliveryWorld = build(spec, home, **sizes)
    return world


@pytest.fixture(scope="session")
def delivery_spec() -> PipelineSpec:
    return load_spec(DELIVERY_SPEC)


@pytest.fixture(scope="session")
def delivery_world(
    delivery_spec: PipelineSpec, tmp_path_factory: pytest.TempPathFactory
) -> DeliveryWorld:
    """The delivery example's world, test-sized, built once per session. Read-only."""
    return build_delivery(delivery_spec, tmp_path_factory.mktemp("delivery-home"), **SMALL_DELIVERY)


# --------------------------------------------------------------------------- Ray
# One local Ray per test session, started on first use (tests/unit never asks).


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray on loopback for the whole session, with the Serve settings
    ``stageline serve`` ships (its HTTP front aside); shut down at the end."""
    import ray

    from serve_app.local import SERVE_SETTINGS
    from stageline.localray import local_ray_options

    for key, value in SERVE_SETTINGS.items():
        os.environ.setdefault(key, value)
    ray.init(**local_ray_options(num_cpus=8, object_store_mb=256), log_to_driver=False)
    interrupt_on_sigterm()  # ray.init put its own handler (sys.exit) in its place
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


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A real redis-server on a free loopback port, in its own folder; this test
    session's own process, in a session of its own (tests/support/processes.py)."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.args = args
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Append-only with fsync: a restarted server has its data back, like production.
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", *self.args],
            stdout=subprocess.DEVNULL, **OWN_SESSION,
        )  # fmt: skip
        # Ready means answering PING, not merely listening: a restarted server
        # refuses reads while it loads its append-only file.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.settimeout(1)
                try:
                    s.connect(("127.0.0.1", self.port))
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not become ready on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, grace_s=10)
            self.process = None

    def pause(self) -> None:
        """Hang the server (SIGSTOP): clients see timeouts, as with an overloaded Redis."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        message = "redis-server is not installed (apt-get install redis-server; scripts/test does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.resume()
        server.stop()


# --------------------------------------------------------------------------- S3


class S3Server:
    """A real S3-compatible server (moto's) on a free loopback port; this test session's
    own process, in a session of its own (tests/support/processes.py)."""

    def __init__(self, workdir: Path, **env: str) -> None:
        self.port = free_port()
        self.log = workdir / "moto.log"
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import sys

        from bench.processes import start

        self.process = start(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            self.log,
            {**os.environ, **self.env},
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with socket.socket() as s:
                s.settimeout(1)
                try:
                    s.connect(("127.0.0.1", self.port))
                    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                    if s.recv(16).startswith(b"HTTP/1."):
                        return
                except OSError:
                    pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the S3 test server did not start; see {self.log}")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, grace_s=10)
            self.process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        import moto.server  # noqa: F401
    except ImportError:
        message = "moto[server] is not installed (pip install -e '.[dev]'; scripts/test does)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty bucket on the test S3 server, as ``s3://<bucket>``; the AWS
    variables of this test point at the server."""
    import uuid

    import pyarrow.fs as pafs

    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {**S3_TEST_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(
        endpoint_override=s3_server.endpoint, region="us-east-1", allow_bucket_creation=True
    ).create_dir(bucket)
    return f"s3://{bucket}"


# --------------------------------------------------------------------------- fault figures

_FIGURES: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep what each fault test printed (its load, fault and figures) for the summary."""
    if report.when == "call" and "faults" in report.keywords and report.capstdout.strip():
        _FIGURES.append((report.nodeid, report.capstdout.strip()))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """After a run, the figures every fault test printed, passed or not: CI's log
    then holds the measurements, not only the verdicts."""
    if _FIGURES:
        terminalreporter.section("fault figures")
        for nodeid, text in _FIGURES:
            terminalreporter.write_line(f"{nodeid}: {text}")


# --------------------------------------------------------------------------- several nodes


@pytest.fixture
def multinode(
    request: pytest.FixtureRequest,
    demo: DemoResult,
    redis_server: RedisServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    """A two-node Ray on this machine (tests/multinode.py): one per session, started by
    its first user and stopped after its last."""
    from tests.multinode import done_with_cluster, shared_cluster

    yield shared_cluster(request, demo, redis_server, tmp_path_factory)
    done_with_cluster(request)


def redis_spec(spec: PipelineSpec, url: str, **options: object) -> PipelineSpec:
    """``spec`` with its online store switched to Redis at ``url``."""
    # 2 s, not the 200 ms default: this shared 2-core machine is slow at times.
    return spec.with_online(url, **{"timeout_ms": 2000, **options})
