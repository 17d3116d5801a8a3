"""Target E of bench.online: the engine's ceiling. Ray Serve with ``stageline serve``'s
settings answering POST /predict with a constant, doing no work at all.

    python -m bench.noop_serve --port P [--spec pipelines/fraud.yaml]

The environment ``stageline serve`` sets, a local Ray with its options, and one
FastAPI ingress deployment with the ingress options of the spec (CPU share,
``max_ongoing_requests``, ``max_queued_requests``, autoscaling) that reads the
body and returns a small constant JSON.
"""

# No `from __future__ import annotations`: run as __main__, this class is pickled by
# value into the replica, where FastAPI could not resolve string annotations.

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported: set it
# first, so that the local Ray this script starts listens on loopback only.
# ruff: noqa: E402
from stageline.localray import use_loopback

use_loopback()

import argparse
import os
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application, Deployment

from bench.serving import serve_until_stopped
from serve_app.app import INGRESS, _autoscaling
from serve_app.local import serve_env
from stageline.spec import PipelineSpec, load_spec
from stageline_cli.common import DEFAULT_SPEC

api = FastAPI()
ANSWER: dict[str, Any] = {
    "predictions": [{"transaction_id": "t1", "score": 0.5, "label": False, "reasons": []}],
    "model": {"name": "noop", "version": 1},
}


@serve.ingress(api)
class Noop:
    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse(ANSWER)


def build(spec: PipelineSpec) -> Application:
    ingress = spec.serve.ingress
    deployment = cast(Deployment, serve.deployment(Noop)).options(
        name=INGRESS,
        ray_actor_options={"num_cpus": ingress.num_cpus},
        autoscaling_config=_autoscaling(
            ingress.autoscaling, ingress.max_ongoing_requests, busy=False
        ),
        max_ongoing_requests=ingress.max_ongoing_requests,
        max_queued_requests=ingress.max_queued_requests,
    )
    return deployment.bind()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--spec", default=DEFAULT_SPEC)
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    # Before Ray starts: Serve's controller and proxies read these (as in stageline serve).
    for key, value in serve_env().items():
        os.environ.setdefault(key, value)
    serve_until_stopped(build(spec), args.port, "noop")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
