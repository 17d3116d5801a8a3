"""The Serve adapter: the HTTP ingress deployment, a thin shell around the service.

:class:`Ingress` receives the stage deployments' handles in its constructor (Serve's
model composition), builds a :class:`~stageline.service.ScoringService` over a runner
for the spec's placement, and serves :func:`~serve_app.router.make_router`'s FastAPI
app over it. Everything HTTP is in ``serve_app.router``; everything about scoring is
in ``stageline.service``. What is here is what needs Ray: calling stage deployments,
turning Ray's errors into the service's, and Serve's view of the application.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, cast

import pandas as pd
from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from serve_app.deployment import MeteredChain, freeze_heap
from serve_app.http import AT_CAPACITY, ApiKey
from serve_app.ray_internals import by_reference, keep_grpc_on_loopback, send_each_response_whole
from serve_app.router import make_router
from stageline.monitoring import DriftMeter
from stageline.outputs import OutputContract, Record, check_outputs_provided
from stageline.pipeline import StageChain
from stageline.predlog import PredictionLog, scored_rows
from stageline.service import (
    ChainRunner,
    LocalRun,
    LocalRuns,
    LoggedContract,
    Runner,
    ScoringService,
    UnavailableError,
    UserConfig,
)
from stageline.spec import PipelineSpec
from stageline.stage import StageStatus
from stageline.stages.validate import records_frame

log = logging.getLogger("ray.serve")
Response = DeploymentResponse[pd.DataFrame]
Step = LocalRun | DeploymentHandle[Any]


def placement_runner(
    spec: PipelineSpec,
    home: str,
    handles: Sequence[DeploymentHandle[Any]],
    prediction_log: PredictionLog | None = None,
) -> Runner:
    """The runner for ``spec``'s placement: every stage in this replica
    (:class:`~stageline.service.ChainRunner`), or the stage deployments behind
    ``handles`` with any inline stages between them (:class:`HandleRunner`).
    The records were validated by the schema's record model (the request codec), so
    their frame is built here typed as the validation stage would give it
    (:func:`~stageline.stages.validate.records_frame`), not validated again. A stage
    placed inline runs (and is measured) on its own, as in a deployment. Finished
    frames go to ``prediction_log``, if any."""
    contract = (
        OutputContract(spec) if prediction_log is None else LoggedContract(spec, prediction_log)
    )
    start = partial(records_frame, schema=spec.request)
    by_ref = spec.serve.stage_calls == "actor"
    remote = iter(by_reference(h, by_ref) for h in handles)
    steps: list[Step] = [LocalRun([], contract, start=start)]
    for segment in spec.segments():
        if not segment.inline:
            steps.append(next(remote))
            continue
        chains = [MeteredChain(spec, [name], home) for name in segment.stages]
        last = steps[-1]
        if isinstance(last, LocalRun):
            last.chains.extend(chains)
        else:
            steps.append(LocalRun(list(chains), contract))
    if len(steps) == 1:
        local = cast(LocalRun, steps[0]).chains
        # Every stage is here: declared outputs no stage gives are refused at start.
        check_outputs_provided(spec, [pair for c in local for pair in _stages(c)])
        return ChainRunner(local, contract, start)
    if isinstance(steps[-1], LocalRun):
        steps[-1].last = True
    return HandleRunner(steps, contract)


def _stages(chain: object) -> StageChain:
    """The stages a local run's chain holds (a measured one wraps them)."""
    inner = chain.chain if isinstance(chain, MeteredChain) else chain
    assert isinstance(inner, StageChain)
    return inner


