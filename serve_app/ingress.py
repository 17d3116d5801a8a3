"""The HTTP ingress: validate, chain the stage deployments, answer.

``make_ingress`` builds the FastAPI app from the spec's request schema (so
``/docs`` shows the real fields) and returns the ingress deployment class.
Stages placed ``inline`` run inside this replica; the others are
DeploymentHandles, and a response is passed on to the next handle without
being awaited in between.
"""

# No `from __future__ import annotations`: FastAPI reads these route signatures at run time,
# in a replica that unpickled the class, where string annotations cannot be resolved.

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import pandas as pd
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import _loopback as loopback
from serve_app.batching import Merger, batch_overrides
from serve_app.deployment import MeteredChain, freeze_heap, off_loop
from serve_app.http import (
    AT_CAPACITY,
    RETRY_AFTER_S,
    AdmissionMiddleware,
    ApiError,
    ApiKey,
    GuardMiddleware,
    error_response,
    parse_json,
    request_id_of,
    require_json,
    unavailable,
)
from stageline.features import StoreUnavailableError
from stageline.pipeline import StageChain, predictions, records
from stageline.spec import PipelineSpec, Segment
from stageline.stage import split_error

log = logging.getLogger("ray.serve")
Response = DeploymentResponse[pd.DataFrame]

OIP_TYPES = {
    "str": "BYTES",
    "category": "BYTES",
    "datetime": "BYTES",
    "int": "INT64",
    "float": "FP64",
    "bool": "BOOL",
}


def request_models(spec: PipelineSpec) -> tuple[type[BaseModel], type[BaseModel]]:
    """(one record, the ``/predict`` body) as pydantic models from the spec."""
    record = spec.request.record_model(f"{_title(spec.name)}Record")
    body: type[BaseModel] = create_model(
        f"{_title(spec.name)}PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        records=(
            list[record],  # type: ignore[valid-type]
            Field(min_length=1, max_length=spec.serve.max_records),
        ),
    )
    return record, body


def _title(name: str) -> str:
    return "".join(p.capitalize() for p in name.replace("-", "_").split("_"))


def validation_details(
    error: ValidationError, prefix: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """``[{"record": 3, "field": "amount", "message": ...}]`` from pydantic's errors."""
    details = []
    for err in error.errors(include_url=False, include_input=False):
        loc = [*prefix, *err["loc"]]
        detail: dict[str, Any] = {"message": err["msg"]}
        if len(loc) >= 2 and loc[0] == "records" and isinstance(loc[1], int):
            detail["record"] = loc[1]
            loc = loc[2:]
        if loc:
            detail["field"] = ".".join(str(p) for p in loc)
        details.append(detail)
    return details


def make_api(spec: PipelineSpec, api_key: ApiKey) -> FastAPI:
    """The FastAPI app: error handlers, guard middleware, and an OpenAPI page that
    documents the request schema of ``spec``."""
    record, body = request_models(spec)
    app = FastAPI(
        title=f"stageline: {spec.name}",
        description=spec.description or f"Predictions of the {spec.name} pipeline.",
        version="1",
    )

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, request_id_of(request.scope))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"field": ".".join(map(str, e["loc"])), "message": e["msg"]} for e in exc.errors()
        ]
        error = ApiError(422, "invalid_request", "the request is not valid", details=details)
        return error_response(error, request_id_of(request.scope))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        error = ApiError(exc.status_code, code, str(exc.detail))
        return error_response(error, request_id_of(request.scope))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request.scope)
        log.exception("request %s failed: %s", rid, exc)
        error = ApiError(
            500, "internal", f"internal error; the logs have it under request id {rid}"
        )
        return error_response(error, rid)

    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=spec.serve.max_body_bytes,
        api_key=api_key,
        body_timeout_s=spec.serve.request_timeout_s,
    )
    limit = admission_limit(spec)
    if limit is not None:
        app.add_middleware(AdmissionMiddleware, limit=limit)  # outermost: before the guard

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        ref = "#/components/schemas/{model}"
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (body, record):
            doc = model.model_json_schema(ref_template=ref)
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def admission_limit(spec: PipelineSpec) -> int | None:
    """Requests one ingress replica takes at once (``max_ongoing_requests`` at work, up
    to ``max_queued_requests`` more waiting); None when the queue is unbounded (-1)."""
    ingress = spec.serve.ingress
    if ingress.max_queued_requests < 0:
        return None
    return ingress.max_ongoing_requests + ingress.max_queued_requests


