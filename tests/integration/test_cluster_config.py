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

    spec = load_spec(args["spec"]).with_placement(args["placement"])
    expected = {s.name for s in spec.segments() if not s.inline} | {"ingress"}
    assert {d.name for d in built.deployments} == expected
    assert built.ingress_deployment_name == "ingress"
    assert {d.name for d in app_config.deployments} == expected


def test_the_config_ships_the_graph_and_every_deployment_autoscales(
    app_config: ServeApplicationSchema,
):
    """What a cluster runs: every deployment of the graph (a stage, or a group the spec
    fuses) with room to scale, the stages on their busy time (an override replaces the
    spec's autoscaling whole, so the policy must be in it), the ingress from one replica.
    The model and the feature lookup scale apart."""
    from serve_app.autoscaling import POLICY

    assert app_config.args["placement"] == "graph"
    spec = load_spec(ROOT / app_config.args["spec"]).with_placement("graph")
    segments = {s.name: s.stages for s in spec.segments()}
    assert not any(s.inline for s in spec.segments())
    assert {d.name for d in app_config.deployments} == {"ingress", *segments}
    (model,) = (name for name, stages in segments.items() if "model" in stages)
    assert "features" not in segments[model]
    for deployment in app_config.deployments:
        auto = override(app_config, deployment.name)["autoscaling_config"]
        assert auto["min_replicas"] < auto["max_replicas"], deployment.name
        policy = auto.get("policy", {}).get("policy_function")
        if deployment.name == "ingress":
            assert auto["min_replicas"] == 1
            assert policy is None
        else:
            assert policy == POLICY, deployment.name
    most = override(app_config, model)["autoscaling_config"]["max_replicas"]
    assert most == max(
        override(app_config, d.name)["autoscaling_config"]["max_replicas"]
        for d in app_config.deployments
    )


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

        # An operator pins the version in the config's user_config (of the deployment
        # the model stage runs in) and applies it again: it reloads, no replica restarts.
        replicas = replica_ids(name)
        pinned = 0
        for deployment in app["deployments"]:
            if "model" in deployment.get("user_config", {}).get("stages", {}):
                deployment["user_config"] = {"stages": {"model": {"version": 1}}}
                pinned += 1
        assert pinned == 1
        deploy(app)
        wait_for(lambda: served_model(url)["ref"] == 1, timeout=30, what="the model to be pinned")
        assert replica_ids(name) == replicas
    finally:
        delete_apps([name])


# --------------------------------------------------------------------------- KubeRay, VMs

KUBERAY = ROOT / "cluster" / "kuberay"
RAY_KINDS = {"RayService", "RayJob", "RayCronJob"}
ARGS_PER_SITE = {"spec", "home", "online", "api_key_file"}
"""What may differ between the laptop's Serve config and the cluster's: where files are."""


def manifests() -> dict[str, list[Json]]:
    return {
        p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
        for p in sorted(KUBERAY.glob("*.yaml"))
    }


def one(kind: str) -> Json:
    (found,) = [d for docs in manifests().values() for d in docs if d["kind"] == kind]
    return found


def cluster_specs(doc: Json) -> list[Json]:
    """The RayCluster specs a RayService, RayJob or RayCronJob brings up."""
    spec = doc["spec"]
    if doc["kind"] == "RayService":
        return [spec["rayClusterConfig"]]
    if doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]
    return [spec["rayClusterSpec"]]


def test_rayservice_embeds_the_serve_config_with_only_site_paths_changed(
    app_config: ServeApplicationSchema,
):
    service = one("RayService")
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    local = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    (app,) = embedded.applications

    assert embedded.proxy_location == local.proxy_location
    assert embedded.http_options.port == local.http_options.port
    assert embedded.http_options.host == "0.0.0.0"  # the pod's Service reaches the proxy
    mine, theirs = app.model_dump(exclude_unset=True), app_config.model_dump(exclude_unset=True)
    assert {k: v for k, v in mine.items() if k != "args"} == {
        k: v for k, v in theirs.items() if k != "args"
    }
    changed = {k for k in mine["args"].keys() | theirs["args"].keys()}
    changed = {k for k in changed if mine["args"].get(k) != theirs["args"].get(k)}
    assert changed <= ARGS_PER_SITE
    args = AppArgs.model_validate(app.args)
    assert Path(args.spec).parts[-2:] == Path(app_config.args["spec"]).parts[-2:]
    assert import_attr(app.import_path) is build_app
    assert args.online is not None
    spec = load_spec(ROOT / "pipelines" / Path(args.spec).name).with_online(args.online)
    assert spec.features.online.kind == "redis"


