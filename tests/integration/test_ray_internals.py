"""Each dependence on Ray's internals (``serve_app.ray_internals``) against the Ray
installed: when an upgrade breaks one, the failure names it. No Ray is started."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import ray
from ray.serve import Deployment
from ray.serve.handle import DeploymentHandle

from serve_app import ray_internals
from serve_app.haproxy import serve_env

RAY = Path(ray.__file__).parent


def test_the_replica_grpc_bind_is_still_there_to_patch() -> None:
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    assert callable(bind), (
        f"keep_grpc_on_loopback: Ray no longer has {ray_internals.GRPC_BIND}; replicas' "
        "gRPC servers would listen on every interface: find where Ray binds them now"
    )
    assert list(inspect.signature(bind).parameters)[:2] == ["server", "address"], (
        f"keep_grpc_on_loopback: {ray_internals.GRPC_BIND} takes other arguments now"
    )
    source = inspect.getsource(replica)
    assert 'add_port_to_grpc_server(self._grpc_server, "[::]:0")' in source or (
        "add_port_to_grpc_server(" in source and "[::]:" in source
    ), f"keep_grpc_on_loopback: Ray no longer binds through {ray_internals.GRPC_BIND}"


def test_a_deployment_version_can_still_be_set() -> None:
    params = inspect.signature(Deployment.options).parameters
    assert {"version", "_internal"} <= set(params), (
        "versioned: Deployment.options no longer takes version with _internal=True; "
        "without a version every redeploy restarts every replica"
    )


def test_handles_still_take_by_reference() -> None:
    params = inspect.signature(DeploymentHandle.options).parameters
    assert "_by_reference" in params, (
        "by_reference: DeploymentHandle.options no longer takes _by_reference "
        "(spec serve.stage_calls)"
    )


def test_ray_still_reads_every_setting_we_set(tmp_path: Path) -> None:
    constants = (RAY / "serve" / "_private" / "constants.py").read_text()
    settings = {**ray_internals.SETTINGS, **serve_env(tmp_path)}
    ours = {name for name in settings if name.startswith("STAGELINE_")}
    unread = [name for name in set(settings) - ours if f'"{name}"' not in constants]
    assert unread == [], (
        f"SETTINGS / haproxy_settings: Ray Serve no longer reads {unread} "
        "(ray/serve/_private/constants.py): find the new name or drop the setting"
    )


def test_the_haproxy_template_still_has_what_the_wrapper_edits() -> None:
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    missing = [
        line for line in ray_internals.HAPROXY_TEMPLATE_LINES if line not in HAPROXY_CONFIG_TEMPLATE
    ]
    assert missing == [], (
        f"HAPROXY_WRAPPER: Ray's HAProxy template no longer has {missing}; the wrapper "
        "would leave Ray's plain-text errors and TCP stats ports in place"
    )


@pytest.mark.parametrize("name", ["_private", "_internal="])
def test_no_other_product_module_touches_ray_internals(name: str) -> None:
    root = Path(__file__).resolve().parents[2]
    hits = sorted(
        str(path.relative_to(root))
        for package in ("stageline", "serve_app", "batch_app", "stageline_cli")
        for path in (root / package).rglob("*.py")
        if name in path.read_text()
    )
    assert hits in ([], ["serve_app/ray_internals.py"]), (
        f"{name!r} outside serve_app/ray_internals.py: {hits}; move it there, labelled"
    )
    assert os.path.exists(root / "serve_app" / "ray_internals.py")
