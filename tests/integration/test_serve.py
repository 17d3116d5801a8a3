"""The demo pipeline as a Ray Serve application on the session's local Ray.

Every app here has a name of its own and is deleted when its test is done.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
import requests
import xgboost as xgb
import yaml
from ray import serve

from serve_app import AppArgs, build_app
from serve_app.app import deployment as stage_deployment
from serve_app.autoscaling import POLICY
from serve_app.router import admission_limit
from stageline import Pipeline
from stageline.pipeline import StageChain
from stageline.registry import LocalRegistry
from stageline.spec import IngressSpec, PipelineSpec, Segment, StageServeSpec, load_spec
from tests.conftest import deploy_app
from tests.integration.serve_helpers import (
    TIMEOUT,
    Json,
    Scored,
    app_details,
    client_records,
    delete_apps,
    fraud_variant,
    in_process,
    predict,
    replica_ids,
    wait_for,
)
from tests.model_files import flip_a_byte, model_file

pytestmark = pytest.mark.integration

STAGES = ["features", "transform", "model", "postprocess"]

PLACEMENTS: dict[str, tuple[Json, set[str]]] = {
    # placement id: (the spec's serve: options, the deployments Serve runs)
    "per-stage": ({"inline": []}, {*STAGES, "ingress"}),
    # Stage deployments called over gRPC here, as Ray actors (the default) in the rest.
    "fused": (
        {"inline": [], "fuse": [STAGES], "stage_calls": "grpc"},
        {"features+postprocess", "ingress"},
    ),
    "mixed": (
        {"inline": ["features"], "fuse": [["transform", "model"]]},
        {"transform+model", "postprocess", "ingress"},
    ),
    "inline": ({"inline": STAGES}, {"ingress"}),
}
BATCH_OVERRIDE_APP = "batch-override"
"""The features stage alone, its batching overridden in ``user_config``."""
BATCH_OVERRIDE = {"batch": {"max_size": 4, "wait_ms": 300}}

SLOW_MODEL = '''\
"""The demo model made slow, like a heavier model: the autoscaler has to react."""

import time

from stageline.stages.model import XGBoostPredictor


class SlowPredictor(XGBoostPredictor):
    def process(self, batch):
        time.sleep(0.1 * len(batch))
        return super().process(batch)
'''


@pytest.fixture(scope="module")
def apps(
    serve_base: str,
    fraud_spec: PipelineSpec,
    demo_home: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """Each placement of the demo spec, deployed at once (Serve starts the replicas
    side by side); ``{name: url}``. They are only ever sent one record per request,
    so a stage called with more rows is Serve merging concurrent requests."""
    variants = {f"placement-{p}": serve_options for p, (serve_options, _) in PLACEMENTS.items()}
    targets = []
    for name, serve_options in variants.items():
        spec = fraud_variant(tmp_path_factory.mktemp(name), serve=serve_options)
        app = build_app(AppArgs(spec=str(spec), home=str(demo_home)))
        targets.append(serve.RunTarget(app, name=name, route_prefix=f"/{name}"))
    segment = Segment("features", ("features",))
    features = stage_deployment(fraud_spec, segment, str(demo_home), None).options(
        user_config=BATCH_OVERRIDE
    )
    app = features.bind(fraud_spec, ["features"], str(demo_home))
    targets.append(serve.RunTarget(app, name=BATCH_OVERRIDE_APP, route_prefix=None))
    serve.run_many(targets)
    try:
        yield {name: f"{serve_base}/{name}" for name in variants}
    finally:
        delete_apps([t.name for t in targets])


@pytest.fixture(scope="module")
def sample(holdout: pd.DataFrame, fraud_spec: PipelineSpec) -> pd.DataFrame:
    """100 held-out transactions as requests, a few from customers the store lacks."""
    frame = holdout[list(fraud_spec.request.fields)].head(100).reset_index(drop=True)
    unknown = frame.index % 25 == 4
    frame.loc[unknown, "customer_id"] = [f"c-new-{i}" for i in frame.index[unknown]]
    return frame


def predict_each(url: str, records: list[Json], clients: int) -> dict[str, Scored]:
    """Every record in a request of its own, from ``clients`` concurrent clients."""
    with ThreadPoolExecutor(max_workers=clients) as pool:
        answers = list(pool.map(lambda r: predict(url, [r]), records))
    return {k: v for answer in answers for k, v in answer.items()}


# --------------------------------------------------------------------------- deployments


def test_one_running_deployment_per_stage_with_the_spec_autoscaling(
    apps: dict[str, str], tmp_path: Path
):
    """Serve runs the demo as the spec says: a healthy deployment per stage, each with
    the spec's autoscaling bounds, CPUs and concurrency limit."""
    name = "placement-per-stage"
    status = serve.status().applications[name]
    assert status.status == "RUNNING", status.message
    assert set(status.deployments) == {*STAGES, "ingress"}
    for deployment, overview in status.deployments.items():
        assert overview.status == "HEALTHY", (deployment, overview.message)
        assert set(overview.replica_states) == {"RUNNING"}, (deployment, overview.replica_states)

    details = app_details(name).deployments
    deployed = load_spec(fraud_variant(tmp_path, serve=PLACEMENTS["per-stage"][0]))
    spec: dict[str, StageServeSpec | IngressSpec] = {s: deployed.stage(s).serve for s in STAGES}
    for deployment, options in {**spec, "ingress": deployed.serve.ingress}.items():
        scaling = options.autoscaling
        expected = scaling.model_dump(exclude={"target_busy", "look_back_s"})
        expected["look_back_period_s"] = scaling.look_back_s
        config = details[deployment].deployment_config
        autoscaling = cast(dict[str, Any], config.autoscaling_config)
        assert {k: autoscaling[k] for k in expected} == expected, deployment
        # Stages scale on their busy time at the spec's target; the ingress on requests.
        policy: dict[str, Any] = autoscaling.get("policy") or {}
        if deployment == "ingress":
            assert POLICY not in str(policy), policy
        else:
            assert policy["policy_function"] == POLICY, (deployment, policy)
            assert policy["policy_kwargs"] == {"target": scaling.target_busy}, deployment
        assert config.ray_actor_options.num_cpus == options.num_cpus, deployment
        if deployment == "ingress":
            # The ingress turns requests away itself (our JSON 503) before Serve would.
            limit = admission_limit(deployed)
            assert limit is not None
            assert config.max_ongoing_requests > limit
            assert config.max_queued_requests > limit
        else:
            assert config.max_ongoing_requests == options.max_ongoing_requests, deployment
        running = len(details[deployment].replicas)
        assert expected["min_replicas"] <= running <= expected["max_replicas"], deployment


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placement_never_changes_results(
    apps: dict[str, str],
    placement: str,
    sample: pd.DataFrame,
    fraud_pipeline: Pipeline,
):
    """Whichever stages share a deployment or run in the ingress, every caller gets the
    very same answer as in process, and Serve runs the deployments the spec places."""
    name = f"placement-{placement}"
    assert set(serve.status().applications[name].deployments) == PLACEMENTS[placement][1]

    served = predict_each(apps[name], client_records(sample), clients=8)
    expected = in_process(fraud_pipeline, sample)
    assert len(served) == len(expected) == len(sample)
    assert {k: v for k, v in served.items() if v != expected[k]} == {}