def test_kuberay_manifests_are_well_formed():
    import ray

    found = manifests()
    assert set(found) >= {"rayservice.yaml", "rayjob-batch.yaml", "raycronjob-batch.yaml"}
    for name, docs in found.items():
        for doc in docs:
            assert set(doc) >= {"apiVersion", "kind", "metadata", "spec"}, name
            assert doc["metadata"]["name"], name
            if doc["kind"] not in RAY_KINDS:
                continue
            assert doc["apiVersion"] == "ray.io/v1", name
            for cluster in cluster_specs(doc):
                assert cluster["rayVersion"] == ray.__version__, name
                assert cluster["authOptions"] == {"mode": "token"}, name
                groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
                for group in groups:
                    # KubeRay passes these to `ray start` as text
                    assert all(isinstance(v, str) for v in group["rayStartParams"].values())
                    pod = group["template"]["spec"]
                    volumes = {v["name"] for v in pod.get("volumes", [])}
                    for container in pod["containers"]:
                        assert container["image"] == "stageline:0.1.0", name
                        resources = container["resources"]
                        assert resources["requests"] == resources["limits"], name
                        mounts = {m["name"] for m in container.get("volumeMounts", [])}
                        assert mounts <= volumes, (name, mounts - volumes)
                for group in cluster["workerGroupSpecs"]:
                    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
                    (container,) = group["template"]["spec"]["containers"]
                    cpus = float(group["rayStartParams"]["num-cpus"])
                    assert cpus <= float(container["resources"]["limits"]["cpu"]), name


def test_rayservice_workers_hold_every_stage_at_its_max_replicas(
    app_config: ServeApplicationSchema,
):
    (cluster,) = cluster_specs(one("RayService"))
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    spec = load_spec(ROOT / app_config.args["spec"]).with_placement(app_config.args["placement"])
    built = {d.name: d for d in app_config.deployments}
    needed = 0.0
    for segment in [*spec.segments(), None]:
        if segment is not None and segment.inline:
            continue  # runs inside the ingress replica: no deployment of its own
        name = "ingress" if segment is None else segment.name
        options = override(app_config, name) if name in built else {}
        cpus = options.get("ray_actor_options", {}).get("num_cpus")
        auto = options.get("autoscaling_config", {})
        if segment is None:
            cpus = cpus if cpus is not None else spec.serve.ingress.num_cpus
            most = auto.get("max_replicas", spec.serve.ingress.autoscaling.max_replicas)
        else:
            stage = spec.stage(segment.stages[0]).serve
            cpus = cpus if cpus is not None else stage.num_cpus
            most = auto.get("max_replicas", stage.autoscaling.max_replicas)
        needed += cpus * most
    capacity = sum(
        float(g["rayStartParams"]["num-cpus"]) * g["maxReplicas"]
        for g in cluster["workerGroupSpecs"]
    )
    assert capacity >= needed > 0


def test_batch_rayjob_runs_the_batch_cli_and_the_nightly_one_is_the_same_job():
    import shlex

    from stageline_cli import build_parser

    job, nightly = one("RayJob"), one("RayCronJob")
    assert nightly["spec"]["jobTemplate"] == job["spec"]
    assert nightly["spec"]["schedule"].count(" ") == 4  # a cron expression
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "batch_app"]
    args = build_parser().parse_args(["batch", *argv[3:]])
    assert Path(args.spec).parts[-2:] == ("pipelines", "fraud.yaml")
    assert load_spec(ROOT / "pipelines" / "fraud.yaml").with_online(args.online)
    assert args.output.startswith(args.home)  # a shared volume: runs publish by rename
    service = one("RayService")["spec"]["serveConfigV2"]
    assert (
        AppArgs.model_validate(yaml.safe_load(service)["applications"][0]["args"]).online
        == args.online
    ), "serving and batch read the same online store"


def test_cluster_launcher_config_validates_against_rays_schema():
    import json

    import jsonschema  # type: ignore[import-untyped]
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    head = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head
    assert "--dashboard-host=127.0.0.1" in head
    assert all(
        "RAY_AUTH_MODE=token" in c for c in config["worker_start_ray_commands"] if "start" in c
    )
    assert config["available_node_types"][config["head_node_type"]]["resources"]["CPU"] == 0


def test_the_image_is_rays_own_at_our_ray_version():
    import ray

    base = (ROOT / "cluster" / "Dockerfile").read_text().split("FROM ", 1)[1].split()[0]
    assert base.startswith(f"rayproject/ray:{ray.__version__}-py3")
