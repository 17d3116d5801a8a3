"""Capacity: each stage's CPU per call and per row, measured in this process, and from
it the replicas per stage and the nodes a target rate needs in the ``graph`` placement.

    python -m bench.capacity [--rps 2000] [--records 1] [--trees 0] [--node-cpus 8]
                             [--target-busy 0.7] [--home H] [--results DIR] [--smoke]

1. The shipped spec's stages, built once in this process as a stage replica builds them
   (the request validation the ingress runs, then every stage), on the demo home under
   ``--home``; with ``--trees N`` the model stage serves ``bench.heavy``'s model of N
   deep trees (``fraud@heavy``) instead of the demo's.
2. For frames of :data:`SIZES` rows (the demo's held-out records, each its own
   transaction id), each stage called on the frame the stages before it produced
   (validation: what the ingress runs once the record model has validated the records,
   their frame typed as the validation stage types it),
   repeatedly, for about ``1 s`` per stage and size: the CPU time of the calling thread
   (``time.thread_time``: what the stage costs whatever else runs on the machine) and
   the wall time, medians over the calls.
3. A fit per stage, least squares over the sizes: CPU ms per call = fixed + per row x
   rows. The fixed part is what merging requests into one call saves.
4. The plan for ``--rps`` requests per second of ``--records`` records each, sent one
   call per request (no merging: the conservative case): a stage needs
   ``rps x cost(records)`` seconds of CPU per second, and replicas enough to keep each
   busy ``--target-busy`` of the time (a replica runs its stages one call at a time, so
   it works at most one core); the nodes are the CPU over ``--node-cpus`` each, with the
   same headroom.
5. The whole in-process path at each size (``Pipeline.predict``: the stages, then the
   output contract), and the online path past the record model (the ingress's typed
   frame of validated records, the stages after validation, the answer's records),
   against the model's floor on the same rows: XGBoost's ``inplace_predict`` plus the
   approximate contributions reasons come from.

What it leaves out, and the README says so: the HTTP ingress, Serve's proxy and the
hops between deployments (``python -m bench.online`` measures the graph as a whole, and
its E target Serve's own ceiling on this machine).
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xgboost as xgb

from bench.heavy import register_heavy_model
from bench.online import HOME, copies, demo_request
from bench.report import add_run_options, markdown, write
from stageline.outputs import OutputContract
from stageline.pipeline import StageChain
from stageline.registry.metadata import parse_model_ref
from stageline.spec import load_spec
from stageline.stages.model import XGBoostPredictor
from stageline.stages.validate import records_frame
from stageline_cli.common import DEFAULT_SPEC

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 10, 50, 200)
"""Rows per call measured."""
SMOKE_SIZES = (1, 10)
SECONDS = 1.0
"""About how long each stage is called at each size."""


def timed(call: Callable[[], Any], seconds: float) -> dict[str, Any]:
    """Median CPU (of this thread) and wall ms of ``call`` over about ``seconds`` of
    calls (at least 5)."""
    cpu: list[float] = []
    wall: list[float] = []
    began = time.perf_counter()
    while len(cpu) < 5 or time.perf_counter() - began < seconds:
        c0, w0 = time.thread_time(), time.perf_counter()
        call()
        cpu.append((time.thread_time() - c0) * 1000)
        wall.append((time.perf_counter() - w0) * 1000)
    return {"calls": len(cpu), "cpu_ms": statistics.median(cpu), "wall_ms": statistics.median(wall)}


def measure(
    chain: StageChain, records: list[dict[str, Any]], seconds: float
) -> list[dict[str, Any]]:
    """Each stage of ``chain`` on what the stages before it made of ``records``: median
    CPU and wall ms per call over about ``seconds`` of calls (at least 5). Validation is
    what the ingress does once the record model has validated the records: their frame
    typed as the validation stage would type it."""
    out = []
    model = chain.spec.request.record_model()
    validated = [model.model_validate(r).model_dump() for r in records]
    current = pd.DataFrame.from_records(records)
    for name, stage in chain:
        call: Callable[[], pd.DataFrame] = functools.partial(stage, current)
        if name == "validate":
            call = functools.partial(records_frame, validated, chain.spec.request)
        out.append({"stage": name, "rows": len(records), **timed(call, seconds)})
        current = call()
    return out


def measure_floor(
    chain: StageChain, records: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    """For ``records``: what ``Pipeline.predict`` runs on their frame (every stage, then
    the output contract), and what the ingress runs on them once the record model has
    validated them (their typed frame, the stages after validation, the answer's
    records), against the model's own floor: XGBoost's ``inplace_predict`` plus the
    approximate contributions its reasons come from, on the model stage's matrix."""
    spec = chain.spec
    contract = OutputContract(spec)
    frame = pd.DataFrame.from_records(records)
    whole = timed(lambda: contract.frame(chain(frame)), seconds)
    model = spec.request.record_model()
    validated = [model.model_validate(r).model_dump() for r in records]
    stages = [stage for name, stage in chain if name != "validate"]

    def online() -> None:
        current = records_frame(validated, spec.request)
        for stage in stages:
            current = stage(current)
        contract.records(current)

    served = timed(online, seconds)
    current = frame
    for _, stage in chain:
        if isinstance(stage, XGBoostPredictor):
            break
        current = stage(current)
    else:
        raise SystemExit("the shipped spec has no XGBoostPredictor stage")
    matrix, booster = stage.features(current), stage.loaded.booster
    names = list(stage.loaded.metadata.features)

    def floor() -> None:
        booster.inplace_predict(matrix, validate_features=False)
        rows = xgb.DMatrix(matrix, feature_names=names, nthread=stage.nthread)
        booster.predict(rows, pred_contribs=True, approx_contribs=True)

    floor_ms = timed(floor, seconds)["cpu_ms"]
    return {"rows": len(frame), "predict_cpu_ms": whole["cpu_ms"], "floor_cpu_ms": floor_ms,
            "ratio": whole["cpu_ms"] / floor_ms, "online_cpu_ms": served["cpu_ms"],
            "online_ratio": served["cpu_ms"] / floor_ms}  # fmt: skip


