"""Security (issue 7, cases 11 to 13): the API key guards every endpoint but the probes
and is never written anywhere; bad model files never replace the model being served;
the local Ray control plane takes no unauthenticated call and listens on loopback only.

Also part of case 13, beside the cluster they need: the Jobs API refusing a call without
the token and what a multi-node cluster leaves open (tests/e2e/test_multinode.py, marked
``faults``). The registry's own refusals, file by file, are unit tests
(tests/unit/test_registry.py); here they meet a running app.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from serve_app.http import EXEMPT_PATHS, ApiKey
from serve_app.router import make_router
from stageline.outputs import OutputContract
from stageline.registry import LocalRegistry
from stageline.service import ChainRunner, ScoringService
from stageline.spec import load_spec
from tests.conftest import FRAUD_SPEC, GOOD_RECORD, deploy_app, register_challenger
from tests.e2e.test_http import OIP_REQUEST, UNSET_ENV, assert_error
from tests.faults.load import Load
from tests.faults.online import one_record, running_replicas
from tests.integration.serve_helpers import (
    delete_apps,
    fraud_variant,
    predict,
    replica_ids,
    wait_for,
)
from tests.model_files import flip_a_byte, huge_sparse_file, replace_model_bytes, truncate
from tests.support.processes import descendants, listening, process_name

pytestmark = pytest.mark.faults

TIMEOUT = 30.0
API_KEY = "faults-s3cret-key-4e7a9c01"
AUTH_APP = "faults-auth"
Json = dict[str, Any]

WRONG_KEYS: dict[str, dict[str, str]] = {
    "missing": {},
    "wrong-x-api-key": {"X-API-Key": "wrong"},
    "wrong-bearer": {"Authorization": "Bearer wrong"},
    "no-bearer-scheme": {"Authorization": API_KEY},
    "basic-scheme": {"Authorization": f"Basic {API_KEY}"},
    "wrong-case": {"X-API-Key": API_KEY.upper()},
    "one-character-short": {"X-API-Key": API_KEY[:-1]},
    "empty": {"X-API-Key": ""},
}
RIGHT_KEYS = {"x-api-key": {"X-API-Key": API_KEY}, "bearer": {"Authorization": f"Bearer {API_KEY}"}}


# --------------------------------------------------------------------------- case 11


@pytest.fixture(scope="module")
def auth_url(
    serve_base: str, demo_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An app with an API key (from a file) and the access log on: every request is
    written to the replica's and the proxy's logs, where the key must not be."""
    folder = tmp_path_factory.mktemp(AUTH_APP)
    key_file = folder / "api-key"
    key_file.write_text(API_KEY + "\n")
    spec = fraud_variant(folder / "spec", serve={"access_log": True})
    yield deploy_app(
        serve_base,
        AUTH_APP,
        spec=str(spec),
        home=str(demo_home),
        api_key_env=UNSET_ENV,
        api_key_file=str(key_file),
    )
    delete_apps([AUTH_APP])


def endpoints(url: str) -> list[tuple[str, str]]:
    """(method, path) of every route of the app: its OpenAPI document (fetched with the
    key) and the pages FastAPI adds itself (``/docs``, ``/redoc``, ...), which the
    document does not list; ``{name}`` is the served model."""
    doc = requests.get(f"{url}/openapi.json", headers=RIGHT_KEYS["x-api-key"], timeout=TIMEOUT)
    assert doc.status_code == 200, doc.text
    found = {(m.upper(), p) for p, methods in doc.json()["paths"].items() for m in methods}
    spec = load_spec(FRAUD_SPEC)
    nothing = ScoringService(spec, ChainRunner([], OutputContract(spec)))
    framework = make_router(nothing, ApiKey(UNSET_ENV))  # the routes it adds
    for route in framework.routes:
        methods = getattr(route, "methods", None) or ()
        found |= {(m, str(getattr(route, "path", ""))) for m in methods if m != "HEAD"}
    return sorted((m, p.replace("{name}", "fraud")) for m, p in found)


def call(url: str, method: str, path: str, headers: dict[str, str]) -> requests.Response:
    """``method path`` as a client that means it: a valid body where one is expected."""
    body = None
    if path == "/predict":
        body = json.dumps({"records": [GOOD_RECORD]})
    elif path.endswith("/infer"):
        body = OIP_REQUEST
    headers = {"Content-Type": "application/json", **headers}
    return requests.request(method, url + path, data=body, headers=headers, timeout=TIMEOUT)


