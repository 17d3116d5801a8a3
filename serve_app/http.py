"""HTTP plumbing of the ingress: the one error shape, body limits, API keys, request ids.

Kept apart from the composition logic so each piece is small and testable.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
EXEMPT_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready")
"""Probes work without the API key (a load balancer has none), and are answered even at
capacity (a probe that failed under load would take a busy replica out of service)."""
RETRY_AFTER_S = 1
"""What every 503 asks a client to wait before it retries (``Retry-After``)."""
AT_CAPACITY = "the service is at capacity"


class ApiError(Exception):
    """An error the client gets as ``{"error": {...}, "request_id": ...}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details or []
        self.headers = headers or {}


def unavailable(reason: str) -> ApiError:
    """The 503 of every cause that passes (a full queue, a dependency down): ``reason``,
    and when to retry."""
    return ApiError(
        503, "unavailable", f"{reason}; retry shortly", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def body_timeout(seconds: float) -> ApiError:
    """The 408 of a request whose body is still arriving after ``seconds``."""
    return ApiError(
        408,
        "request_timeout",
        f"the request body did not arrive within {seconds:g} s; send it at once, and retry",
        headers={"Connection": "close"},
    )


def error_body(
    status: int, code: str, message: str, request_id: str, details: list[dict[str, Any]] | None
) -> dict[str, Any]:
    error: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error, "request_id": request_id}


def error_response(error: ApiError, request_id: str) -> JSONResponse:
    body = error_body(error.status, error.code, error.message, request_id, error.details)
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def request_id_of(scope: Scope) -> str:
    """The request's id. Serve's proxy puts it on the request (the client's
    ``X-Request-ID`` or a fresh one) and on the response; every replica's log
    lines carry it too."""
    state = scope.setdefault("state", {})
    rid = state.get("request_id")
    if rid is None:
        # As Serve has it, so the body, the response header and the logs all agree.
        rid = _header(scope, REQUEST_ID_HEADER) or uuid.uuid4().hex
        state["request_id"] = rid
    return str(rid)


def route_path(scope: Scope) -> str:
    """The path within the app: Serve mounts an app at its route prefix (``root_path``)."""
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


def _header(scope: Scope, name: str) -> str | None:
    raw = name.encode()
    for key, value in scope.get("headers", ()):
        if key.lower() == raw:
            return str(value.decode("latin-1"))
    return None


class ApiKey:
    """The configured API key, read where the ingress runs (env var, else file).

    Only its SHA-256 is kept; requests are compared in constant time.
    """

    def __init__(self, env: str = "STAGELINE_API_KEY", file: str | None = None) -> None:
        self.env = env
        self.file = file
        self._digest: bytes | None = None
        self._loaded = False

    def load(self) -> bool:
        """Read the key; True when one is configured."""
        key = os.environ.get(self.env, "")
        if not key and self.file:
            key = Path(self.file).read_text().strip()
        self._digest = hashlib.sha256(key.encode()).digest() if key else None
        self._loaded = True
        return self._digest is not None

    @property
    def required(self) -> bool:
        if not self._loaded:
            self.load()
        return self._digest is not None

    def matches(self, presented: str | None) -> bool:
        if not self.required:
            return True
        given = hashlib.sha256((presented or "").encode()).digest()
        return presented is not None and hmac.compare_digest(given, self._digest or b"")


def presented_key(scope: Scope) -> str | None:
    """``X-API-Key: KEY`` or ``Authorization: Bearer KEY``."""
    key = _header(scope, "x-api-key")
    if key is not None:
        return key
    auth = _header(scope, "authorization") or ""
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class GuardMiddleware:
    """Request id, API key, body size and body deadline, before FastAPI reads anything.

    A body over the limit is refused from its Content-Length, or as soon as
    the streamed bytes pass the limit, never after buffering all of it. A body
    still arriving ``body_timeout_s`` after the request started is a 408: a
    client that trickles its body (by accident or on purpose) does not hold a
    request slot of the replica for longer than that.
    """

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, api_key: ApiKey, body_timeout_s: float
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        if route_path(scope) not in EXEMPT_PATHS and not self.api_key.matches(presented_key(scope)):
            error = ApiError(
                401,
                "unauthorized",
                "missing or wrong API key: send it as 'X-API-Key: KEY' or "
                "'Authorization: Bearer KEY'",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error_response(error, rid)(scope, receive, send)
            return
        length = _header(scope, "content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await error_response(self._too_large(), rid)(scope, receive, send)
            return
        seen = 0
        complete = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited() -> Message:
            nonlocal seen, complete
            if complete:  # the body is in: what follows (a disconnect) may take its time
                return await receive()
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.0))
            except asyncio.TimeoutError:
                raise _BodyTimeoutError from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise _BodyTooLargeError
                complete = not message.get("more_body", False)
            return message

        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, send_tracked)
        except _BodyTooLargeError:
            if not started:
                await error_response(self._too_large(), rid)(scope, receive, send)
        except _BodyTimeoutError:
            if not started:
                await error_response(self._too_slow(), rid)(scope, receive, send)

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            "payload_too_large",
            f"request body is over {self.max_body_bytes} bytes: send fewer records per request",
        )

    def _too_slow(self) -> ApiError:
        return body_timeout(self.body_timeout_s)


class AdmissionMiddleware:
    """At most ``limit`` requests in this replica at once; the next one is answered at
    once with our JSON 503 and ``Retry-After``, before anything reads it.

    Serve's own limits answer with a plain-text 503 (its proxy's queue, or the replica
    in HAProxy mode): ``build_app`` sets them above this one, so a request over capacity
    meets this limit first. Probes pass (:data:`EXEMPT_PATHS`)."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or route_path(scope) in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            response = error_response(unavailable(AT_CAPACITY), request_id_of(scope))
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class _BodyTooLargeError(Exception):
    pass


class _BodyTimeoutError(Exception):
    pass


def require_json(content_type: str | None) -> None:
    """A body declared as anything but JSON is a 415; an undeclared one is read as JSON."""
    if content_type is None:
        return
    media = content_type.partition(";")[0].strip().lower()
    kind, _, subtype = media.partition("/")
    if kind == "application" and (subtype == "json" or subtype.endswith("+json")):
        return
    raise ApiError(
        415,
        "unsupported_media_type",
        f"the body must be JSON, not {media or 'an empty type'!r}: "
        "send 'Content-Type: application/json'",
    )


def parse_json(body: bytes) -> Any:
    """Strict JSON: NaN and Infinity are not JSON; a duplicate key is ambiguous."""

    def reject_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON (send null for a missing value)")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ValueError(f"duplicate key {key!r}")
            out[key] = value
        return out

    try:
        return json.loads(body, parse_constant=reject_constant, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise ApiError(422, "invalid_json", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(422, "invalid_json", f"request body is not valid JSON: {e}") from None
