"""Online: single-record POST /predict of the demo pipeline, ``stageline serve``
against the other ways to serve it, under load from ``wrk``.

    python -m bench.online [--targets A N G B C D E] [--concurrency 1 8 32 64 128]
                           [--duration S] [--warmup S] [--rounds N] [--peak-rounds N]
                           [--home H] [--results DIR] [--smoke]

Targets, each its own process on a free loopback port, started, polled until it
answers 200, measured, stopped, one at a time:

- A   ``stageline serve``, exactly as shipped (the prediction log on);
- N   ``stageline serve`` with the prediction log off: A's cost of logging;
- G   ``stageline serve --placement graph``: the shipped spec in the ``graph``
  placement, every stage an autoscaling deployment of its own behind an ingress that
  only routes (what ``cluster/serve.yaml`` ships), all on this one machine;
- B   the stages composed as Ray Serve's examples compose a chain (``bench.naive_serve``);
- C   FastAPI with uvicorn, 2 workers, no Ray (``bench.fastapi_app``);
- D   no HTTP: ``Pipeline.predict`` in this process, the floor;
- E   a no-op app with A's Serve settings, the engine's ceiling (``bench.noop_serve``).

At each concurrency (= wrk connections, one wrk thread), a warm-up whose result is
discarded, then the measure: p50 and p99 latency, requests per second, errors
(connect, read, write, HTTP status >= 400, timeouts past 2 s). A target's max RPS is
the best rate with p99 <= 100 ms and no errors. Then A, G and C again at 1 client
(those of them in the run), each started afresh, taking turns for ``--rounds``
rounds: the median of each is their latency comparison (:func:`rounds_in_turn`). And A
and N in turn at :data:`PEAK_CONCURRENCY` clients for ``--peak-rounds``: the median of
their rates is what the prediction log costs at peak. The home defaults to
``bench/.data/home`` (the demo is built there on first use).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import requests
import yaml

from bench.processes import OWN_SESSION, free_port, local_env, start, stop_group
from bench.report import DATA, add_run_options, markdown, median_seconds, scratch, write
from stageline.demo.world import ensure_demo, example_record
from stageline.pipeline import Pipeline
from stageline.spec import PipelineSpec, load_spec
from stageline_cli.common import DEFAULT_SPEC

ROOT = Path(__file__).resolve().parents[1]
LUA = Path(__file__).with_name("wrk_predict.lua")
HOME = DATA / "home"
LEVELS = (1, 8, 32, 64, 128)
SMOKE_LEVELS = (1, 8)
IDLE_ROUNDS = 3
"""Rounds of the 1-client comparison of A, G and C (see :func:`rounds_in_turn`)."""
PEAK_CONCURRENCY = 32
"""Clients of the peak comparison of A and N: where A's rate tops out on two cores."""
P99_LIMIT_MS = 100.0
READY_TIMEOUT_S = 180.0
WRK_TIMEOUT = "2s"
D_CALLS = 500
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Target:
    key: str
    """The CLI spelling."""
    label: str
    """The results' spelling."""
    name: str


TARGETS = {
    t.key: t
    for t in (
        Target("A", "A", "stageline (shipped defaults)"),
        Target("N", "N", "stageline, prediction log off"),
        Target("G", "G", "stageline, graph placement"),
        Target("B", "B", "naive Ray Serve"),
        Target("C", "C", "FastAPI/uvicorn, 2 workers"),
        Target("D", "D", "in-process floor"),
        Target("E", "E", "engine ceiling (no-op Ray Serve)"),
    )
}
ROUND_KEYS = ("A", "G", "C")
"""The targets taken in turn at one client (those of them measured in the run)."""
PEAK_KEYS = ("A", "N")
"""The targets taken in turn at :data:`PEAK_CONCURRENCY` clients."""
RATIOS = (("A", "N"), ("A", "B"), ("A", "C"), ("G", "A"), ("G", "C"), ("A", "E"))