def test_every_endpoint_but_the_probes_refuses_a_missing_or_wrong_key(auth_url: str) -> None:
    routes = endpoints(auth_url)
    guarded = [(m, p) for m, p in routes if p not in EXEMPT_PATHS]
    assert {("POST", "/predict"), ("GET", "/models"), ("GET", "/docs")} <= set(guarded)
    unknown = [("GET", "/no/such/path"), ("POST", "/v2/models/fraud/infer/extra")]
    refused: Counter[str] = Counter()
    for method, path in [*guarded, *unknown]:
        for name, headers in WRONG_KEYS.items():
            resp = call(auth_url, method, path, headers)
            assert_error(resp, 401, "unauthorized")
            assert resp.headers["www-authenticate"] == "Bearer", (method, path, name)
            assert API_KEY not in resp.text
            refused[f"{method} {path}"] += 1
        served = call(auth_url, method, path, RIGHT_KEYS["bearer"])
        assert served.status_code not in (401, 500), (method, path, served.text)
    for method, path in routes:
        if path in EXEMPT_PATHS:
            assert call(auth_url, method, path, {}).status_code == 200, (method, path)
    print(
        f"API key on: {len(guarded)} guarded routes of {len(routes)} (+{len(unknown)} unknown "
        f"paths) x {len(WRONG_KEYS)} wrong keys: {sum(refused.values())} requests, all 401; "
        f"{len(routes) - len(guarded)} probes open"
    )


@pytest.mark.parametrize("headers", list(RIGHT_KEYS.values()), ids=list(RIGHT_KEYS))
def test_right_api_key_is_served(auth_url: str, headers: dict[str, str]) -> None:
    resp = call(auth_url, "POST", "/predict", headers)
    print(f"the right key as {', '.join(headers)}: {resp.status_code}")
    assert resp.status_code == 200, resp.text
    assert [p["transaction_id"] for p in resp.json()["predictions"]] == [
        GOOD_RECORD["transaction_id"]
    ]
    assert API_KEY not in resp.text


@pytest.mark.parametrize("path", EXEMPT_PATHS)
def test_health_probes_need_no_api_key(auth_url: str, path: str) -> None:
    resp = requests.get(f"{auth_url}{path}", timeout=TIMEOUT)
    print(f"{path} without a key: {resp.status_code}")
    assert resp.status_code == 200, resp.text