def drift_gauges(spec: PipelineSpec, home: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The prediction log's ``prepare``: each batch it writes shaped as the log keeps it
    (:func:`~stageline.predlog.scored_rows`), and its features and scores counted
    against the model version's training profile (:class:`~stageline.monitoring.DriftMeter`),
    whose PSI figures go to a gauge: what ``stageline monitor`` reports, as it goes."""
    meter = DriftMeter(spec, Path(home))
    gauge = metrics.Gauge(
        "stageline_drift_psi",
        description="Population stability index of a feature (or of the score: feature is "
        "the model's output) in this replica's recent predictions, against the training "
        "profile of the model version: under 0.1 stable, 0.25 and over a drift.",
        tag_keys=("model", "version", "feature"),  # type: ignore[arg-type]
    )

    def prepare(frame: pd.DataFrame) -> pd.DataFrame:
        rows = scored_rows(frame)
        try:
            for (version, feature), value in meter.observe(rows).items():
                tags = {"model": meter.name, "version": str(version), "feature": feature}
                gauge.set(value, tags=tags)
        except Exception:  # the figures are a view of the log: never a reason to lose it
            log.exception("drift figures of the prediction log failed")
        return rows

    return prepare


class HandleRunner:
    """Stage deployments called through their handles, with the stages placed inline
    run here between them. A deployment's response is passed to the next one without
    being awaited in between; when the run is cancelled (its deadline), every call it
    issued is cancelled too."""

    def __init__(self, steps: list[Step], contract: OutputContract) -> None:
        self.steps = steps
        self.contract = contract
        self.local = LocalRuns()

    async def run(self, rows: list[Record]) -> list[Record]:
        issued: list[Response] = []
        try:
            return await self._chain(rows, issued, threading.Event())
        except asyncio.CancelledError:
            for response in issued:
                response.cancel()  # type: ignore[no-untyped-call]  # downstream stops too
            raise
        except BackPressureError:
            raise UnavailableError(AT_CAPACITY) from None
        except DeploymentUnavailableError:
            raise UnavailableError("a pipeline stage is not available yet") from None
        except (RayActorError, RayServeException) as e:
            if not replica_died(e):
                raise
            # A stage replica died with this batch on it (killed, OOM, node lost): Serve
            # replaces it, and a retry goes to another replica. Not the client's fault.
            log.warning("a stage replica died under this batch: %s", e)
            raise UnavailableError("a pipeline stage replica failed") from None

    async def _chain(
        self, rows: list[Record], issued: list[Response], abandoned: threading.Event
    ) -> list[Record]:
        # Rows, then a frame once the first local run built it, then records once the
        # last one read it (or once the last deployment's frame came back).
        current: Any = rows
        pending: Response | None = None
        for step in self.steps:
            if isinstance(step, LocalRun):
                if pending is not None:
                    current, pending = await pending, None
                current = await self.local(step, current, abandoned)
            else:
                # Not awaited: Serve hands the result straight to the next deployment.
                response = cast(Response, step.remote(current if pending is None else pending))
                issued.append(response)
                pending = response
        if pending is not None:
            current = self.contract.records(await pending)
        return cast(list[Record], current)

    async def statuses(self) -> dict[str, StageStatus]:
        out: dict[str, StageStatus] = {}
        handles = [s for s in self.steps if not isinstance(s, LocalRun)]
        for report in await asyncio.gather(*(h.status.remote() for h in handles)):
            out.update(report["stages"])
        for step in self.steps:
            if isinstance(step, LocalRun):
                out.update(step.statuses())
        return out

    def data_version(self) -> Hashable | None:
        """None: stages in other replicas change without this one knowing."""
        return None

    def reconfigure(self, config: Mapping[str, Mapping[str, Any]]) -> None:
        for step in self.steps:
            if isinstance(step, LocalRun):
                step.reconfigure(config)


def _response_cache_counter() -> Callable[[int, int], None]:
    """Counts each request's records answered from the response cache, or not."""
    counter = metrics.Counter(
        "stageline_response_cache_lookups",
        description="Records looked up in the response cache, by result (hit: answered "
        "from the cache; miss: scored by the stages).",
        tag_keys=("result",),
    )

    def count(hits: int, misses: int) -> None:
        if hits:
            counter.inc(hits, tags={"result": "hit"})
        if misses:
            counter.inc(misses, tags={"result": "miss"})

    return count


def replica_died(error: BaseException) -> bool:
    """Whether ``error`` is a stage replica's death: Ray's own error, or Serve's error
    for a call whose input came from a replica that died (a chained response)."""
    return isinstance(error, RayActorError) or isinstance(error.__cause__, RayActorError)


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP ingress of a pipeline: its FastAPI app over a scoring service whose
    runner calls ``handles`` (the stage deployments not placed inline, in order)."""

    def __init__(
        self,
        spec: PipelineSpec,
        home: str,
        api_key: ApiKey,
        handles: Sequence[DeploymentHandle[Any]],
    ) -> None:
        keep_grpc_on_loopback()
        send_each_response_whole()
        self.prediction_log: PredictionLog | None = None
        if spec.prediction_log.enabled:
            dropped = metrics.Counter(
                "stageline_prediction_log_dropped_rows",
                description="Predictions the prediction log dropped, by reason (full: the "
                "sink is slower than the traffic; write_failed; unencodable; closed).",
                tag_keys=("reason",),
            )
            self.prediction_log = PredictionLog(
                home,
                pipeline=spec.name,
                spec=spec.prediction_log,
                on_drop=lambda n, reason: dropped.inc(n, tags={"reason": reason}),
                prepare=drift_gauges(spec, home),
            )
        runner = placement_runner(spec, home, handles, self.prediction_log)
        self.service = ScoringService(spec, runner, on_cache_lookup=_response_cache_counter())
        self.api_key = api_key
        self.api_key.load()
        self.app_status = ServeAppStatus()

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = make_router(self.service, self.api_key, self.app_status.get)
        freeze_heap()  # everything is built: the model, features, Ray, FastAPI
        return app

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Model references of the stages placed inline, and batching overrides
        (:class:`~stageline.service.UserConfig`)."""
        self.service.reconfigure(UserConfig.model_validate(user_config))

    def __del__(self) -> None:
        """Serve's graceful stop, once the requests in flight are answered: what the
        prediction log holds in memory is written (for up to its ``close_timeout_s``)."""
        prediction_log = getattr(self, "prediction_log", None)
        if prediction_log is not None:
            prediction_log.close()


class ServeAppStatus:
    """Serve's status of the application this replica belongs to, for ``/readyz``:
    ``{"name", "status"}``, plus ``deployments`` (status and error) for those that are
    not healthy.

    A probe never waits on Serve's controller (a slow controller must not make a
    serving replica look unready): it gets the last status fetched, and a fetch older
    than ``max_age_s`` starts a new one in the background. Only the first probe waits,
    at most ``first_wait_s``."""

    def __init__(self, max_age_s: float = 1.0, first_wait_s: float = 5.0) -> None:
        self.max_age_s = max_age_s
        self.first_wait_s = first_wait_s
        self._last: dict[str, Any] | None = None
        self._fetched = -math.inf
        self._fetching: asyncio.Task[None] | None = None

    async def get(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        if self._fetching is None and loop.time() - self._fetched > self.max_age_s:
            self._fetching = asyncio.create_task(self._fetch())
        if self._last is None and self._fetching is not None:
            await asyncio.wait({self._fetching}, timeout=self.first_wait_s)
        return self._last or {"name": _app_name(), "status": "UNKNOWN"}

    async def _fetch(self) -> None:
        name = _app_name()
        try:
            # serve.status() is a blocking call to the controller: off the event loop.
            app = (await asyncio.to_thread(serve.status)).applications[name]
            status: dict[str, Any] = {"name": name, "status": str(app.status.value)}
            unhealthy = {
                deployment: {"status": str(d.status.value), "message": _error_line(d.message)}
                for deployment, d in app.deployments.items()
                if d.status != "HEALTHY"
            }
            if unhealthy:
                status["deployments"] = unhealthy
        except Exception as e:  # the probe answers even when the controller does not
            status = {"name": name, "status": "UNKNOWN", "message": f"no status: {e!r}"}
        finally:
            self._fetched = asyncio.get_running_loop().time()
            self._fetching = None
        self._last = status


def _app_name() -> str:
    return serve.get_replica_context().app_name


def _error_line(message: str) -> str:
    """The error in one of Serve's status messages (they end with a whole traceback)."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else ""
