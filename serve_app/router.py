"""The HTTP API of a pipeline: a FastAPI app over a :class:`ScoringService`.

``make_router(service, api_key)`` is all of the HTTP behaviour: routes, the one error
shape, limits, the API key, the OpenAPI page of the spec's request schema. It knows
nothing of Ray: the Serve adapter (``serve_app.ingress``) hands it a service whose
runner calls stage deployments, and a test hands it one that runs the stages in
process and calls it through httpx's ASGI transport.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at run time.

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app.codecs import RequestCodec
from serve_app.http import (
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
from stageline.outputs import Record
from stageline.service import (
    DeadlineExceededError,
    NotReadyError,
    ScoringService,
    ServiceError,
    UnavailableError,
)
from stageline.spec import PipelineSpec

log = logging.getLogger("ray.serve")

DOCS_ASSETS = "/docs/static"
"""Where the docs pages' scripts, styles and icon are served (behind the API key, as the
pages are)."""

AppStatus = Callable[[], Awaitable[dict[str, Any]]]
"""The status of the application around this replica, for ``/readyz`` (Serve's)."""


def make_router(
    service: ScoringService, api_key: ApiKey, app_status: AppStatus | None = None
) -> FastAPI:
    """The FastAPI app serving ``service``: every route, error and limit."""
    spec = service.spec
    codec = RequestCodec(spec)
    # /docs and /redoc with Swagger UI and ReDoc from the package, not a CDN: clusters
    # that score are often air-gapped. The pages find their assets and the document
    # under Serve's route prefix (root_path).
    app: FastAPI = FastAPIOffline(
        title=f"stageline: {spec.name}",
        description=spec.description or f"Predictions of the {spec.name} pipeline.",
        version="1",
        static_url=DOCS_ASSETS,
    )
    _error_handlers(app)
    app.add_middleware(
        GuardMiddleware,
        max_body_bytes=spec.serve.max_body_bytes,
        api_key=api_key,
        body_timeout_s=spec.serve.request_timeout_s,
    )
    limit = admission_limit(spec)
    if limit is not None:
        app.add_middleware(AdmissionMiddleware, limit=limit)  # outermost: before the guard
    _scoring_routes(app, service, codec)
    _health_routes(app, service, codec, app_status)
    _document(app, codec)
    return app


def admission_limit(spec: PipelineSpec) -> int | None:
    """Requests one ingress replica takes at once (``max_ongoing_requests`` at work, up
    to ``max_queued_requests`` more waiting); None when the queue is unbounded (-1)."""
    ingress = spec.serve.ingress
    if ingress.max_queued_requests < 0:
        return None
    return ingress.max_ongoing_requests + ingress.max_queued_requests


def http_error(error: ServiceError) -> ApiError:
    """The answer to a request the service could not score."""
    if isinstance(error, DeadlineExceededError):
        return ApiError(504, "deadline_exceeded", str(error))
    if isinstance(error, NotReadyError):
        return ApiError(503, "not_ready", str(error), headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(error, UnavailableError):
        return unavailable(str(error))
    return unavailable(f"the request could not be scored: {error}")


async def _body(request: Request) -> Any:
    require_json(request.headers.get("content-type"))
    return parse_json(await request.body())


def _scoring_routes(app: FastAPI, service: ScoringService, codec: RequestCodec) -> None:
    predict_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": f"#/components/schemas/{codec.body.__name__}"}
                }
            },
        }
    }

    @app.post(
        "/predict",
        openapi_extra=predict_doc,
        summary="Score records",
        responses={200: {"model": codec.answer, "description": "One prediction per record"}},
    )
    async def predict(request: Request, partial: bool = False) -> JSONResponse:
        """One prediction per record. An invalid record fails the whole request (a 422
        naming each); with ``?partial=true`` it is answered in its place with its
        reason, as a record a stage rejects, and the others are scored."""
        payload = await _body(request)
        rows, invalid = codec.each_record(payload) if partial else (codec.records(payload), {})
        rid = request_id_of(request.scope)
        scored = await service.score(rows, rid) if rows else []
        answer = codec.predict_answer(scored, rid, invalid)
        return JSONResponse(answer)

    @app.post("/v2/models/{name}/infer", summary="Open Inference Protocol (V2) inference")
    async def infer(name: str, request: Request) -> JSONResponse:
        _check_model(service, name)
        payload = await _body(request)
        rows, wanted = codec.oip_records(payload)
        scored = await service.score(rows, request_id_of(request.scope))
        return JSONResponse(codec.oip_answer(name, payload, scored, wanted))

    @app.get("/v2/models/{name}", summary="Open Inference Protocol (V2) model metadata")
    async def model_metadata(name: str) -> Record:
        _check_model(service, name)
        return codec.oip_metadata(name, await service.models())


def _health_routes(
    app: FastAPI, service: ScoringService, codec: RequestCodec, app_status: AppStatus | None
) -> None:
    @app.get("/healthz", summary="Liveness")
    @app.get("/v2/health/live", summary="Open Inference Protocol (V2) liveness")
    async def healthz() -> Record:
        return {"live": True}

    @app.get("/readyz", summary="Readiness: every stage loaded and answering")
    async def readyz() -> Record:
        """Ready when every stage answers. ``app`` (under Serve) is the status of the
        whole application: a rollout whose new replicas fail to start shows there
        (``DEPLOY_FAILED``, with the stage's error) while this version keeps serving,
        so the probe stays 200: a load balancer must not drop working replicas."""
        await service.ready()
        answer: Record = {"ready": True}
        if app_status is not None:
            answer["app"] = await app_status()
        return answer

    @app.get("/v2/health/ready", summary="Open Inference Protocol (V2) readiness")
    async def v2_ready() -> Record:
        await service.ready()
        return {"ready": True}

    @app.get("/v2/models/{name}/ready", summary="Open Inference Protocol (V2) model ready")
    async def model_ready(name: str) -> Record:
        _check_model(service, name)
        await service.ready()
        return {"ready": True}

    @app.get("/models", summary="Models served, their versions and the request schema")
    async def models() -> Record:
        return {
            "pipeline": service.spec.name,
            "models": await service.models(),
            "request_schema": codec.record.model_json_schema(),
        }


def _check_model(service: ScoringService, name: str) -> None:
    if name != service.spec.name:
        raise ApiError(
            404, "not_found", f"no model {name!r}; this server has {service.spec.name!r}"
        )


def _error_handlers(app: FastAPI) -> None:
    """Every error in one shape: ``{"error": {status, code, message, details}, ...}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, request_id_of(request.scope))

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(http_error(exc), request_id_of(request.scope))

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
        message = f"internal error; the logs have it under request id {rid}"
        return error_response(ApiError(500, "internal", message), rid)


def _document(app: FastAPI, codec: RequestCodec) -> None:
    """An OpenAPI page that documents the request schema of the spec."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        ref = "#/components/schemas/{model}"
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (codec.body, codec.record):
            doc = model.model_json_schema(ref_template=ref)
            components.update(doc.pop("$defs", {}))
            components[model.__name__] = doc
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