def test_the_key_never_appears_in_error_bodies_or_logs(auth_url: str) -> None:
    """Requests that carry the key (right or nearly right) and fail in every way a client
    can make them fail: the key is in no answer, and in no log file of this Ray session
    (the access log is on, so every one of these requests is logged)."""
    import ray

    probes: list[tuple[str, str, Any, str | None, dict[str, str]]] = [
        ("POST", "/predict", "{", "application/json", RIGHT_KEYS["bearer"]),
        ("POST", "/predict", '{"records": []}', "application/json", RIGHT_KEYS["x-api-key"]),
        ("POST", "/predict", json.dumps({"records": [{**GOOD_RECORD, "amount": API_KEY}]}),
         "application/json", RIGHT_KEYS["x-api-key"]),
        ("POST", "/predict", "{}", "text/plain", RIGHT_KEYS["x-api-key"]),
        ("POST", "/predict", b"[" * 2_000_000, "application/json", RIGHT_KEYS["x-api-key"]),
        ("GET", "/predict", None, None, RIGHT_KEYS["x-api-key"]),
        ("GET", "/v2/models/nope", None, None, RIGHT_KEYS["x-api-key"]),
        ("GET", "/models", None, None, {"X-API-Key": API_KEY + "x"}),
        ("GET", "/models", None, None, {"Authorization": f"Bearer {API_KEY[:-1]}"}),
    ]  # fmt: skip
    statuses = []
    for i, (method, path, body, content_type, headers) in enumerate(probes):
        headers = {**headers, "X-Request-ID": f"key-probe-{i}"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        resp = requests.request(method, auth_url + path, data=body, headers=headers, timeout=30)
        statuses.append(resp.status_code)
        assert resp.status_code >= 400, resp.text[:300]
        assert_error(resp, resp.status_code)
        assert API_KEY[:-1] not in resp.text, (path, resp.text[:300])  # nor the key itself

    node = ray._private.worker._global_node
    assert node is not None
    logs = Path(node.get_logs_dir_path())

    def logged() -> dict[str, int]:
        """How many log lines carry each of our request ids, and the key."""
        found: Counter[str] = Counter()
        for file in logs.rglob("*"):
            if file.is_file():
                text = file.read_bytes()
                found["key"] += text.count(API_KEY[:-1].encode())
                for i in range(len(probes)):
                    found[f"key-probe-{i}"] += text.count(f"key-probe-{i}".encode())
        return dict(found)

    deadline = time.monotonic() + 30
    while not all(logged().get(f"key-probe-{i}") for i in range(len(probes))):
        assert time.monotonic() < deadline, f"our requests are not in the logs: {logged()}"
        time.sleep(1)
    found = logged()
    files = sum(1 for f in logs.rglob("*") if f.is_file())
    print(
        f"{len(probes)} failing requests carrying the key (statuses {statuses}): key in 0 "
        f"answers; {files} log files of the session scanned, our requests on "
        f"{sum(v for k, v in found.items() if k != 'key')} lines, the key on {found['key']}"
    )
    assert found["key"] == 0


# --------------------------------------------------------------------------- case 12

BAD_VERSIONS: dict[str, tuple[Any, str]] = {
    # alias: (what is done to its version's model file, what the refusal says)
    "pickled": (
        lambda r, v: replace_model_bytes(r, pickle.dumps({"booster": [1]}, protocol=5), v),
        "is a Python pickle; stageline never loads pickle",
    ),
    "truncated": (truncate, "bytes but its metadata.json records"),
    "tampered": (flip_a_byte, "has sha256"),
    "huge": (
        lambda r, v: huge_sparse_file(r, v, claimed=True),
        "is 1073741824 bytes, over the 536870912-byte limit on model files, and was not read",
    ),
}


def refused(url: str, alias: str) -> Json | None:
    """The model stage's report once it has refused ``fraud@alias``, else None."""
    (model,) = requests.get(f"{url}/models", timeout=TIMEOUT).json()["models"]
    error = model["load_error"] or ""
    return dict(model) if error.startswith(f"fraud@{alias}: ") else None


def peak_rss_mib(pid: int) -> float:
    """The most memory the process ever had resident (``VmHWM``), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for process {pid}")


def test_bad_model_files_are_refused_and_the_serving_model_stays(
    serve_base: str, demo_home: Path, tmp_path: Path
) -> None:
    """A running app is pointed (``model=fraud@<alias>``, a reload in place through
    ``user_config``) at a pickle, a truncated file, a file whose sha256 differs from its
    metadata and a 1 GiB file that claims to be the model. Each is refused with a clear
    error in ``/models``; under a steady load, every request is still answered by v1,
    with the same scores, and no replica restarts."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    registry = LocalRegistry(home / "models")
    for alias, (spoil, _says) in BAD_VERSIONS.items():
        version = register_challenger(home)
        spoil(registry, version)
        registry.set_alias("fraud", alias, version)

    name = "faults-model-files"
    args: Json = {"spec": str(fraud_variant(tmp_path / "spec")), "home": str(home)}
    args["api_key_env"] = UNSET_ENV
    url = deploy_app(serve_base, name, **args)
    records = [{**GOOD_RECORD, "transaction_id": f"t-{i}", "amount": 10.0 * i} for i in range(5)]
    expected = predict(url, records)
    assert {v for *_, v in expected.values()} == {1}
    replicas = replica_ids(name)
    (replica,) = running_replicas(name, "ingress")
    peak_before = peak_rss_mib(replica.pid)
    load = Load(f"{url}/predict", one_record, concurrency=2, max_seconds=240).start()
    refusals = {}
    try:
        for alias, (_spoil, says) in BAD_VERSIONS.items():
            deploy_app(serve_base, name, **args, model=f"fraud@{alias}")
            model = wait_for(lambda a=alias: refused(url, a), 30, f"fraud@{alias} refused")
            refusals[alias] = model["load_error"].split(") ", 1)[-1][:48]  # after the file
            assert (model["version"], model["ref"]) == (1, "champion"), model
            assert says in model["load_error"], model
            assert predict(url, records) == expected
        replicas_after = replica_ids(name)
        grown = peak_rss_mib(replica.pid) - peak_before
    finally:
        report = load.stop()
        delete_apps([name])

    answered = Counter(re.findall(r'"version":(\d+)', "".join(a.body for a in report.attempts)))
    print(
        f"4 bad model versions swapped in under load ({report.summary()}): all refused "
        f"({'; '.join(f'{a}: {why}...' for a, why in refusals.items())}); answered by "
        f"versions {dict(answered)}; replica peak memory {grown:+.0f} MiB"
    )
    assert report.failures() == []
    assert set(report.statuses()) == {200}
    assert set(answered) == {"1"}
    assert replicas_after == replicas  # in place: no replica restarted
    assert grown < 256, f"the replica's peak memory grew {grown:.0f} MiB: the 1 GiB file was read"


# --------------------------------------------------------------------------- case 13


def test_local_ray_takes_no_call_without_the_token(ray_session: None) -> None:
    """Local mode, as ``stageline serve`` and ``stageline batch`` start Ray: token
    authentication on. A client without the token (or with a wrong one) is refused by
    the GCS, the control plane every other Ray API goes through; with it, it is served.
    (No process of a local Ray serves the Jobs API: the next test asks every port.)"""
    import ray

    gcs = ray.get_runtime_context().gcs_address
    code = (
        "from ray._raylet import GcsClient\n"
        f"print(len(GcsClient(address={gcs!r}).get_all_node_info(timeout=20)))\n"
    )
    outcomes = {}
    for name, env in {
        "no token": {"RAY_AUTH_MODE": "disabled"},
        "wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
        "the token": {},
    }.items():
        client = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=120,
        )
        outcomes[name] = client
    refused = {k: c for k, c in outcomes.items() if k != "the token"}
    answers = {
        k: "refused (InvalidAuthToken)"
        if "InvalidAuthToken" in c.stderr
        else f"exit {c.returncode}"
        for k, c in outcomes.items()
    }
    print(f"local GCS {gcs}: " + ", ".join(f"{k}: {a}" for k, a in answers.items()))
    for name, client in refused.items():
        assert client.returncode != 0, (name, client.stdout)
        assert "InvalidAuthToken" in client.stderr, (name, client.stderr[-2000:])
    assert outcomes["the token"].returncode == 0, outcomes["the token"].stderr[-2000:]