def fit(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per stage: CPU ms per call = ``fixed_ms`` + ``per_row_ms`` x rows (least squares,
    neither below 0)."""
    fits = {}
    for name in dict.fromkeys(r["stage"] for r in rows):
        mine = [r for r in rows if r["stage"] == name]
        n = np.array([r["rows"] for r in mine], dtype=float)
        y = np.array([r["cpu_ms"] for r in mine])
        per_row, fixed = np.polyfit(n, y, 1) if len(set(n)) > 1 else (0.0, float(y.mean()))
        fits[name] = {"fixed_ms": max(0.0, float(fixed)), "per_row_ms": max(0.0, float(per_row))}
    return fits


def plan(
    fits: dict[str, dict[str, float]], rps: float, records: int, target_busy: float,
    node_cpus: float,
) -> dict[str, Any]:  # fmt: skip
    """Replicas per stage and nodes for ``rps`` requests/s of ``records`` records each,
    one call per request."""
    stages = {}
    for name, f in fits.items():
        cores = rps * (f["fixed_ms"] + f["per_row_ms"] * records) / 1000
        stages[name] = {"cpu_cores": cores, "replicas": max(1, math.ceil(cores / target_busy))}
    total = sum(s["cpu_cores"] for s in stages.values())
    nodes = max(1, math.ceil(total / (node_cpus * target_busy)))
    return {"stages": stages, "cpu_cores": total, "nodes": nodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    option = parser.add_argument
    option("--rps", type=float, default=2000.0, help="requests per second to plan for (2000)")
    option("--records", type=int, default=1, help="records per request (1)")
    option("--trees", type=int, default=0, help="serve bench.heavy's model of N trees (0: demo's)")
    option("--node-cpus", type=float, default=8.0, help="CPUs per node (8)")
    option("--target-busy", type=float, default=0.7, help="busy share to plan at (0.7)")
    option("--home", type=Path, default=HOME, help=f"default: {HOME}")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.rps <= 0 or args.records < 1 or args.trees < 0 or args.node_cpus <= 0:
        parser.error("--rps, --records and --node-cpus must be positive, --trees >= 0")
    if not 0 < args.target_busy <= 1:
        parser.error("--target-busy must be in (0, 1]")
    home: Path = args.home.resolve()
    _, record, _ = demo_request(home)
    spec = load_spec(ROOT / DEFAULT_SPEC)
    chain = StageChain(spec, [s.name for s in spec.stages], home, validate=True)
    if args.trees:
        _, alias = parse_model_ref(register_heavy_model(home, args.trees))
        chain.reconfigure({"model": {"alias": alias}})
    sizes, seconds = (SMOKE_SIZES, 0.05) if args.smoke else (SIZES, SECONDS)
    measure(chain, copies(record, sizes[-1]), seconds)  # warm-up: first calls cost more
    rows = []
    for size in sizes:
        rows += measure(chain, copies(record, size), seconds)
        print(f"measured {size} rows per call", flush=True)
    floors = [measure_floor(chain, copies(record, size), seconds) for size in sizes]
    fits = fit(rows)
    planned = plan(fits, args.rps, args.records, args.target_busy, args.node_cpus)
    config = {"spec": DEFAULT_SPEC, "sizes": list(sizes), "seconds_per_point": seconds,
              "trees": args.trees, "rps": args.rps, "records": args.records,
              "node_cpus": args.node_cpus, "target_busy": args.target_busy,
              "smoke": args.smoke}  # fmt: skip
    write("capacity", config, rows, tables(rows, fits, planned, floors, args), args.results,
          {"fits": fits, "plan": planned, "floor": floors})  # fmt: skip
    return 0


def tables(
    rows: list[dict[str, Any]], fits: dict[str, dict[str, float]], planned: dict[str, Any],
    floors: list[dict[str, Any]], args: argparse.Namespace,
) -> str:  # fmt: skip
    sizes = sorted({r["rows"] for r in rows})
    by = {(r["stage"], r["rows"]): r for r in rows}
    header = ["stage", *(f"{n} rows: CPU ms (wall)" for n in sizes), "fixed ms", "per row ms"]
    measured = [
        [name, *(f"{by[name, n]['cpu_ms']:.2f} ({by[name, n]['wall_ms']:.2f})" for n in sizes),
         f"{f['fixed_ms']:.3f}", f"{f['per_row_ms']:.4f}"]
        for name, f in fits.items()
    ]  # fmt: skip
    model = "the demo's model" if not args.trees else f"a model of {args.trees} trees of depth 8"
    intro = (
        f"Each stage of the shipped spec ({model}) called in one process on frames of "
        f"{', '.join(map(str, sizes))} rows: median CPU ms of the calling thread per call "
        "(wall ms beside it), and a least-squares fit CPU = fixed + per row x rows."
    )
    stages = planned["stages"]
    plan_rows = [
        [name, f"{s['cpu_cores']:.2f}", s["replicas"]] for name, s in stages.items()
    ]  # fmt: skip
    plan_intro = (
        f"For {args.rps:,.0f} requests/s of {args.records} record(s), one stage call per "
        f"request (no merging), replicas kept {args.target_busy:.0%} busy: "
        f"{planned['cpu_cores']:.1f} cores of stage work, {planned['nodes']} node(s) of "
        f"{args.node_cpus:g} CPUs at the same headroom. Not counted: the HTTP ingress, "
        "Serve's proxy and the hops between deployments (`python -m bench.online`)."
    )
    floor_intro = (
        "The whole in-process path (`Pipeline.predict`: every stage, then the output "
        "contract), and the online one past the record model (the ingress's typed frame of "
        "the validated records, the stages after validation, the answer's records), "
        "against the model's floor, XGBoost's `inplace_predict` plus the approximate "
        "contributions reasons come from, on the same rows: median CPU ms."
    )
    floor_rows = [
        [f["rows"], f"{f['predict_cpu_ms']:.2f}", f"{f['online_cpu_ms']:.2f}",
         f"{f['floor_cpu_ms']:.2f}", f"{f['ratio']:.1f}x", f"{f['online_ratio']:.1f}x"]
        for f in floors
    ]  # fmt: skip
    return "\n\n".join([
        intro, markdown(header, measured), floor_intro,
        markdown(["rows", "Pipeline.predict CPU ms", "online path CPU ms", "model floor CPU ms",
                  "Pipeline.predict / floor", "online / floor"], floor_rows),
        plan_intro, markdown(["stage", "CPU cores", "replicas"], plan_rows),
    ])  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