# --------------------------------------------------------------------------- batching


def test_concurrent_single_record_requests_are_batched_and_scored_exactly(
    apps: dict[str, str], sample: pd.DataFrame, fraud_pipeline: Pipeline
):
    """One record per request, 16 clients at once: the model stage is called with several
    requests merged into one frame, and every caller still gets exactly its own answer."""
    name = "placement-per-stage"
    served = predict_each(apps[name], client_records(sample), clients=16)
    expected = in_process(fraud_pipeline, sample)
    assert len(served) == len(expected) == len(sample)
    assert {k: v for k, v in served.items() if v != expected[k]} == {}

    model = serve.get_deployment_handle("model", app_name=name)
    replicas = len(app_details(name).deployments["model"].replicas)
    # Each call reaches one replica; ask often enough to hear from every one.
    reports = [model.status.remote().result(timeout_s=TIMEOUT) for _ in range(4 * replicas)]
    max_rows = max(r["max_batch_rows"] for r in reports)
    print(f"model replicas: {replicas}, max rows per model call: {max_rows}")
    assert max_rows > 1, reports


def test_batching_override_in_user_config_is_honoured(
    apps: dict[str, str], fraud_spec: PipelineSpec, demo_home: Path, sample: pd.DataFrame
):
    """``user_config: {batch: {max_size: 4}}`` caps how many requests share one call."""
    frames = [validated(fraud_spec, demo_home, sample.iloc[[i]]) for i in range(16)]
    handle = serve.get_deployment_handle("features", app_name=BATCH_OVERRIDE_APP)
    responses = [handle.remote(f) for f in frames]  # all in flight at once
    served = [r.result(timeout_s=TIMEOUT) for r in responses]

    report = handle.status.remote().result(timeout_s=TIMEOUT)
    assert report["max_batch_rows"] == 4
    assert report["batches"] == 4
    reference = StageChain(fraud_spec, ["features"], demo_home)
    for frame, out in zip(frames, served, strict=True):
        pd.testing.assert_frame_equal(out, reference(frame))