class TargetError(Exception):
    """A target did not start or stopped answering; the message says what its log says."""


# --------------------------------------------------------------------------- targets


def command(key: str, port: int, home: Path, work: Path) -> list[str]:
    """How target ``key`` is started, from the project root."""
    py = sys.executable
    if key == "N":
        return [*command("A", port, home, work), "--spec", str(spec_without_log(work))]
    if key in ("A", "G"):
        # A free metrics port, not the default 8080: a server already running on this
        # machine must not make the benchmark fail. Ray exports metrics either way.
        serve = [py, "-m", "stageline_cli", "serve", "--port", str(port), "--home", str(home),
                 "--metrics-port", str(free_port())]  # fmt: skip
        return serve if key == "A" else [*serve, "--placement", "graph"]
    if key == "B":
        return [py, "-m", "bench.naive_serve", "--port", str(port), "--home", str(home)]
    if key == "C":
        return [py, "-m", "uvicorn", "bench.fastapi_app:app", "--workers", "2",
                "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    if key == "E":
        return [py, "-m", "bench.noop_serve", "--port", str(port)]
    raise ValueError(f"target {key} is not a server")


@dataclass(frozen=True)
class Server:
    """A target started by :func:`serving`."""

    url: str
    """Its ``/predict``."""
    process: subprocess.Popen[bytes]
    log: Path
    facts: dict[str, Any]
    """Its command, log and seconds until ready; once stopped, the stop's seconds and what
    had to be killed."""

    def check(self) -> None:
        """TargetError if it has exited."""
        if self.process.poll() is not None:
            raise TargetError(f"exited with status {self.process.returncode}:\n{tail(self.log)}")


@contextmanager
def serving(target: Target, body: str, home: Path, work: Path, log_name: str) -> Iterator[Server]:
    """Start ``target`` on a free loopback port, its output to ``work/logs/<log_name>.log``;
    once it answers ``body`` with 200, the block runs; then it is stopped with everything
    it started (``stop_group``), however the block is left."""
    port = free_port()
    argv = command(target.key, port, home, work)
    log = work / "logs" / f"{log_name}.log"
    print(f"{target.label}: {target.name}: starting", flush=True)
    process = start(argv, log, local_env(STAGELINE_HOME=str(home)), ROOT)
    facts: dict[str, Any] = {"command": " ".join(argv), "log": str(log)}
    if "--metrics-port" in argv:  # where Ray exports its Prometheus metrics (bench.hops)
        facts["metrics_port"] = int(argv[argv.index("--metrics-port") + 1])
    server = Server(f"http://127.0.0.1:{port}/predict", process, log, facts)
    try:
        facts["ready_s"] = wait_ready(server.url, body, process, log, READY_TIMEOUT_S)
        yield server
    finally:
        started = time.monotonic()
        facts["killed"] = stop_group(process)
        facts["stop_s"] = time.monotonic() - started


def wait_ready(
    url: str, body: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float
) -> float:
    """Seconds until POST ``url`` answers 200; TargetError if the process exits first
    or ``timeout_s`` passes."""
    started = time.monotonic()
    last = "no answer"
    while True:
        if process.poll() is not None:
            raise TargetError(f"exited with status {process.returncode}:\n{tail(log)}")
        try:
            response = requests.post(url, data=body, headers=JSON_HEADERS, timeout=10)
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"{response.status_code} {response.text[:300]}"
        except requests.RequestException as e:
            last = type(e).__name__
        if time.monotonic() - started > timeout_s:
            raise TargetError(f"no 200 within {timeout_s:.0f} s (last: {last}):\n{tail(log)}")
        time.sleep(0.5)


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


def wrk(
    url: str,
    connections: int,
    seconds: float,
    body: str,
    *,
    script: Path = LUA,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One wrk run: what ``script`` prints (``wrk_predict.lua``: closed loop), plus the
    rate and wrk's own CPU. ``env``: settings of the script besides the body."""
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{math.ceil(seconds)}s", "--latency",
            "--timeout", WRK_TIMEOUT, "-s", str(script), url]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=local_env(WRK_BODY=body, **(env or {})), **OWN_SESSION,
    )  # fmt: skip
    whole = math.ceil(seconds) == seconds
    try:
        try:
            out, err = proc.communicate(timeout=seconds + 30 if whole else seconds)
        except subprocess.TimeoutExpired:
            # wrk's -d takes whole seconds; on SIGINT it stops and reports what it has.
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=30)
    finally:
        stop_group(proc, grace_s=5)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    found = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not found:
        raise TargetError(f"wrk failed (status {proc.returncode}): {err.strip() or out[-500:]}")
    result: dict[str, Any] = json.loads(found[-1])
    duration = result["duration_s"] or seconds
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["rps"] = result["requests"] / duration
    result["wrk_cpu"] = cpu / duration
    return result


