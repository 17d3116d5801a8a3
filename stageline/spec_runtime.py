"""How a pipeline runs: Ray Serve and Ray Data options, per stage and per application.

Plain data: nothing here imports Ray. ``serve_app`` and ``batch_app`` read
these models and translate them into deployment and actor-pool options.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from stageline.spec_base import SpecModel


class AutoscalingSpec(SpecModel):
    """Ray Serve autoscaling of one deployment."""

    min_replicas: int = Field(default=1, ge=0)
    """Fewest replicas; 0 lets an idle deployment scale to zero (one starts at least)."""
    max_replicas: int = Field(default=1, ge=1)
    """Most replicas."""
    target_ongoing_requests: float = Field(default=2.0, gt=0)
    """Requests per replica Serve scales towards (capped at ``max_ongoing_requests``)."""
    upscale_delay_s: float = Field(default=3.0, ge=0)
    """How long the load must stay above the target before a replica is added."""
    downscale_delay_s: float = Field(default=30.0, ge=0)
    """How long the load must stay below the target before a replica is removed."""
    target_busy: float = Field(default=0.7, gt=0, le=1)
    """Stage deployments: the share of its time each replica spends running its stages
    that Serve scales towards (a stage's load; requests in flight hide it behind the
    ingress, which merges them). The ingress scales on ``target_ongoing_requests``."""
    look_back_s: float = Field(default=15.0, gt=0)
    """Over how many recent seconds the load is averaged (Serve asks for more than its
    deprecated ``metrics_interval_s``, 10 s)."""

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class BatchingSpec(SpecModel):
    """How concurrent requests are merged into one call."""

    max_size: int = Field(default=64, ge=1)
    """Most requests merged into one call of the stage."""
    wait_ms: float = Field(default=0.0, ge=0)
    """Longest a request waits for others to share its batch. 0: nobody waits; a batch
    is whatever queued up while the previous one ran."""
    regroup_ms: float = Field(default=3.0, ge=0)
    """Longest a batch smaller than the previous one waits for as many requests as that
    one had: callers answered together do not all come back at the same instant, and
    without it the first back runs alone while the rest queue behind it. A lone caller
    never waits."""


class StageServeSpec(SpecModel):
    """How the stage runs as a Ray Serve deployment."""

    num_cpus: float = Field(default=0.25, gt=0)
    """CPUs reserved for each replica."""
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    """Replica count and how it follows the load."""
    max_ongoing_requests: int = Field(default=64, ge=1)
    """Calls one replica works on at once."""
    max_queued_requests: int = Field(default=256, ge=-1)
    """Calls waiting for a replica beyond those; past it a call is refused. -1: no limit."""
    batch: BatchingSpec | None = BatchingSpec()
    """How calls are merged into one call of the stage; ``null``: one call each."""


class StageBatchSpec(SpecModel):
    """How the stage runs in a Ray Data job."""

    batch_size: int = Field(default=4096, ge=1)
    """Rows handed to the stage in one call."""
    actors: tuple[int, int] = (1, 2)
    """Actor pool size (min, max) for stateful stages."""
    num_cpus: float = Field(default=0.5, gt=0)
    """CPUs reserved for each actor."""

    @field_validator("actors", mode="before")
    @classmethod
    def _one_or_two(cls, v: Any) -> Any:
        return (v, v) if isinstance(v, int) else v

    @model_validator(mode="after")
    def _order(self) -> StageBatchSpec:
        lo, hi = self.actors
        if not 1 <= lo <= hi:
            raise ValueError("actors must be [min, max] with 1 <= min <= max")
        return self


class IngressSpec(SpecModel):
    """The HTTP ingress deployment (validation, composition, response formatting)."""

    num_cpus: float = Field(default=0.25, gt=0)
    """CPUs reserved for each ingress replica."""
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    """Ingress replica count and how it follows the load."""
    max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests one ingress replica works on at once."""
    max_queued_requests: int = Field(default=512, ge=-1)
    """Requests one replica holds beyond ``max_ongoing_requests``: it takes the sum at
    once, and the next ones wait nowhere (a 503 with Retry-After at once). -1: no limit."""
    batch: BatchingSpec | None = BatchingSpec(max_size=64, wait_ms=0.0)
    """Concurrent requests merged into one frame before the first stage, so every stage
    (inline or behind a handle) runs once per batch, not once per request. With
    ``wait_ms: 0`` nobody waits: a batch is whatever arrived while the last one ran."""
    in_flight: int = Field(default=1, ge=1)
    """Most batches one ingress replica has going through the stages at once. 1: the
    next batch forms while this one runs, so batches grow with the load. More lets stage
    deployments work on several batches at once; a batch goes beside those running only
    once a full one waits (``batch.max_size`` requests, or as many records), so below
    that batches grow as with 1 and each pays the calls to the stages once. Stages
    placed inline run one batch at a time anyway."""


Placement = Literal["local", "graph"]
"""Where the stages run online: ``local`` inside the ingress replicas, ``graph`` each in
an autoscaling deployment of its own."""