def validated(spec: PipelineSpec, home: Path, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` as the ingress hands it to the first stage: validated and typed."""
    records = pd.DataFrame.from_records(client_records(frame))
    return StageChain(spec, [], home, validate=True)(records)


# --------------------------------------------------------------------------- autoscaling


def test_model_stage_scales_up_under_load(
    serve_base: str, demo_home: Path, tmp_path: Path, good_record: Json
):
    """A slow model stage at ``min_replicas: 1`` gets more replicas under 16 concurrent
    clients, and no client sees an error meanwhile.

    Stages scale on their replicas' busy share (``target_busy``), not on requests in
    flight: the slow model sleeps 0.1 s per row, so at a few requests a second it is busy
    most of the time whatever the machine's speed, and ``target_busy: 0.3`` asks for a
    second replica from 3 req/s. The ingress does not merge requests here
    (``ingress.batch: null``), so the model sees them as they come.

    The request deadline is raised to 20 s: the claim is that scaling loses no request.
    On a slow shared machine, 16 clients queued behind one slow replica while another
    starts can wait past the default 5 s, and that 504 is the deadline doing its job,
    not a request lost to the scaling."""
    spec = fraud_variant(
        tmp_path,
        serve={
            "inline": ["features", "transform", "postprocess"],
            "ingress": {"batch": None},
            "request_timeout_s": 20,
        },
        stages={
            "model": {
                "uses": "slow_model.py:SlowPredictor",
                "serve": {
                    "num_cpus": 0.25,
                    "autoscaling": {
                        "min_replicas": 1,
                        "max_replicas": 3,
                        "target_busy": 0.3,
                        "look_back_s": 3,
                        "upscale_delay_s": 0,
                    },
                    "batch": {"max_size": 64, "wait_ms": 2},
                },
            }
        },
        files={"slow_model.py": SLOW_MODEL},
    )
    name = "autoscale"
    url = deploy_app(serve_base, name, spec=str(spec), home=str(demo_home))
    try:
        assert len(replica_ids(name)["model"]) == 1
        stop = threading.Event()
        codes: list[int] = []

        def client() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    resp = session.post(
                        f"{url}/predict", json={"records": [good_record]}, timeout=TIMEOUT
                    )
                    codes.append(resp.status_code)

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            clients = [pool.submit(client) for _ in range(16)]
            try:
                running = wait_for(
                    lambda: len(replica_ids(name)["model"]) > 1 and replica_ids(name)["model"],
                    timeout=40,
                    what="the model deployment to start a second replica under load",
                    interval=0.5,
                )
            finally:
                stop.set()
            for c in clients:
                c.result()
        target = app_details(name).deployments["model"].target_num_replicas
        print(
            f"model replicas 1 -> {len(running)} running (target {target}) after "
            f"{time.monotonic() - started:.1f} s of 16 clients, {len(codes)} requests"
            f" ({len(codes) / (time.monotonic() - started):.0f}/s)"
        )
        assert set(codes) == {200}, Counter(codes)
    finally:
        delete_apps([name])


# --------------------------------------------------------------------------- hot swap


def register_another_model(registry: LocalRegistry) -> int:
    """A different small model with v1's features, order and encoders; its version."""
    v1 = registry.resolve("fraud", "champion")
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, len(v1.features))).astype(np.float32)
    y = (x[:, 0] + rng.normal(scale=0.5, size=len(x)) > 0).astype(np.float32)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 2, "nthread": 1},
        xgb.DMatrix(x, y, feature_names=list(v1.features)),
        num_boost_round=5,
    )
    meta = registry.register(
        "fraud", booster, features=v1.features, encoders=v1.encoders, threshold=0.5
    )
    return meta.version


@pytest.mark.parametrize("placement", ["per-stage", "inline"])
def test_model_swaps_in_place_under_load_and_a_tampered_version_is_refused(
    serve_base: str, demo_home: Path, tmp_path: Path, good_record: Json, placement: str
):
    """``model=fraud@2`` on a running app: the model stage (its own deployment, or run in
    the ingress) reloads in place, not one request fails; a tampered v3 is refused and
    v2 keeps serving."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    registry = LocalRegistry(home / "models")
    assert register_another_model(registry) == 2
    assert register_another_model(registry) == 3
    v3_file = model_file(registry, 3)
    flip_a_byte(registry, 3)

    name = f"hot-swap-{placement}"
    spec = fraud_variant(tmp_path / "spec", serve=PLACEMENTS[placement][0])
    args: Json = {"spec": str(spec), "home": str(home)}
    url = deploy_app(serve_base, name, **args)
    log: list[tuple[str, int, int | None]] = []  # (phase, status, model version)
    phase = "v1"
    stop = threading.Event()

    def client() -> None:
        deadline = time.monotonic() + 60
        with requests.Session() as session:
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    resp = session.post(
                        f"{url}/predict", json={"records": [good_record]}, timeout=TIMEOUT
                    )
                except requests.RequestException:
                    log.append((phase, -1, None))
                    continue
                version = resp.json()["model"]["version"] if resp.status_code == 200 else None
                log.append((phase, resp.status_code, version))

    def answered(after: int, version: int, count: int) -> bool:
        return sum(1 for *_, v in log[after:] if v == version) >= count

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    try:
        wait_for(lambda: answered(0, 1, 10), 20, "10 answers from version 1")
        replicas = replica_ids(name)

        phase, mark = "swap to v2", len(log)
        swap_started = time.monotonic()
        deploy_app(serve_base, name, **args, model="fraud@2")
        swap_s = time.monotonic() - swap_started
        wait_for(lambda: answered(mark, 2, 10), 20, "10 answers from version 2")

        phase, mark = "swap to tampered v3", len(log)
        deploy_app(serve_base, name, **args, model="fraud@3")
        wait_for(lambda: len(log) >= mark + 10, 20, "10 answers after the v3 redeploy")
        (refused,) = requests.get(f"{url}/models", timeout=TIMEOUT).json()["models"]

        phase, mark = "back to the spec's champion", len(log)
        deploy_app(serve_base, name, **args)
        wait_for(lambda: answered(mark, 1, 10), 20, "10 answers from version 1 again")
        (back,) = requests.get(f"{url}/models", timeout=TIMEOUT).json()["models"]
        replicas_after = replica_ids(name)
    finally:
        stop.set()
        thread.join(timeout=TIMEOUT)
        delete_apps([name])

    failed = [entry for entry in log if entry[1] != 200]
    counts = Counter(entry[0] for entry in log)
    print(f"{placement}: requests {dict(counts)}, failed {len(failed)}, swap {swap_s:.1f} s")
    assert failed == []
    versions = {p: [v for phase, _, v in log if phase == p] for p in counts}
    assert switches(versions["v1"], 1, 1)
    assert switches(versions["swap to v2"], 1, 2)
    assert switches(versions["swap to tampered v3"], 2, 2)  # v3 refused, v2 kept serving
    assert switches(versions["back to the spec's champion"], 2, 1)
    assert replicas_after == replicas  # in place: not one replica restarted

    assert refused["version"] == 2
    assert "fraud@3" in refused["load_error"]
    assert str(v3_file) in refused["load_error"]
    assert "sha256" in refused["load_error"]
    assert (back["version"], back["ref"], back["load_error"]) == (1, "champion", None)


def switches(versions: list[int | None], old: int, new: int) -> bool:
    """Whether ``versions`` is ``old`` answers, then only ``new`` ones (no flapping)."""
    k = next((i for i, v in enumerate(versions) if v != old), len(versions))
    return all(v == new for v in versions[k:])


def test_the_local_placement_refuses_outputs_no_stage_gives_at_start(
    tmp_path: Path, fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    """What ``stageline serve`` runs by default (every stage in the ingress, each in a
    chain of its own) refuses a spec whose declared outputs its stages do not give, as
    the in-process pipeline does: when the replica starts, not on every request."""
    from serve_app.ingress import placement_runner
    from stageline.spec import SpecError

    data = fraud_spec.model_dump(mode="json", exclude_none=True)
    data["outputs"] = [{"name": "score", "type": "float"}, {"name": "eta", "type": "float"}]
    path = tmp_path / "fraud.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(path)
    assert len(spec.stages) > 1
    assert all(s.inline for s in spec.segments())
    with pytest.raises(SpecError, match=r"declares output\(s\) \['eta'\] that no stage"):
        placement_runner(spec, str(demo_home), [])

    assert placement_runner(fraud_spec, str(demo_home), []) is not None
