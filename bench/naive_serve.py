"""Target B of bench.online: the pipeline composed as Ray Serve's own examples compose
a model chain, without stageline's serving layer.

    python -m bench.naive_serve --port P --home H [--spec pipelines/fraud.yaml]

One ``@serve.deployment`` per stage of the spec, each holding that one stage, and a
FastAPI ingress that parses the JSON body into a DataFrame, validates it, awaits
each stage's handle in turn and returns the predictions. Ray Serve's defaults for
everything (no batching, default ``max_ongoing_requests``, one replica each) except
a quarter CPU per replica, without which five replicas do not fit on two cores.
"""

# No `from __future__ import annotations`: run as __main__, these classes are pickled by
# value into the replicas, where FastAPI could not resolve string annotations.

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported: set it
# first, so that the local Ray this script starts listens on loopback only.
# ruff: noqa: E402
from stageline.localray import use_loopback

use_loopback()

import argparse
from typing import Any

import pandas as pd
from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from bench.serving import serve_until_stopped
from stageline.context import resolve_home
from stageline.pipeline import StageChain, predictions, records
from stageline.spec import PipelineSpec, load_spec
from stageline_cli.common import DEFAULT_SPEC

api = FastAPI()


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
class Stage:
    def __init__(self, spec: PipelineSpec, name: str, home: str) -> None:
        self.chain = StageChain(spec, [name], home)

    def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        return self.chain(frame)


@serve.deployment(ray_actor_options={"num_cpus": 0.25})
@serve.ingress(api)
class Ingress:
    def __init__(
        self, spec: PipelineSpec, home: str, stages: list[DeploymentHandle[pd.DataFrame]]
    ) -> None:
        self.spec = spec
        self.validate = StageChain(spec, [], home, validate=True)
        self.stages = stages

    @api.post("/predict")
    async def predict(self, request: Request) -> dict[str, Any]:
        body = await request.json()
        frame = self.validate(pd.DataFrame(body["records"]))
        for stage in self.stages:
            frame = await stage.remote(frame)
        return {"predictions": records(predictions(frame, self.spec))}


def build(spec: PipelineSpec, home: str) -> Application:
    stages = [
        Stage.options(name=s.name).bind(spec, s.name, home)  # type: ignore[attr-defined]
        for s in spec.stages
    ]
    return Ingress.bind(spec, home, stages)  # type: ignore[attr-defined,no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--home", help="stageline home with the demo")
    parser.add_argument("--spec", default=DEFAULT_SPEC)
    args = parser.parse_args(argv)
    spec = load_spec(args.spec)
    serve_until_stopped(build(spec, str(resolve_home(args.home))), args.port, spec.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