class GraphSpec(SpecModel):
    """The ``graph`` placement's own options: the ingress only routes, so it needs fewer
    replicas, and it keeps several batches going down the graph at once so that every
    stage deployment has work to scale on."""

    ingress: AutoscalingSpec = AutoscalingSpec(
        min_replicas=1, max_replicas=2, target_ongoing_requests=32
    )
    """The ingress's autoscaling in the graph (in place of ``serve.ingress.autoscaling``)."""
    in_flight: int = Field(default=4, ge=1)
    """Most batches one ingress replica has going down the graph at once (in place of
    ``serve.ingress.in_flight``): past a full batch waiting, while one is in the model
    stage, the next is in the feature stage."""
    inline: tuple[str, ...] = ()
    """Stages that run inside the ingress replicas in the graph too (in place of
    ``serve.inline``): stages too cheap to be worth a hop of their own. They scale with
    the ingress. Default: none, every stage a deployment of its own."""
    fuse: tuple[tuple[str, ...], ...] = ()
    """Groups of adjacent stages that share one deployment in the graph (in place of
    ``serve.fuse``): a cheap stage rides with its neighbour instead of costing every
    batch a call of its own. A group takes the ``serve:`` options of its first stage and
    is named ``first+last``. Default: none, every stage a deployment of its own."""


class ResponseCacheSpec(SpecModel):
    """A per-replica cache of answers, keyed by the validated record."""

    max_entries: int = Field(default=10_000, ge=1)
    """Most answers held; the least recently used go first."""
    ttl_s: float = Field(default=60.0, gt=0)
    """How long an answer is served again."""


class ServeAppSpec(SpecModel):
    """Options of the online application as a whole."""

    placement: Placement = "local"
    """``local``: the stages in ``inline`` run inside the ingress replicas, on one frame
    per batch of concurrent requests (the fastest on one machine). ``graph``: every
    stage, or ``graph.fuse`` group, is an autoscaling deployment of its own, scaling on how
    busy it is, behind an ingress that only routes (a cluster's shape; ``graph:`` holds
    its options). ``stageline serve --placement`` and the Serve ``args`` key
    ``placement`` choose one without editing the spec."""
    fuse: tuple[tuple[str, ...], ...] = ()
    """``local`` placement: groups of adjacent stages that share one deployment (fewer
    hops). The ``graph`` placement fuses ``graph.fuse`` instead."""
    inline: tuple[str, ...] | None = None
    """``local`` placement: stages run inside the ingress replica itself, no hop at all.
    Default: every stage not in a ``fuse`` group. The ``graph`` placement runs
    ``graph.inline`` inline instead."""
    graph: GraphSpec = GraphSpec()
    """Options of the ``graph`` placement."""
    max_records: int = Field(default=1000, ge=1)
    """Most records one request may carry."""
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    """Largest request body accepted; larger is a 413."""
    request_timeout_s: float = Field(default=5.0, gt=0)
    """Deadline of one request through every stage; past it the client gets a 504. A
    request body still arriving after this long is a 408 (a slow client holds nothing)."""
    ingress: IngressSpec = IngressSpec()
    """The ingress deployment's own options."""
    stage_calls: Literal["actor", "grpc"] = "actor"
    """How the ingress calls the stage deployments. ``actor``: Ray actor calls passing
    object references; a stage replica that dies under a call fails it at once (a 503
    with Retry-After, and the retry goes to another replica). ``grpc``: straight to the
    replica's gRPC server (Serve's by-value handles): a cheaper hop (``python -m
    bench.hop`` measures both), but a replica killed under a call leaves it hanging
    until the request's deadline (a 504), and every replica's gRPC port must be
    reachable from the ingress's node."""
    response_cache: ResponseCacheSpec | None = None
    """Answer a record seen before with its earlier answer, within ``ttl_s``, without
    running the stages (``response_cache: {}`` for the defaults). Off by default: a
    record usually carries its own id and time, so it rarely repeats, and a cached
    answer is not written to the prediction log again. Every answer is dropped when the
    model changes (a ``user_config`` reload, an alias move) or a feature view gets a
    new snapshot, so it never answers with a replaced model or features. It needs the
    model and feature stages in the ingress (the ``local`` placement, every stage
    inline): elsewhere the ingress cannot see them change, and the cache stays off
    (with a warning)."""
    access_log: bool = False
    """Ray Serve's access log line per request and stage. Off by default: a line is
    written for every request at every stage, so under load logging can cost more CPU
    than light stages do; the request metrics count every request anyway, and errors
    are logged either way."""


class BatchAppSpec(SpecModel):
    """Options of batch runs as a whole."""

    fuse: Literal["all"] | tuple[tuple[str, ...], ...] = "all"
    """Groups of adjacent stages that share one actor pool. ``all`` (the default) runs
    the whole chain in one pool: between pools a batch only travels through the object
    store, which costs memory and CPU and buys nothing on one machine. Each pool takes
    the ``batch:`` options of its first stage."""
    block_mb: float = Field(default=8.0, gt=0, le=1024)
    """Target size of the blocks Ray Data reads (MiB): with the actor pool's batch
    size, what bounds a run's memory however large the input is."""
    store_retries: int = Field(default=5, ge=0, le=20)
    """When the online feature store does not answer, retry a batch this many times,
    waiting 0.5 s, then 1, 2, 4, 8 s (at most 8) between tries, then fail the run."""