def body_schema(spec: PipelineSpec) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of ``/predict`` (the schema is added in ``make_api``)."""
    _, body = request_models(spec)
    ref = {"$ref": f"#/components/schemas/{body.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def replica_died(error: BaseException) -> bool:
    """Whether ``error`` is a stage replica's death: Ray's own error, or Serve's error
    for a call whose input came from a replica that died (a chained response)."""
    return isinstance(error, RayActorError) or isinstance(error.__cause__, RayActorError)


class InlineRun:
    """Stages that run in the ingress replica back to back: one call in a worker thread
    (:func:`~serve_app.deployment.off_loop`). Between stages it checks whether the
    request was abandoned (its deadline passed): no stage after that one runs.

    The first run of a request also builds its frame from the rows, and a run that
    ends the pipeline also turns the output into records: the whole pandas part of a
    request in one thread call, not spread over the event loop around it. (Measured
    at one client: about 1 ms less per request than building and reading the frame on
    the loop, where that work ran between two thread hops.)"""

    def __init__(
        self,
        chains: list[Callable[[pd.DataFrame], pd.DataFrame]],
        spec: PipelineSpec,
        *,
        first: bool = False,
    ) -> None:
        self.chains = chains
        self.spec = spec
        self.first = first
        self.last = False

    def __call__(self, data: Any, abandoned: threading.Event) -> Any:
        frame = pd.DataFrame.from_records(data) if self.first else data
        for chain in self.chains:
            if abandoned.is_set():
                raise _AbandonedError
            frame = chain(frame)
        return records(predictions(frame, self.spec)) if self.last else frame


class _AbandonedError(Exception):
    """Raised in a worker thread nobody waits for any more; never seen by a client."""


def make_ingress(spec: PipelineSpec, home: str, api_key: ApiKey) -> Any:
    """The ingress deployment class for ``spec`` (bind it with the stage handles)."""
    app = make_api(spec, api_key)
    record_model, body_model = request_models(spec)
    predict_doc = body_schema(spec)
    segments = spec.segments()
    id_field = spec.request.id_field

    @serve.ingress(app)
    class Ingress:
        def __init__(self, handles: Sequence[DeploymentHandle[Any]]) -> None:
            loopback.install()
            self.spec = spec
            self.validate = StageChain(spec, [], Path(home), validate=True)
            by_reference = spec.serve.stage_calls == "actor"
            remote = iter(h.options(_by_reference=by_reference) for h in handles)
            # A stage placed inline runs (and is measured) on its own, as in a deployment.
            self.plan: list[tuple[Segment, DeploymentHandle[Any] | MeteredChain]] = []
            for s in segments:
                if s.inline:
                    self.plan += [(s, MeteredChain(spec, [name], home)) for name in s.stages]
                else:
                    self.plan.append((s, next(remote)))
            # What a batch goes through: inline stages (validation first) grouped into
            # runs between the stage deployments.
            self.steps: list[InlineRun | DeploymentHandle[Any]] = [
                InlineRun([self.validate], spec, first=True)
            ]
            for _s, runner in self.plan:
                if not isinstance(runner, MeteredChain):
                    self.steps.append(runner)
                elif isinstance(self.steps[-1], InlineRun):
                    self.steps[-1].chains.append(runner)
                else:
                    self.steps.append(InlineRun([runner], spec))
            if isinstance(self.steps[-1], InlineRun):
                self.steps[-1].last = True
            # One inline run at a time, as when they ran on the event loop: stages need
            # not be thread-safe. (A run abandoned at its deadline may still be finishing.)
            self._inline = asyncio.Lock()
            self.app_status = AppStatus()
            self.timeout_s = spec.serve.request_timeout_s
            batching = spec.serve.ingress.batch
            self.merger: Merger[list[dict[str, Any]], list[dict[str, Any]]] | None = None
            if batching is not None:
                self.merger = Merger(
                    self._score_all,
                    max_size=batching.max_size,
                    wait_ms=batching.wait_ms,
                    regroup_ms=batching.regroup_ms,
                    in_flight=spec.serve.ingress.in_flight,
                )
            api_key.load()
            freeze_heap()

        def reconfigure(self, user_config: dict[str, Any]) -> None:
            """Model references for the stages placed inline (see ``build_app``) and
            batching overrides (``{"batch": {"max_size": 32, "wait_ms": 1}}``)."""
            batching = batch_overrides(user_config)
            if self.merger is not None:
                self.merger.configure(**batching)
            for _segment, runner in self.plan:
                if isinstance(runner, MeteredChain):
                    runner.reconfigure(user_config)

        # -- scoring -----------------------------------------------------------

        async def score(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """One prediction per validated record (``records`` of ``predictions``).

            Concurrent requests share one frame through every stage (:class:`Merger`):
            a stage behind a handle is called once per batch, not once per request."""
            if self.merger is not None:
                return await self.merger(rows)
            return (await self._score_all([rows]))[0]

        async def _score_all(
            self, requests: list[list[dict[str, Any]]]
        ) -> list[list[dict[str, Any]]]:
            scored = await self.run([row for rows in requests for row in rows])
            out, start = [], 0
            for rows in requests:
                out.append(scored[start : start + len(rows)])
                start += len(rows)
            return out

        # -- composition -------------------------------------------------------

        async def run(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            """The rows through every stage, within the deadline (else 504): one
            prediction record per row (``records`` of ``predictions``)."""
            issued: list[Response] = []
            abandoned = threading.Event()
            try:
                return await asyncio.wait_for(self._chain(rows, issued, abandoned), self.timeout_s)
            except asyncio.TimeoutError:
                abandoned.set()  # inline: the stages after the running one never start
                for response in issued:
                    response.cancel()  # type: ignore[no-untyped-call]  # downstream stops too
                raise ApiError(
                    504,
                    "deadline_exceeded",
                    f"no answer within the {self.timeout_s:g} s deadline; retry later",
                ) from None
            except BackPressureError:
                raise unavailable(AT_CAPACITY) from None
            except DeploymentUnavailableError:
                raise unavailable("a pipeline stage is not available yet") from None
            except (RayActorError, RayServeException) as e:
                if not replica_died(e):
                    raise
                # A stage replica died with this batch on it (killed, OOM, node lost): Serve
                # replaces it, and a retry goes to another replica. Not the client's fault.
                log.warning("a stage replica died under this batch: %s", e)
                raise unavailable("a pipeline stage replica failed") from None
            except StoreUnavailableError as e:
                raise unavailable(f"the feature store is unavailable: {e}") from None

        async def _chain(
            self, rows: list[dict[str, Any]], issued: list[Response], abandoned: threading.Event
        ) -> list[dict[str, Any]]:
            # Rows, then a frame once the first inline run built it, then records once
            # the last one read it (or once the last deployment's frame came back).
            current: Any = rows
            pending: Response | None = None
            for step in self.steps:
                if isinstance(step, InlineRun):
                    if pending is not None:
                        current, pending = await pending, None
                    async with self._inline:
                        current = await off_loop(step, current, abandoned)
                else:
                    # Not awaited: Serve hands the result straight to the next deployment.
                    response = cast(Response, step.remote(current if pending is None else pending))
                    issued.append(response)
                    pending = response
            if pending is not None:
                current = records(predictions(await pending, self.spec))
            return cast(list[dict[str, Any]], current)

        async def _records(self, request: Request) -> list[dict[str, Any]]:
            require_json(request.headers.get("content-type"))
            payload = parse_json(await request.body())
            try:
                parsed = body_model.model_validate(payload)
            except ValidationError as e:
                raise ApiError(
                    422,
                    "invalid_request",
                    "the request is not valid",
                    details=validation_details(e),
                ) from None
            return [r.model_dump() for r in parsed.records]  # type: ignore[attr-defined]

        # -- endpoints ---------------------------------------------------------

        @app.post("/predict", openapi_extra=predict_doc, summary="Score records")
        async def predict(self, request: Request) -> JSONResponse:
            rid = request_id_of(request.scope)
            scored = await self.score(await self._records(request))
            out, failed = [], []
            for i, row in enumerate(scored):
                if row["error"]:
                    stage, reason = split_error(row["error"])
                    out.append({"id": row[id_field], "error": {"stage": stage, "message": reason}})
                    failed.append({"record": i, "stage": stage, "message": reason})
                else:
                    out.append(
                        {
                            "id": row[id_field],
                            "score": row["score"],
                            "label": row["label"],
                            "reasons": row["reasons"] or [],
                        }
                    )
            if len(failed) == len(out):
                raise ApiError(422, "rejected", "no record could be scored", details=failed)
            good = next(row for row in scored if not row["error"])
            model = {"name": good["model_name"], "version": int(good["model_version"])}
            return JSONResponse({"predictions": out, "model": model, "request_id": rid})

        @app.post("/v2/models/{name}/infer", summary="Open Inference Protocol (V2) inference")
        async def infer(self, name: str, request: Request) -> JSONResponse:
            self._check_model(name)
            require_json(request.headers.get("content-type"))
            payload = parse_json(await request.body())
            if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
                raise ApiError(
                    422, "invalid_request", 'expected {"inputs": [{name, shape, datatype, data}]}'
                )
            columns: dict[str, list[Any]] = {}
            for tensor in payload["inputs"]:
                if not isinstance(tensor, dict) or not isinstance(tensor.get("data"), list):
                    raise ApiError(
                        422, "invalid_request", "each input needs a name and a data list"
                    )
                columns[str(tensor.get("name"))] = _flatten(tensor["data"])
            lengths = {len(v) for v in columns.values()}
            if len(lengths) != 1:
                raise ApiError(
                    422, "invalid_request", f"inputs differ in length: {sorted(lengths)}"
                )
            n = lengths.pop()
            requested = payload.get("outputs") or []
            if not isinstance(requested, list) or not all(
                isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
            ):
                raise ApiError(
                    422, "invalid_request", 'outputs must be a list of {"name": "<output name>"}'
                )
            rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
            try:
                parsed = body_model.model_validate({"records": rows})
            except ValidationError as e:
                raise ApiError(
                    422,
                    "invalid_request",
                    "the inputs are not valid",
                    details=validation_details(e),
                ) from None
            scored = await self.score([r.model_dump() for r in parsed.records])  # type: ignore[attr-defined]
            details = [
                {"record": i, "message": str(row["error"])}
                for i, row in enumerate(scored)
                if row["error"]
            ]
            if details:
                raise ApiError(422, "rejected", "some inputs could not be scored", details=details)
            wanted = {str(o["name"]) for o in requested}
            outputs: list[dict[str, Any]] = [
                {"name": id_field, "datatype": "BYTES", "data": [str(r[id_field]) for r in scored]},
                {"name": "score", "datatype": "FP64", "data": [float(r["score"]) for r in scored]},
                {"name": "label", "datatype": "BOOL", "data": [bool(r["label"]) for r in scored]},
                {
                    "name": "reasons",
                    "datatype": "BYTES",
                    "data": [",".join(r["reasons"] or []) for r in scored],
                },
            ]
            outputs = [{**o, "shape": [n]} for o in outputs if not wanted or o["name"] in wanted]
            body: dict[str, Any] = {
                "model_name": name,
                "model_version": str(int(scored[0]["model_version"])),
                "outputs": outputs,
            }
            if "id" in payload:
                body["id"] = payload["id"]
            return JSONResponse(body)

        @app.get("/v2/models/{name}", summary="Open Inference Protocol (V2) model metadata")
        async def model_metadata(self, name: str) -> dict[str, Any]:
            self._check_model(name)
            models = await self._models()
            fields = self.spec.request.fields
            return {
                "name": name,
                "versions": sorted({str(m["version"]) for m in models}),
                "platform": "xgboost",
                "inputs": [
                    {"name": f, "datatype": OIP_TYPES[s.type], "shape": [-1]}
                    for f, s in fields.items()
                ],
                "outputs": [
                    {"name": id_field, "datatype": "BYTES", "shape": [-1]},
                    {"name": "score", "datatype": "FP64", "shape": [-1]},
                    {"name": "label", "datatype": "BOOL", "shape": [-1]},
                    {"name": "reasons", "datatype": "BYTES", "shape": [-1]},
                ],
            }

        @app.get("/v2/models/{name}/ready", summary="Open Inference Protocol (V2) model ready")
        async def model_ready(self, name: str) -> dict[str, Any]:
            self._check_model(name)
            return await self.v2_ready()

        def _check_model(self, name: str) -> None:
            if name != self.spec.name:
                raise ApiError(
                    404, "not_found", f"no model {name!r}; this server has {self.spec.name!r}"
                )

        @app.get("/healthz", summary="Liveness")
        @app.get("/v2/health/live", summary="Open Inference Protocol (V2) liveness")
        async def healthz(self) -> dict[str, Any]:
            return {"live": True}

        @app.get("/readyz", summary="Readiness: every stage loaded and answering")
        async def readyz(self) -> dict[str, Any]:
            """Ready when every stage this replica uses answers. ``app`` is Serve's view
            of the whole application: a rollout whose new replicas fail to start shows
            there (``DEPLOY_FAILED``, with the stage's error) while this version keeps
            serving, so the probe stays 200: a load balancer must not drop the replicas
            that still work."""
            await self._ready()
            return {"ready": True, "app": await self.app_status.get()}

        @app.get("/v2/health/ready", summary="Open Inference Protocol (V2) readiness")
        async def v2_ready(self) -> dict[str, Any]:
            await self._ready()
            return {"ready": True}

        async def _ready(self) -> None:
            try:
                await self._statuses()
            except Exception as e:  # any failure to answer means not ready
                raise ApiError(
                    503,
                    "not_ready",
                    f"not every stage is ready: {e}",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                ) from None

        @app.get("/models", summary="Models served, their versions and the request schema")
        async def models(self) -> dict[str, Any]:
            return {
                "pipeline": self.spec.name,
                "models": await self._models(),
                "request_schema": record_model.model_json_schema(),
            }

        async def _statuses(self) -> dict[str, dict[str, Any]]:
            stages: dict[str, dict[str, Any]] = {}
            waits = [
                runner.status.remote()
                for _s, runner in self.plan
                if not isinstance(runner, MeteredChain)
            ]
            for report in await asyncio.wait_for(asyncio.gather(*waits), timeout=5):
                stages.update(report["stages"])
            for _s, runner in self.plan:
                if isinstance(runner, MeteredChain):
                    stages.update(runner.status())
            return stages

        async def _models(self) -> list[dict[str, Any]]:
            return [
                {"stage": name, **report}
                for name, report in (await self._statuses()).items()
                if "version" in report
            ]

    return Ingress


class AppStatus:
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


def _flatten(data: list[Any]) -> list[Any]:
    """OIP data may be nested by shape ([[1], [2]]); records want one value per row."""
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out
