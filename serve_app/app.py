"""``build_app``: the typed Serve application builder.

``serve run cluster/serve.yaml``, ``serve deploy`` and ``stageline serve`` all
come through here. One deployment per segment of the spec (a stage, or a
fused group), named after it, so a Serve config's ``deployments:`` section
lines up with the spec's stage names.
"""

# No `from __future__ import annotations`: Ray reads `build_app`'s parameter annotation
# at run time to turn a Serve config's `args:` into AppArgs; a string would not do.

import contextlib
import hashlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application, Deployment

from serve_app import autoscaling
from serve_app.deployment import StageDeployment
from serve_app.http import RETRY_AFTER_S, ApiKey
from serve_app.ingress import Ingress
from serve_app.ray_internals import versioned
from serve_app.router import admission_limit
from stageline.context import resolve_home
from stageline.registry import parse_model_ref
from stageline.service import UserConfig
from stageline.spec import (
    AutoscalingSpec,
    PipelineSpec,
    Placement,
    Segment,
    StageServeSpec,
    load_spec,
    resolve_class,
)
from stageline.spec_challenger import ChallengerMode, ChallengerSpec
from stageline.stage import Reloadable

INGRESS = "ingress"

ROLLOUT: dict[str, Any] = {"max_surge_percent": 100}
"""Every deployment's rolling update. Serve's default stops an old replica before it
starts the replacement: with one replica that is an outage, and a new version that
never starts (a stage's ``__init__`` raising) leaves fewer replicas serving. With a
100% surge every old replica serves until its replacement is ready, and stays if the
new version fails. The price: twice the replicas' resources while a rollout runs
(override per deployment with ``max_surge_percent`` in a Serve config)."""

SHUTDOWN: dict[str, Any] = {"graceful_shutdown_wait_loop_s": 0.2}
"""A replica being stopped (a stop, a scale-down, a rollout) checks for requests still
in flight every 0.2 s instead of Serve's 2 s, so it goes as soon as the last one is
answered; how long it may wait stays Serve's ``graceful_shutdown_timeout_s``."""

OVERLOAD: dict[str, Any] = {
    "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S}
}
"""A request over a deployment's queue limit (``max_queued_requests``) is a 503 with
``Retry-After``. Behind the ingress, a stage's is our JSON 503 (the ingress answers it).
The ingress's own limit is a backstop only (Serve answers it in plain text: its proxy,
or in HAProxy mode the replica, which HAProxy rewrites to our JSON): the ingress turns
requests away first (:func:`ingress_limits`)."""


def ingress_limits(spec: PipelineSpec) -> tuple[int, int]:
    """Serve's ``max_ongoing_requests`` and ``max_queued_requests`` of the ingress.

    The ingress takes :func:`~serve_app.router.admission_limit` requests per replica
    and answers the next at once with our JSON 503 (``AdmissionMiddleware``). Serve's
    own limits are above that, so a request over capacity meets the ingress's limit, not
    Serve's, whose 503 is plain text (HAProxy turns a replica's into ours; Serve's proxy
    cannot):

    - ongoing, twice the limit: room in each replica for as many rejections under way;
    - queued, eight times the limit: Serve's proxy counts a request as queued until it
      has chosen a replica, which takes a round trip per request even when a replica has
      room, and a while for all of them at once on a busy host. At twice the limit, one
      request in about 700 got Serve's plain 503 in a CI run at 5x capacity on a slow
      day. A queued request holds a few KiB in the proxy; the bound only stops a flood.
    """
    ingress = spec.serve.ingress
    limit = admission_limit(spec)
    if limit is None:
        return ingress.max_ongoing_requests, ingress.max_queued_requests
    return 2 * limit, 8 * limit


