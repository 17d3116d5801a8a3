"""Where the graph placement's time goes: one-record requests, one at a time, to
``stageline serve --placement graph``, split by what each part of the graph measured.

    python -m bench.hops [--requests 300] [--home H] [--results DIR] [--smoke]

1. The shipped spec's stages, each called in this process on the frame the stages
   before it made (``bench.capacity``'s measure): a stage's own work, warm.
2. The graph started on a free loopback port (``bench.online``'s target G), warmed
   up, then ``--requests`` requests sent one after another. Its Prometheus metrics,
   read before and after, give for each deployment the mean time Serve spent on a call
   in the replica (``ray_serve_deployment_processing_latency_ms``) and, for a stage
   deployment, the mean time its stages ran in it (``ray_stageline_stage_latency_ms``).

Per stage deployment: its stage's work in one process, the same work in its replica,
and the replica's time around it (merging, the worker thread, Serve's replica). The
ingress's own share is its time less its stage deployments' (the hops' calls and
returns, the request's validation, HTTP).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path
from typing import Any

import requests

from bench.capacity import measure
from bench.online import HOME, JSON_HEADERS, TARGETS, demo_request, serving
from bench.report import add_run_options, markdown, scratch, write
from stageline.pipeline import StageChain
from stageline.spec import load_spec
from stageline_cli.common import DEFAULT_SPEC

ROOT = Path(__file__).resolve().parents[1]
SERVE_METRIC = "ray_serve_deployment_processing_latency_ms"
STAGE_METRIC = "ray_stageline_stage_latency_ms"
_SAMPLE = re.compile(r"^(\w+)_(sum|count)\{(.*)\} (\S+)$")


def scrape(metrics_url: str) -> dict[tuple[str, str], dict[str, float]]:
    """``{(metric, deployment or segment): {"sum", "count"}}`` of the two latency
    histograms, summed over replicas."""
    text = requests.get(metrics_url, timeout=10).text
    out: dict[tuple[str, str], dict[str, float]] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match[1] not in (SERVE_METRIC, STAGE_METRIC):
            continue
        label = "deployment" if match[1] == SERVE_METRIC else "segment"
        owner = re.search(rf'{label}="([^"]+)"', match[3])
        if owner is None:
            continue
        sample = out.setdefault((match[1], owner[1]), {"sum": 0.0, "count": 0.0})
        sample[match[2]] += float(match[4])
    return out


def means(
    before: dict[tuple[str, str], dict[str, float]], after: dict[tuple[str, str], dict[str, float]]
) -> dict[tuple[str, str], float]:
    """Mean ms per call between two scrapes, for each histogram that counted calls."""
    out = {}
    for key, now in after.items():
        then = before.get(key, {"sum": 0.0, "count": 0.0})
        calls = now["count"] - then["count"]
        if calls > 0:
            out[key] = (now["sum"] - then["sum"]) / calls
    return out


def settled(metrics_url: str, before: dict[Any, dict[str, float]], calls: int) -> dict[Any, Any]:
    """A scrape once the ingress's metrics count ``calls`` more calls (Ray exports them
    every few seconds), at most 60 s on."""
    key = (SERVE_METRIC, "ingress")
    deadline = time.monotonic() + 60
    while True:
        after = scrape(metrics_url)
        done = after.get(key, {}).get("count", 0) - before.get(key, {}).get("count", 0)
        if done >= calls or time.monotonic() > deadline:
            return after
        time.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests measured (300)")
    parser.add_argument("--home", type=Path, default=HOME, help=f"default: {HOME}")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be positive")
    count = 10 if args.smoke else args.requests
    home: Path = args.home.resolve()
    _, record, body = demo_request(home)
    spec = load_spec(ROOT / DEFAULT_SPEC)
    chain = StageChain(spec, [s.name for s in spec.stages], home, validate=True)
    measure(chain, [record], 0.05)  # warm-up: first calls cost more
    alone = {
        r["stage"]: r["wall_ms"] for r in measure(chain, [record], 0.05 if args.smoke else 1.0)
    }

    latencies: list[float] = []
    work = scratch(args.results)
    with serving(TARGETS["G"], body, home, work, "hops-G") as server:
        metrics_url = f"http://127.0.0.1:{server.facts['metrics_port']}/metrics"
        session = requests.Session()

        def post() -> float:
            started = time.perf_counter()
            response = session.post(server.url, data=body, headers=JSON_HEADERS, timeout=30)
            response.raise_for_status()
            return (time.perf_counter() - started) * 1000

        warm_up = max(count // 3, 5)
        for _ in range(warm_up):
            post()
        before = settled(metrics_url, {}, warm_up)  # the warm-up counted, not measured
        latencies = [post() for _ in range(count)]
        after = settled(metrics_url, before, count)
    measured = means(before, after)

    rows: list[dict[str, Any]] = []
    stage_serve = 0.0
    for segment in spec.with_placement("graph").segments():  # a stage, or a fused group
        serve_ms = measured.get((SERVE_METRIC, segment.name))
        in_replica = measured.get((STAGE_METRIC, segment.name))
        if segment.inline or serve_ms is None or in_replica is None:
            continue
        stage_serve += serve_ms
        in_process = sum(alone[stage] for stage in segment.stages)
        rows.append(
            {"part": segment.name, "in_process_ms": in_process, "work_ms": in_replica,
             "replica_ms": serve_ms, "around_ms": serve_ms - in_replica}
        )  # fmt: skip
    ingress = measured.get((SERVE_METRIC, "ingress"), float("nan"))
    rows.append(
        {"part": "ingress", "in_process_ms": alone["validate"], "work_ms": None,
         "replica_ms": ingress, "around_ms": ingress - stage_serve}
    )  # fmt: skip
    client = statistics.median(latencies)
    table = markdown(
        ["part", "work in one process, ms", "work in its replica, ms", "Serve's time in the "
         "replica, ms", "the replica's own (ingress: less its stages), ms"],
        [[r["part"], f"{r['in_process_ms']:.2f}",
          "-" if r["work_ms"] is None else f"{r['work_ms']:.2f}",
          f"{r['replica_ms']:.2f}", f"{r['around_ms']:.2f}"] for r in rows],
    )  # fmt: skip
    table += (
        f"\n\nClient p50 {client:.1f} ms over {len(latencies)} requests one at a time; the "
        f"pipeline in one process {sum(alone.values()):.1f} ms (its stages, warm, summed)."
    )
    config = {"spec": DEFAULT_SPEC, "requests": count, "placement": "graph", "smoke": args.smoke}
    summary = {"client_p50_ms": client, "in_process_ms": sum(alone.values())}
    write("hops", config, rows, table, args.results, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