def measure_server(
    target: Target,
    levels: list[int],
    seconds: float,
    warmup: float,
    body: str,
    home: Path,
    work: Path,
    log_name: str = "",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Start ``target``, measure it at every level, stop it: (rows, facts)."""
    rows: list[dict[str, Any]] = []
    with serving(target, body, home, work, f"online-{log_name or target.key}") as server:
        for c in levels:
            if warmup > 0:
                wrk(server.url, c, warmup, body)
            result = wrk(server.url, c, seconds, body)
            server.check()
            rows.append({"target": target.label, "name": target.name, "concurrency": c, **result})
            print(f"  {line(rows[-1])}", flush=True)
    return rows, server.facts


def spec_without_log(work: Path) -> Path:
    """The shipped spec with its prediction log off (target N), written under ``work``."""
    data = yaml.safe_load((ROOT / DEFAULT_SPEC).read_text())
    data["prediction_log"] = {"enabled": False}
    path = work / "fraud-no-prediction-log.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def rounds_in_turn(
    keys: Sequence[str],
    clients: int,
    rounds: int,
    seconds: float,
    warmup: float,
    body: str,
    home: Path,
    work: Path,
) -> list[dict[str, Any]]:
    """The targets ``keys`` at ``clients`` clients, each started afresh, in turn,
    ``rounds`` times.

    This shared machine's load moves a target measured a few minutes after another
    20% faster or slower for no reason of its own. Taking turns puts them in the same
    minutes; the median of each over the rounds is their comparison."""
    rows: list[dict[str, Any]] = []
    for n in range(1, rounds + 1):
        for key in keys:
            target = TARGETS[key]
            print(f"{clients}-client round {n}/{rounds}:", end=" ", flush=True)
            measured, _ = measure_server(
                target, [clients], seconds, warmup, body, home, work, f"{key}-c{clients}-round{n}"
            )
            rows += [{**row, "round": n} for row in measured]
    return rows


def measure_in_process(
    spec: PipelineSpec, home: Path, record: dict[str, Any], calls: int
) -> dict[str, Any]:
    """Target D: one record through ``Pipeline.predict`` in this process."""
    target = TARGETS["D"]
    print(f"{target.label}: {target.name}", flush=True)
    pipeline = Pipeline(spec, home)
    frame = pd.DataFrame([record])
    seconds = median_seconds(lambda: pipeline.predict(frame), calls)
    row = {"target": target.label, "name": target.name, "concurrency": 1,
           "p50_ms": seconds * 1e3, "rps": 1 / seconds, "calls": calls}  # fmt: skip
    print(f"  {line(row)}", flush=True)
    return row


# --------------------------------------------------------------------------- results


def errors(row: dict[str, Any]) -> int:
    return sum(row.get("errors", {}).values())


def line(row: dict[str, Any]) -> str:
    p99 = f", p99 {row['p99_ms']:.1f} ms" if "p99_ms" in row else ""
    return (
        f"c={row['concurrency']}: p50 {row['p50_ms']:.1f} ms{p99}, {row['rps']:,.0f} req/s, "
        f"{errors(row)} errors"
    )


def max_rps(rows: list[dict[str, Any]], label: str) -> float:
    """The best rate with p99 within the limit and no errors; 0 if none. (D: calls/s.)"""
    good = [
        r["rps"]
        for r in rows
        if r["target"] == label and r.get("p99_ms", 0) <= P99_LIMIT_MS and errors(r) == 0
    ]
    return max(good, default=0.0)


def summarize(
    rows: list[dict[str, Any]],
    targets: list[Target],
    facts: dict[str, dict[str, Any]],
    idle: list[dict[str, Any]] | None = None,
    peak: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    best = {t.label: max_rps(rows, t.label) for t in targets if t.label in facts}
    ratios: dict[str, float | None] = {}
    for top, bottom in RATIOS:
        a, b = TARGETS[top].label, TARGETS[bottom].label
        if a in best and b in best:
            ratios[f"{a}/{b} max RPS"] = best[a] / best[b] if best[a] and best[b] else None
    p50 = {
        r["target"]: r["p50_ms"]
        for r in rows
        if r["concurrency"] == 1 and r["target"] in ("A", "C", "G") and r.get("requests")
    }
    if "A" in p50 and "C" in p50:
        ratios["A/C p50 at concurrency 1 (the pass above)"] = p50["A"] / p50["C"]
    if "A" in p50 and "G" in p50:
        ratios["G/A p50 at concurrency 1"] = p50["G"] / p50["A"]
    medians = {
        key: statistics.median(r["p50_ms"] for r in idle or [] if r["target"] == key)
        for key in ROUND_KEYS
        if any(r["target"] == key for r in idle or [])
    }
    if idle:
        rounds = max(r["round"] for r in idle)
        turns = f"{rounds} alternating rounds" if rounds > 1 else "1 round"
        for top, bottom in (("A", "C"), ("G", "A")):
            if top in medians and bottom in medians:
                ratios[f"{top}/{bottom} p50 at concurrency 1 (median of {turns})"] = (
                    medians[top] / medians[bottom]
                )
    peak_rps = {
        key: statistics.median(r["rps"] for r in peak or [] if r["target"] == key)
        for key in PEAK_KEYS
        if any(r["target"] == key for r in peak or [])
    }
    if peak and "A" in peak_rps and "N" in peak_rps:
        rounds = max(r["round"] for r in peak)
        turns = f"{rounds} alternating rounds" if rounds > 1 else "1 round"
        level = peak[0]["concurrency"]
        ratios[f"A/N req/s at concurrency {level} (median of {turns})"] = (
            peak_rps["A"] / peak_rps["N"]
        )
    return {
        "max_rps": best,
        "ratios": ratios,
        "targets": facts,
        "idle_p50_ms": medians,
        "peak_rps": peak_rps,
    }


def tables(
    rows: list[dict[str, Any]],
    targets: list[Target],
    summary: dict[str, Any],
    idle: list[dict[str, Any]] | None = None,
    peak: list[dict[str, Any]] | None = None,
) -> str:
    def ms(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.1f}" if key in row else "-"

    def error_text(row: dict[str, Any]) -> str:
        if "errors" not in row:
            return "-"
        kinds = [f"{k} {v}" for k, v in row["errors"].items() if v]
        return f"{errors(row)} ({', '.join(kinds)})" if kinds else "0"

    levels = [
        [r["target"] + (" (in process)" if r["target"] == "D" else ""), r["concurrency"],
         ms(r, "p50_ms"), ms(r, "p99_ms"), f"{r['rps']:,.0f}", error_text(r),
         f"{r['wrk_cpu']:.0%}" if "wrk_cpu" in r else "-"]
        for r in rows
    ]  # fmt: skip
    per_target = []
    for t in targets:
        facts = summary["targets"].get(t.label, {})
        if "failed" in facts:
            best, ready = f"failed: {facts['failed'].splitlines()[0]}", "-"
        else:
            best = f"{summary['max_rps'][t.label]:,.0f}" + (" (calls/s)" if t.key == "D" else "")
            ready = f"{facts['ready_s']:.0f}" if "ready_s" in facts else "-"
        per_target.append([t.label, t.name, best, ready])
    ratios = [
        [name, "n/a" if value is None else f"{value:.2f}x"]
        for name, value in summary["ratios"].items()
    ]
    parts = [
        markdown(["target", "concurrency", "p50 ms", "p99 ms", "RPS", "errors",
                  "wrk CPU (one core)"], levels),
        markdown(["target", "what", f"max RPS (p99 <= {P99_LIMIT_MS:g} ms, no errors)",
                  "ready after s"], per_target),
    ]  # fmt: skip
    for turned in (idle, peak):
        if not turned:
            continue
        clients = turned[0]["concurrency"]
        turns = [[r["round"], r["target"], ms(r, "p50_ms"), ms(r, "p99_ms"),
                  f"{r['rps']:,.0f}", error_text(r)] for r in turned]  # fmt: skip
        parts.append(
            f"{' and '.join(dict.fromkeys(r['target'] for r in turned))} at {clients} "
            f"client{'s' if clients > 1 else ''}, each started afresh, taking turns:\n\n"
            + markdown(["round", "target", "p50 ms", "p99 ms", "RPS", "errors"], turns)
        )
    parts.append(markdown(["ratio", "value"], ratios))
    return "\n\n".join(parts)


def plot(rows: list[dict[str, Any]], targets: list[Target], results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, (latency, rate) = plt.subplots(1, 2, figsize=(12, 4.5))
    for t in targets:
        mine = [r for r in rows if r["target"] == t.label]
        if not mine:
            continue
        if t.key == "D":
            floor = mine[0]
            latency.axhline(floor["p50_ms"], color="gray", linestyle=":", label="D p50 (floor)")
            rate.axhline(floor["rps"], color="gray", linestyle=":", label=f"D: {t.name}")
            continue
        xs = [r["concurrency"] for r in mine]
        (p50,) = latency.plot(xs, [r["p50_ms"] for r in mine], marker="o", label=f"{t.label} p50")
        latency.plot(xs, [r["p99_ms"] for r in mine], marker="x", linestyle="--",
                     color=p50.get_color(), label=f"{t.label} p99")  # fmt: skip
        rate.plot(xs, [r["rps"] for r in mine], marker="o", color=p50.get_color(),
                  label=f"{t.label}: {t.name}")  # fmt: skip
    latency.axhline(P99_LIMIT_MS, color="red", alpha=0.3, linewidth=1)
    latency.set(yscale="log", ylabel="latency ms", title="p50 (solid) and p99 (dashed) latency")
    rate.set(yscale="log", ylabel="requests/s", title="throughput")
    levels = sorted({r["concurrency"] for r in rows if r["target"] != "D"})
    for ax in (latency, rate):
        ax.set_xscale("log", base=2)
        if levels:
            ax.set_xticks(levels, [str(c) for c in levels])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("concurrency (connections)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = results / "online.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def demo_request(home: Path) -> tuple[PipelineSpec, dict[str, Any], str]:
    """The shipped spec, one held-out record of the demo under ``home`` (built there on
    first use), and the single-record ``POST /predict`` body that carries it."""
    spec = load_spec(ROOT / DEFAULT_SPEC)
    ensure_demo(spec, home)
    record = example_record(spec, home)
    if record is None:
        raise SystemExit(f"no held-out demo records under {home}: run stageline demo --home {home}")
    return spec, record, json.dumps({"records": [record]}, default=str)


def copies(record: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """``n`` copies of ``record``, each its own transaction id: a request (or a frame)
    of many records from the demo's one."""
    base = record.get("transaction_id", "t")
    return [{**record, "transaction_id": f"{base}-{i}"} for i in range(n)]


def wrk_version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return (out.stdout + out.stderr).split(" Copyright")[0].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=list(LEVELS))
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level (10)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before each (3)")
    parser.add_argument("--home", type=Path, default=HOME, help=f"default: {HOME}")
    parser.add_argument(
        "--rounds",
        type=int,
        default=IDLE_ROUNDS,
        help=f"rounds of A, G and C in turn at 1 client ({IDLE_ROUNDS}; 0: none)",
    )
    parser.add_argument(
        "--peak-rounds",
        type=int,
        default=IDLE_ROUNDS,
        help=f"rounds of A and N in turn at {PEAK_CONCURRENCY} clients ({IDLE_ROUNDS}; 0: none)",
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.duration, args.warmup = list(SMOKE_LEVELS), 1.0, 0.5
        args.rounds = min(args.rounds, 1)
        args.peak_rounds = min(args.peak_rounds, 1)
    if shutil.which("wrk") is None:
        raise SystemExit("bench.online needs wrk: sudo apt-get install wrk")
    targets = [TARGETS[k] for k in dict.fromkeys(args.targets)]
    home: Path = args.home.resolve()
    spec, record, body = demo_request(home)
    work = scratch(args.results)
    work.mkdir(parents=True, exist_ok=True)
    calls = 20 if args.smoke else D_CALLS

    rows: list[dict[str, Any]] = []
    facts: dict[str, dict[str, Any]] = {}
    for t in targets:
        try:
            if t.key == "D":
                rows.append(measure_in_process(spec, home, record, calls))
                facts[t.label] = {}
            else:
                measured, facts[t.label] = measure_server(
                    t, args.concurrency, args.duration, args.warmup, body, home, work
                )
                rows += measured
        except TargetError as e:
            print(f"{t.label}: failed: {e}", file=sys.stderr, flush=True)
            facts[t.label] = {"failed": str(e)}

    idle: list[dict[str, Any]] = []
    keys = {t.key for t in targets}
    if args.rounds > 0 and {"A", "C"} <= keys and not any("failed" in f for f in facts.values()):
        in_turn = [k for k in ROUND_KEYS if k in keys]
        try:
            idle = rounds_in_turn(
                in_turn, 1, args.rounds, args.duration, args.warmup, body, home, work
            )
        except TargetError as e:
            print(f"1-client rounds: failed: {e}", file=sys.stderr, flush=True)
            facts["1-client rounds"] = {"failed": str(e)}
    peak: list[dict[str, Any]] = []
    clients = PEAK_CONCURRENCY if not args.smoke else max(args.concurrency)
    if args.peak_rounds > 0 and set(PEAK_KEYS) <= keys:
        try:
            peak = rounds_in_turn(
                PEAK_KEYS, clients, args.peak_rounds, args.duration, args.warmup, body, home, work
            )
        except TargetError as e:
            print(f"peak rounds: failed: {e}", file=sys.stderr, flush=True)
            facts["peak rounds"] = {"failed": str(e)}

    summary = summarize(rows, targets, facts, idle, peak)
    config = {
        "targets": [t.label for t in targets],
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "wrk": f"{wrk_version()}: -t1 -c<concurrency> --latency --timeout {WRK_TIMEOUT}",
        "request": body,
        "spec": DEFAULT_SPEC,
        "in_process_calls": calls,
        "p99_limit_ms": P99_LIMIT_MS,
        "smoke": args.smoke,
        "rounds": args.rounds,
        "peak_rounds": args.peak_rounds,
        "peak_concurrency": clients,
    }
    text = tables(rows, targets, summary, idle, peak)
    write("online", config, rows + idle + peak, text, args.results, summary)
    plot(rows, targets, args.results)
    return 1 if any("failed" in f for f in facts.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
