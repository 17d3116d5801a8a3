"""``cluster/serve.yaml``: a valid Ray Serve config that deploys the demo app as written.

The deploy goes through Serve's declarative path, as ``serve run cluster/serve.yaml``
and ``serve deploy`` do: Serve imports ``import_path``, calls it with ``args`` and
applies the ``deployments:`` overrides itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from ray import serve
from ray._common.utils import import_attr
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as build_serve_app
from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

from serve_app import AppArgs, build_app
from stageline.spec import load_spec
from tests.conftest import ROOT
from tests.integration.serve_helpers import (
    TIMEOUT,
    Json,
    app_details,
    delete_apps,
    replica_ids,
    wait_for,
)

pytestmark = pytest.mark.integration

CONFIG = ROOT / "cluster" / "serve.yaml"


@pytest.fixture(scope="module")
def app_config() -> ServeApplicationSchema:
    """The config's one application, validated by Ray's own schema."""
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = config.applications
    return app


def config_args(app: ServeApplicationSchema, home: Path) -> Json:
    """The config's ``args`` as run from the repository root, serving ``home``."""
    args = dict(app.args)
    return {**args, "spec": str(ROOT / args["spec"]), "home": str(home)}


def override(app: ServeApplicationSchema, deployment: str) -> Json:
    """The options the config sets for ``deployment`` (only those it sets)."""
    (found,) = (d.model_dump(exclude_unset=True) for d in app.deployments if d.name == deployment)
    return found


def test_config_is_the_demo_app_on_loopback():
    config = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    assert config.http_options.host == "127.0.0.1"
    assert [(a.name, a.route_prefix) for a in config.applications] == [("fraud", "/")]


def test_import_path_is_the_typed_app_builder(app_config: ServeApplicationSchema):
    assert import_attr(app_config.import_path) is build_app
    args = AppArgs.model_validate(app_config.args)
    assert (ROOT / args.spec).is_file()


def test_overrides_name_deployments_that_build_app_creates(
    app_config: ServeApplicationSchema, demo_home: Path
):
    builder = import_attr(app_config.import_path)
    args = config_args(app_config, demo_home)
    app = call_user_app_builder_with_args_if_necessary(builder, args)
    built = build_serve_app(app, name="config-check")

    spec = load_spec(args["spec"])
    expected = {s.name for s in spec.segments() if not s.inline} | {"ingress"}
    assert {d.name for d in built.deployments} == expected
    assert built.ingress_deployment_name == "ingress"
    assert {d.name for d in app_config.deployments} <= expected


def deploy(app: Json) -> None:
    """Deploy one application config declaratively; wait until it runs."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None
    schema = ServeApplicationSchema.model_validate(app)
    client.deploy_apps(ServeDeploySchema(applications=[schema]))

    def running() -> bool:
        status = serve.status().applications.get(app["name"])
        if status is not None and status.status == "DEPLOY_FAILED":
            raise AssertionError(f"{app['name']} failed to deploy: {status.message}")
        return status is not None and status.status == "RUNNING"

    wait_for(running, timeout=90, what=f"{app['name']} to run")


def served_model(url: str) -> Json:
    (model,) = requests.get(f"{url}/models", timeout=TIMEOUT).json()["models"]
    return dict(model)


def test_app_deploys_from_the_config_and_reloads_the_model_in_place(
    serve_base: str,
    app_config: ServeApplicationSchema,
    demo_home: Path,
    good_record: Json,
):
    name = "config-fraud"
    url = f"{serve_base}/{name}"
    app: dict[str, Any] = {
        **app_config.model_dump(exclude_unset=True),
        "name": name,
        "route_prefix": f"/{name}",
        "args": config_args(app_config, demo_home),
    }
    deploy(app)
    try:
        deployments = app_details(name).deployments
        for wanted in app_config.deployments:
            options = override(app_config, wanted.name)
            applied = deployments[wanted.name].deployment_config
            assert applied.ray_actor_options.num_cpus == options["ray_actor_options"]["num_cpus"]
            autoscaling = applied.autoscaling_config
            assert isinstance(autoscaling, dict)
            for key, value in options.get("autoscaling_config", {}).items():
                assert autoscaling[key] == value, (wanted.name, key)
            if "user_config" in options:
                assert applied.user_config == options["user_config"]

        wait_for(
            lambda: requests.get(f"{url}/readyz", timeout=TIMEOUT).status_code == 200,
            timeout=30,
            what="the app to be ready",
        )
        resp = requests.post(f"{url}/predict", json={"records": [good_record]}, timeout=TIMEOUT)
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == {"name": "fraud", "version": 1}
        assert served_model(url)["ref"] == "champion"

        # An operator pins the version in the config's user_config and applies it again:
        # the model stage reloads, no replica restarts.
        replicas = replica_ids(name)
        for deployment in app["deployments"]:
            if deployment["name"] == "model":
                deployment["user_config"] = {"model": {"version": 1}}
        deploy(app)
        wait_for(lambda: served_model(url)["ref"] == 1, timeout=30, what="the model to be pinned")
        assert replica_ids(name) == replicas
    finally:
        delete_apps([name])