def test_local_ray_and_serve_listen_on_loopback_only(fraud_url: str) -> None:
    """Every TCP listener of this session's local Ray (as stageline starts it): GCS,
    raylet, object manager, agents, the Serve controller, proxy and replicas, workers.
    Nothing beyond 127.0.0.1, and none of them serves the Jobs API (Ray's head process
    runs without its dashboard; its port answers Prometheus metrics only). (``stageline
    serve`` itself, in HAProxy mode with its stats and metrics ports, is checked the same
    way in tests/e2e/test_cli_serve.py.)"""
    assert requests.get(f"{fraud_url}/healthz", timeout=TIMEOUT).status_code == 200
    # Not the multi-node cluster's nodes (`ray start`, also children of this process).
    clusters = {
        p
        for pid in descendants(os.getpid())
        if b"ray\0start" in _cmdline(pid)
        for p in descendants(pid)
    }
    pids = [p for p in descendants(os.getpid()) if p not in clusters]
    sockets = listening(pids)
    by_process = Counter(process_name(pid) for _addr, _port, pid in sockets)
    beyond = [(a, p, process_name(pid)) for a, p, pid in sockets if a not in ("127.0.0.1", "::1")]
    print(
        f"local mode: {len(sockets)} listening sockets in {len(set(by_process))} kinds of "
        f"process ({', '.join(f'{k} x{n}' for k, n in sorted(by_process.items()))}); "
        f"beyond loopback: {beyond or 'none'}"
    )
    with ThreadPoolExecutor(max_workers=8) as pool:
        jobs = [p for p, answer in zip(sockets, pool.map(jobs_api, sockets), strict=True) if answer]
    print(f"local mode: a Jobs API on {len(jobs)} of the {len(sockets)} ports")
    assert {"gcs_server", "raylet"} <= set(by_process), by_process
    assert beyond == []
    assert jobs == []


def jobs_api(socket: tuple[str, int, int]) -> bool:
    """Whether the listener answers ``GET /api/jobs/`` with a list of jobs."""
    address, port, _pid = socket
    try:
        resp = requests.get(f"http://{address}:{port}/api/jobs/", timeout=3)
        return resp.status_code == 200 and isinstance(resp.json(), list)
    except (requests.RequestException, ValueError):
        return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""
