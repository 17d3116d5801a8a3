"""What a deployment boundary costs: one Ray Serve DeploymentHandle call (as a Ray actor
call, and over gRPC: ``serve.stage_calls``) against one plain Ray actor call,
with the same one-row DataFrame the pipeline passes.

    python -m bench.hop [--calls N] [--concurrency C] [--results DIR] [--smoke]

Sequential: median latency of a call. At concurrency: ``C`` calls in flight at a
time, calls per second. Both targets do nothing but return what they got, with
the same CPU share, so the difference is the hop itself. Local Ray on loopback.
"""

from __future__ import annotations

# Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, when it is first imported: set it
# first, so that the local Ray this script starts listens on loopback only.
# ruff: noqa: E402
from stageline.localray import use_loopback

use_loopback()

import argparse
import logging
import time
from typing import Any

import pandas as pd
import ray
from ray import serve

from bench.processes import free_port
from bench.report import add_run_options, markdown, median_seconds, write
from stageline.localray import local_ray_options

ROW = pd.DataFrame(
    [
        {
            "transaction_id": "t1",
            "customer_id": "c000001",
            "amount": 420.5,
            "merchant_category": "jewelry",
            "ts": pd.Timestamp("2026-02-20T02:15:00Z"),
            "country": "FR",
        }
    ]
)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
class EchoDeployment:
    async def __call__(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame


@ray.remote(num_cpus=0.25, max_concurrency=256)  # type: ignore[call-overload]
class EchoActor:
    async def echo(self, frame: pd.DataFrame) -> pd.DataFrame:
        return frame


def throughput(submit: Any, wait: Any, calls: int, concurrency: int) -> float:
    """Calls per second with ``concurrency`` in flight at a time."""
    started = time.perf_counter()
    done = 0
    while done < calls:
        wait([submit() for _ in range(concurrency)])
        done += concurrency
    return done / (time.perf_counter() - started)


def handle_figures(handle: Any, calls: int, concurrency: int) -> tuple[float, float]:
    """Median seconds of a call, and calls per second with ``concurrency`` in flight."""
    return (
        median_seconds(lambda: handle.remote(ROW).result(), calls),
        throughput(
            lambda: handle.remote(ROW),
            lambda rs: [r.result() for r in rs],
            calls * 4,
            concurrency,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500, help="calls per measure (500)")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight (32)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.calls, args.concurrency = 20, 4
    ray.init(**local_ray_options(num_cpus=4), logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        handle = serve.run(
            EchoDeployment.bind(),  # type: ignore[attr-defined]
            name="hop",
            route_prefix=None,
        )
        actor = EchoActor.remote()  # type: ignore[attr-defined]

        grpc = handle.options(_by_reference=False)  # serve.stage_calls: grpc
        results = {
            name: handle_figures(h, args.calls, args.concurrency)
            for name, h in (("DeploymentHandle", handle), ("DeploymentHandle, gRPC", grpc))
        }
        results |= {
            "Ray actor": (
                median_seconds(lambda: ray.get(actor.echo.remote(ROW)), args.calls),
                throughput(
                    lambda: actor.echo.remote(ROW), ray.get, args.calls * 4, args.concurrency
                ),
            ),
        }
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray.shutdown()

    actor_s, actor_rate = results["Ray actor"]
    rows = [
        {"kind": kind, "sequential_s": s, "calls_per_s": rate}
        for kind, (s, rate) in results.items()
    ]
    table = [[kind, f"{s * 1e3:.2f}", f"{rate:,.0f}"] for kind, (s, rate) in results.items()]
    for kind in ("DeploymentHandle", "DeploymentHandle, gRPC"):
        s, rate = results[kind]
        table.append([f"{kind} / actor", f"{s / actor_s:.1f}x", f"{rate / actor_rate:.2f}x"])
    header = ["call", "sequential p50 ms", f"calls/s at concurrency {args.concurrency}"]
    config = {
        "calls": args.calls,
        "concurrency": args.concurrency,
        "num_cpus": 0.25,
        "smoke": args.smoke,
    }
    write("hop", config, rows, markdown(header, table), args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