class ChallengerArgs(BaseModel):
    """A challenger set on a running app (``stageline serve --challenger``), in place of
    what the spec's model stages say."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(examples=["fraud@challenger", "fraud@3"])
    """The challenger: ``<name>@<alias>`` or ``<name>@<version>`` (``<name>`` alone is
    ``<name>@challenger``). Every model stage serving that model name takes it."""
    mode: ChallengerMode = "shadow"
    """``shadow``, ``canary`` or ``off`` (see the spec's ``challenger``)."""
    share: float = Field(default=0.1, ge=0, le=1)
    """Canary: the share of entities the challenger answers."""
    sticky_by: str | None = None
    """Canary: the column naming the entity (default: the request's ``id_field``)."""

    def stage_config(self) -> tuple[str, ChallengerSpec]:
        """The model name and the challenger its stages get."""
        name, ref = parse_model_ref(self.model if "@" in self.model else f"{self.model}@challenger")
        spec = ChallengerSpec.model_validate({
            "version" if isinstance(ref, int) else "alias": ref,
            "mode": self.mode,
            "share": self.share,
            "sticky_by": self.sticky_by,
        })  # fmt: skip
        return name, spec


class AppArgs(BaseModel):
    """Arguments of the Serve application (``args:`` in a Serve config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: str = "pipelines/fraud.yaml"
    """Pipeline spec file, relative to the working directory."""
    home: str | None = None
    """stageline home (models, features); default ``$STAGELINE_HOME`` or ``./.stageline``."""
    model: str | None = Field(default=None, examples=["fraud@challenger", "fraud@2"])
    """Serve this model reference in every model stage that uses that model name.
    Changing it on a running app reloads the model in place (``user_config``)."""
    challenger: ChallengerArgs | None = None
    """A challenger (shadow, canary or off) for every model stage that uses its model
    name, in place of the spec's. Changing it on a running app switches in place
    (``user_config``), as ``model`` does."""
    api_key_env: str = "STAGELINE_API_KEY"
    """Environment variable holding the API key; no key means no authentication."""
    api_key_file: str | None = None
    """File holding the API key, read when the env var is unset."""
    online: str | None = Field(default=None, examples=["memory", "redis://redis:6379/0"])
    """Online feature store in place of the spec's ``features.online``: ``memory`` or a
    ``redis://`` URL (password from ``$STAGELINE_REDIS_PASSWORD``)."""
    placement: Placement | None = None
    """``local`` (every stage inside the ingress replicas) or ``graph`` (each stage an
    autoscaling deployment of its own), in place of the spec's ``serve.placement``."""


def build_app(args: AppArgs) -> Application:
    """The Serve application for ``args.spec``."""
    spec = load_spec(args.spec)
    if args.online:
        spec = spec.with_online(args.online)
    spec = spec.with_placement(args.placement or spec.serve.placement)
    home = str(resolve_home(args.home))
    version = code_version(spec, home, args)
    handles = [
        versioned(deployment(spec, segment, home, args.model, args.challenger), version).bind(
            spec, list(segment.stages), home
        )
        for segment in spec.segments()
        if not segment.inline
    ]
    ingress = spec.serve.ingress
    api_key = ApiKey(args.api_key_env, args.api_key_file)
    max_ongoing, max_queued = ingress_limits(spec)
    inline = [stage for s in spec.segments() if s.inline for stage in s.stages]
    configured = cast(Deployment, Ingress).options(
        name=INGRESS,
        ray_actor_options={"num_cpus": ingress.num_cpus},
        autoscaling_config=_autoscaling(
            ingress.autoscaling, ingress.max_ongoing_requests, busy=False
        ),
        max_ongoing_requests=max_ongoing,
        max_queued_requests=max_queued,
        # Model stages placed inline reload in the ingress replica.
        user_config=user_config(spec, inline, args.model, args.challenger),
        logging_config=_logging(spec),
        **ROLLOUT,
        **SHUTDOWN,
        **OVERLOAD,
    )
    app: Application = versioned(configured, version).bind(spec, home, api_key, handles)
    return app


def code_version(spec: PipelineSpec, home: str, args: AppArgs) -> str:
    """What every replica is built from, except the model reference.

    ``serve.run`` gives a deployment without a version a random one, so every
    redeploy would restart every replica (and drop requests while new ones start).
    With this version a redeploy that changes only ``args.model`` (``user_config``)
    is Serve's lightweight update: the running replicas reload the model in place.
    A change to the spec, the home, the API key settings or the code (``serve_app``,
    ``stageline``, a stage's module or a file its params name) still restarts them, as
    ``serve run --reload`` expects. (``serve deploy`` of a config versions by its import
    path and args.)
    """
    inputs = {
        "spec": spec.model_dump(mode="json"),
        "base_dir": str(spec.base_dir),
        "home": home,
        "api_key": [args.api_key_env, args.api_key_file],
    }
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    packages = [Path(__file__).parent, Path(inspect.getfile(PipelineSpec)).parent]
    sources = {f for p in packages for f in p.rglob("[!.]*.py")}  # not editors' lock files
    sources |= {Path(inspect.getfile(resolve_class(s.uses, spec.base_dir))) for s in spec.stages}
    # Files a stage's params name by path (an OnDemandTransform's `function: file.py:fn`).
    sources |= {
        spec.base_dir / value.rsplit(":", 1)[0]
        for s in spec.stages
        for value in s.params.values()
        if isinstance(value, str) and ".py:" in value
    }
    for source in sorted(sources):
        with contextlib.suppress(FileNotFoundError):  # deleted since the listing
            digest.update(f"{source}\0".encode() + source.read_bytes())
    return digest.hexdigest()


def deployment(
    spec: PipelineSpec,
    segment: Segment,
    home: str,
    model: str | None,
    challenger: ChallengerArgs | None = None,
) -> Any:
    """The generic stage deployment configured for one segment."""
    options: StageServeSpec = spec.stage(segment.stages[0]).serve
    return cast(Deployment, StageDeployment).options(
        name=segment.name,
        ray_actor_options={"num_cpus": options.num_cpus},
        autoscaling_config=_autoscaling(
            options.autoscaling, options.max_ongoing_requests, busy=True
        ),
        max_ongoing_requests=options.max_ongoing_requests,
        max_queued_requests=options.max_queued_requests,
        user_config=user_config(spec, segment.stages, model, challenger),
        logging_config=_logging(spec),
        **ROLLOUT,
        **SHUTDOWN,
        **OVERLOAD,
    )


def user_config(
    spec: PipelineSpec,
    stages: Sequence[str],
    model: str | None,
    challenger: ChallengerArgs | None = None,
) -> dict[str, Any]:
    """The :class:`~stageline.service.UserConfig` of a deployment running ``stages``:
    for each :class:`~stageline.stage.Reloadable` stage, its reload params. A stage
    serving ``model``'s name gets that reference (``{"alias": "challenger"}``), the
    others their spec's own alias or version; a stage that can take a challenger gets
    ``challenger``'s when it serves that model name, else its spec's (or none).

    Always given, so a redeploy without ``model`` or ``challenger`` moves a swapped
    replica back to what the spec says."""
    name, ref = parse_model_ref(model) if model is not None else (None, None)
    rival, rival_spec = challenger.stage_config() if challenger is not None else (None, None)
    config: dict[str, dict[str, Any]] = {}
    for stage in map(spec.stage, stages):
        cls = resolve_class(stage.uses, spec.base_dir)
        if not issubclass(cls, Reloadable):
            continue
        params = stage.params
        if name is not None and params.get("model") == name:
            config[stage.name] = {"version" if isinstance(ref, int) else "alias": ref}
        else:
            config[stage.name] = {k: params[k] for k in ("alias", "version") if k in params}
        # Named in its __init__ (a model stage), not taken through **kwargs: a stage of
        # the user's own gets no key it never asked for.
        if "challenger" in inspect.signature(cls).parameters:
            taken = rival_spec if rival is not None and params.get("model") == rival else None
            chosen = taken or stage.challenger
            config[stage.name]["challenger"] = (
                chosen.model_dump(mode="json") if chosen is not None else None
            )
    return UserConfig(stages=config).model_dump(mode="json", exclude_defaults=True)


def _logging(spec: PipelineSpec) -> dict[str, Any]:
    return {"enable_access_log": spec.serve.access_log}


def _autoscaling(options: AutoscalingSpec, max_ongoing: int, *, busy: bool) -> dict[str, Any]:
    """Serve's ``autoscaling_config``; with ``busy``, on the replicas' busy time
    (:mod:`serve_app.autoscaling`: stage deployments), else on requests in flight."""
    config: dict[str, Any] = {
        "min_replicas": options.min_replicas,
        "initial_replicas": max(options.min_replicas, 1),
        "max_replicas": options.max_replicas,
        "target_ongoing_requests": min(options.target_ongoing_requests, max_ongoing),
        "upscale_delay_s": options.upscale_delay_s,
        "downscale_delay_s": options.downscale_delay_s,
        "look_back_period_s": options.look_back_s,
    }
    if busy:
        config["policy"] = autoscaling.policy(options.target_busy)
    return config
