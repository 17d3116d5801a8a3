"""Soak: ``stageline serve`` as shipped, held at half its measured peak for half an hour,
sampled every minute: memory and open file descriptors of its whole process tree,
latency, throughput and errors.

    python -m bench.soak [--minutes 30] [--rate N] [--warmup S] [--interval S]
                         [--connections N] [--home H] [--results DIR] [--smoke]

1. Target A of ``bench.online`` (``stageline serve`` exactly as shipped, on a free
   loopback port) is started and polled until it answers 200.
2. Its peak: wrk as ``bench.online`` runs it (closed loop, one thread) at 32 and 64
   connections, 5 s each after a 3 s warm-up; the best rate without errors. ``--rate N``
   skips this and holds N requests/s.
3. A warm-up at the soak's rate (``--warmup``, 60 s), its figures set aside.
4. ``--minutes`` of windows of ``--interval`` seconds (60), each a wrk run at a constant
   rate of half the peak. At the middle of each window, under load, the server's whole
   process tree (the ``stageline serve`` process and every process below it) is
   sampled: RSS and PSS summed over it (``bench.procmem``: PSS counts the memory its
   processes share, such as Ray's object store, once), its processes, and its open file
   descriptors (the entries of ``/proc/PID/fd``). Each window gives p50 and p99 latency,
   requests/s, and errors: non-2xx answers, connect, read and write errors, timeouts
   (no answer within 2 s of the sending).
5. The server is stopped (``bench.processes.stop_group``), whether the run finished,
   failed or was interrupted (Ctrl-C, SIGTERM, SIGHUP).

The load runs on a schedule, with no coordinated omission: ``wrk_paced.lua``, one
connection per wrk thread (64), each on a fixed schedule of ``rate / 64`` requests/s
with at most one request in flight. A request whose turn comes while its connection
still awaits the previous answer goes out when that answer arrives, and its latency is
counted from when it was due, as wrk2 counts it (wrk2 itself is not packaged): a slow
answer delays the requests behind it, and their wait counts. A closed loop (wrk's own
figures) would send fewer requests while the server is slow and record none of that
wait. Each window is a wrk run of its own: its connections and its schedule start
afresh, so a backlog does not carry over from one window to the next.

Goals, judged on the first and the last ten minutes after the warm-up (the first and the
last third of the windows for runs shorter than 30 minutes):

- memory flat: the mean RSS, and the mean PSS, of the last within 5% of the first;
- file descriptors flat: the mean count of the last within 5% of the first;
- p99 steady: the median of the last windows' p99 at most 1.5x that of the first;
- 0 errors, the warm-up included.

It exits 1 when the server fails or, except with ``--smoke`` (whose figures mean
nothing), when a goal is missed. The home defaults to ``bench/.data/home``.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from bench.online import (
    HOME,
    TARGETS,
    WRK_TIMEOUT,
    Server,
    TargetError,
    demo_request,
    errors,
    serving,
    wrk,
    wrk_version,
)
from bench.processes import descendants, process_name
from bench.procmem import open_fds, sample_pids
from bench.report import add_run_options, markdown, scratch, write
from stageline_cli.common import DEFAULT_SPEC

PACED = Path(__file__).with_name("wrk_paced.lua")
LOAD = 0.5
"""The soak's rate, as a share of the measured peak."""
PEAK_LEVELS = (32, 64)
"""Connections of the closed-loop runs that measure the peak."""
CONNECTIONS = 64
"""Connections (and wrk threads) of the constant-rate load: with one request in flight
each, enough that a connection is rarely still busy when its next request is due."""
SMOKE_RATE = 100.0
"""The smoke's ceiling in requests/s: it shares the machine with the test suite."""
JUDGED_S = 600.0
"""How much of each end of the run the goals compare: ten minutes (or a third)."""
FLAT = 0.05
"""Memory and file descriptors are flat when the last mean is within 5% of the first."""
P99_STEADY = 1.5
"""p99 is steady when the last median p99 is at most 1.5x the first."""
MIB = 2**20


@dataclass(frozen=True)
class Plan:
    """What a run does, from the command line (``--smoke`` shortens every step)."""

    windows: int
    interval_s: int
    warmup_s: int
    peak_s: int
    peak_warmup_s: int
    connections: int
    rate: float | None
    """Requests/s given with ``--rate``; None: half the measured peak."""
    smoke: bool


# --------------------------------------------------------------------------- measuring


def measure_peak(server: Server, plan: Plan, body: str) -> list[dict[str, Any]]:
    """Closed-loop wrk at each of :data:`PEAK_LEVELS`: one row per level."""
    if plan.peak_warmup_s > 0:
        wrk(server.url, PEAK_LEVELS[0], plan.peak_warmup_s, body)
    rows = []
    for c in PEAK_LEVELS:
        row = {"concurrency": c, **wrk(server.url, c, plan.peak_s, body)}
        server.check()
        print(f"  peak at {c} connections: {row['rps']:,.0f} req/s, p99 "
              f"{row['p99_ms']:.1f} ms, {errors(row)} errors", flush=True)  # fmt: skip
        rows.append(row)
    return rows


def peak_rate(rows: list[dict[str, Any]]) -> float:
    """The best rate of the levels without errors."""
    good = [r["rps"] for r in rows if errors(r) == 0 and r["requests"] > 0]
    if not good:
        levels = ", ".join(f"{r['concurrency']}: {r['errors']}" for r in rows)
        raise TargetError(f"every load level had errors ({levels}); see the server log, "
                          "or give the rate to hold with --rate")  # fmt: skip
    return float(max(good))


def paced(
    server: Server, rate: float, seconds: int, connections: int, body: str
) -> tuple[dict[str, Any], np.ndarray[Any, np.dtype[np.float64]]]:
    """``seconds`` of load at ``rate`` requests/s (``wrk_paced.lua``), the server's process
    tree sampled at the middle: (the window's figures, its latencies in ms)."""
    tree: list[dict[str, Any]] = []
    sampler = threading.Timer(seconds / 2, lambda: tree.append(sample_tree(server.process.pid)))
    sampler.start()
    try:
        result = wrk(server.url, connections, seconds, body, script=PACED, threads=connections,
                     env={"WRK_INTERVAL_MS": f"{connections / rate * 1e3:.3f}",
                          "WRK_TIMEOUT_MS": str(timeout_ms())})  # fmt: skip
    finally:
        sampler.cancel()
        sampler.join()
    server.check()
    latencies = np.asarray(result.pop("latencies_ms"), dtype=np.float64)
    if not tree:  # the window ended before its middle: wrk stopped early
        tree.append(sample_tree(server.process.pid))
    figures = {
        **tree[0],
        "requests": result["requests"],
        "rps": result["rps"],
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": float(latencies.max()) if latencies.size else None,
        "errors": result["errors"],
        "wrk_cpu": result["wrk_cpu"],
    }
    return figures, latencies


def sample_tree(root: int) -> dict[str, Any]:
    """Memory, processes and open file descriptors of ``root`` and everything below it."""
    pids = descendants(root)
    memory = sample_pids(pids)
    names = Counter(process_name(p) for p in pids)
    return {"rss": memory.rss, "pss": memory.pss, "processes": memory.processes,
            "fds": open_fds(pids), "names": dict(sorted(names.items()))}  # fmt: skip


def percentile(latencies: np.ndarray[Any, np.dtype[np.float64]], q: float) -> float | None:
    return float(np.percentile(latencies, q)) if latencies.size else None


def timeout_ms() -> int:
    return int(float(WRK_TIMEOUT.removesuffix("s")) * 1000)


def soak(
    server: Server, plan: Plan, body: str, summary: dict[str, Any]
) -> tuple[list[dict[str, Any]], np.ndarray[Any, np.dtype[np.float64]]]:
    """Peak (unless given), warm-up, then the windows; what it learns goes into ``summary``
    as it goes, so that a failed run still reports it. Returns (rows, every latency)."""
    rate = plan.rate
    if rate is None:
        summary["peak"] = measure_peak(server, plan, body)
        summary["peak_rps"] = peak_rate(summary["peak"])
        rate = LOAD * summary["peak_rps"]
        if plan.smoke:
            rate = min(rate, SMOKE_RATE)
    summary["rate"] = rate
    print(f"holding {rate:,.0f} req/s over {plan.connections} connections: "
          f"{plan.warmup_s} s of warm-up, then {plan.windows} windows of "
          f"{plan.interval_s} s", flush=True)  # fmt: skip
    if plan.warmup_s > 0:
        warmup, _ = paced(server, rate, plan.warmup_s, plan.connections, body)
        summary["warmup"] = warmup
        print(f"  warm-up: {line(warmup)}", flush=True)
    rows: list[dict[str, Any]] = []
    every: list[np.ndarray[Any, np.dtype[np.float64]]] = []
    started = time.monotonic()
    for _ in range(plan.windows):
        begin = time.monotonic() - started
        row, latencies = paced(server, rate, plan.interval_s, plan.connections, body)
        end = time.monotonic() - started
        rows.append({"minute": end / 60, "start_min": begin / 60, **row})
        every.append(latencies)
        print(f"  {end / 60:5.1f} min: {line(row)}", flush=True)
    return rows, np.concatenate(every) if every else np.zeros(0)


# --------------------------------------------------------------------------- results


def judged(n: int, interval_s: float) -> int:
    """How many windows at each end of ``n`` the goals compare: :data:`JUDGED_S` worth,
    or a third of the run if it is shorter than three times that (at least one)."""
    return max(1, min(round(JUDGED_S / interval_s), n // 3))


def verdicts(rows: list[dict[str, Any]], k: int, warmup_errors: int) -> list[dict[str, Any]]:
    """Each goal: what the first and the last ``k`` windows show, and whether it is met."""
    first, last = rows[:k], rows[-k:]

    def flat(goal: str, key: str, unit: str, scale: float) -> dict[str, Any]:
        a = statistics.fmean(r[key] for r in first) / scale
        b = statistics.fmean(r[key] for r in last) / scale
        change = b / a - 1 if a else float("inf")
        return {"goal": goal, "rule": f"last mean within {FLAT:.0%} of first", "unit": unit,
                "first": a, "last": b, "change": change, "ok": abs(change) <= FLAT}  # fmt: skip

    p99s = [[r["p99_ms"] for r in part if r["p99_ms"] is not None] for part in (first, last)]
    a, b = (statistics.median(p) if p else None for p in p99s)
    ratio = b / a if a and b is not None else None
    failed = warmup_errors + sum(errors(r) for r in rows)
    return [
        flat("memory flat (RSS)", "rss", "MiB", MIB),
        flat("memory flat (PSS)", "pss", "MiB", MIB),
        flat("open file descriptors flat", "fds", "", 1),
        {"goal": "p99 steady", "rule": f"last median p99 at most {P99_STEADY:g}x first",
         "unit": "ms", "first": a, "last": b, "ratio": ratio,
         "ok": ratio is not None and ratio <= P99_STEADY},
        {"goal": "0 errors", "rule": "warm-up included", "unit": "", "first": None,
         "last": None, "errors": failed, "ok": failed == 0},
    ]  # fmt: skip


def line(row: dict[str, Any]) -> str:
    def ms(key: str) -> str:
        return "-" if row.get(key) is None else f"{row[key]:.1f} ms"

    return (
        f"{row['rps']:,.0f} req/s, p50 {ms('p50_ms')}, p99 {ms('p99_ms')}, "
        f"{errors(row)} errors; RSS {row['rss'] / MIB:,.0f} MiB, PSS {row['pss'] / MIB:,.0f} "
        f"MiB, {row['processes']} processes, {row['fds']} open fds"
    )


def tables(rows: list[dict[str, Any]], summary: dict[str, Any], plan: Plan) -> str:
    def num(value: float | None, fmt: str = ",.1f") -> str:
        return "-" if value is None else format(value, fmt)

    def error_text(row: dict[str, Any]) -> str:
        kinds = [f"{k} {v}" for k, v in row["errors"].items() if v]
        return f"{errors(row)} ({', '.join(kinds)})" if kinds else "0"

    parts = []
    rate = summary.get("rate")
    if rate is not None:
        peak = summary.get("peak_rps")
        if peak is None:
            source = "given with --rate"
        elif rate < LOAD * peak:
            source = f"the smoke's ceiling; {LOAD:.0%} of the measured peak is {LOAD * peak:,.0f}"
        else:
            source = f"{LOAD:.0%} of the measured peak of {peak:,.0f} req/s"
        k = summary.get("judged_windows")
        judge = f"; goals judged on the first and last {k} windows" if k else ""
        parts.append(
            f"`stageline serve` held at {rate:,.0f} req/s ({source}) over {plan.connections} "
            f"connections, after a {plan.warmup_s} s warm-up: {len(rows)} windows of "
            f"{plan.interval_s} s{judge}. Latency is counted from when each request was "
            "due (no coordinated omission)."
        )
    if summary.get("peak"):
        peak = [[r["concurrency"], num(r["p50_ms"]), num(r["p99_ms"]), f"{r['rps']:,.0f}",
                 error_text(r)] for r in summary["peak"]]  # fmt: skip
        header = ["connections", "p50 ms", "p99 ms", "RPS", "errors"]
        parts.append("The peak, closed loop:\n\n" + markdown(header, peak))
    if summary.get("verdicts"):
        goals = []
        for v in summary["verdicts"]:
            unit = f" {v['unit']}" if v["unit"] else ""
            if "change" in v:
                shown = [num(v["first"], ",.0f") + unit, num(v["last"], ",.0f") + unit,
                         f"{v['change']:+.1%}"]  # fmt: skip
            elif "ratio" in v:
                shown = [num(v["first"]) + unit, num(v["last"]) + unit,
                         "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"]  # fmt: skip
            else:
                shown = ["-", "-", f"{v['errors']} errors"]
            goals.append([v["goal"], v["rule"], *shown, "met" if v["ok"] else "**missed**"])
        parts.append(markdown(["goal", "rule", "first", "last", "change", "verdict"], goals))
    samples = [
        [f"{r['minute']:.1f}", f"{r['rss'] / MIB:,.0f}", f"{r['pss'] / MIB:,.0f}",
         r["processes"], r["fds"], f"{r['rps']:,.0f}", num(r["p50_ms"]), num(r["p99_ms"]),
         error_text(r)]
        for r in rows
    ]  # fmt: skip
    if samples:
        parts.append(markdown(["minute", "RSS MiB", "PSS MiB", "processes", "open fds",
                               "req/s", "p50 ms", "p99 ms", "errors"], samples))  # fmt: skip
    if "failed" in summary:
        parts.append(f"**Failed:** {summary['failed'].splitlines()[0]}")
    return "\n\n".join(parts)


def plot(rows: list[dict[str, Any]], k: int, rate: float | None, results: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, fds, latency) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    xs = [(r["start_min"] + r["minute"]) / 2 for r in rows]
    memory.plot(xs, [r["rss"] / MIB for r in rows], marker="o", label="RSS (shared pages "
                "counted in every process)")  # fmt: skip
    memory.plot(xs, [r["pss"] / MIB for r in rows], marker="o", label="PSS")
    memory.set(ylabel="MiB", title="memory of the server's process tree")
    fds.plot(xs, [r["fds"] for r in rows], marker="o", color="tab:green")
    fds.set(ylabel="open file descriptors", title="open file descriptors of the tree")
    latency.plot(xs, [r["p50_ms"] for r in rows], marker="o", label="p50")
    latency.plot(xs, [r["p99_ms"] for r in rows], marker="x", linestyle="--", label="p99")
    latency.set(ylabel="ms", xlabel="minutes after the warm-up",
                title="latency, counted from when each request was due")  # fmt: skip
    for ax in (memory, fds, latency):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if rows:  # the windows the goals compare
            ax.axvspan(rows[0]["start_min"], rows[k - 1]["minute"], color="gray", alpha=0.1)
            ax.axvspan(rows[-k]["start_min"], rows[-1]["minute"], color="gray", alpha=0.1)
    memory.legend(fontsize=8, loc="lower right")
    latency.legend(fontsize=8, loc="lower right")
    held = f"at {rate:,.0f} req/s" if rate else ""
    fig.suptitle(f"stageline serve {held}; shaded: the windows the goals compare")
    fig.tight_layout()
    path = results / "soak.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def interrupt_on(signals: Sequence[signal.Signals]) -> None:
    """These signals raise KeyboardInterrupt, as Ctrl-C does, so that the server is
    stopped on the way out (by default they end this process at once, and the server,
    in a session of its own, would go on running)."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    for signum in signals:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, interrupt)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    option = parser.add_argument
    option("--minutes", type=float, default=30.0, help="of load after the warm-up (30)")
    option("--rate", type=float, help="requests/s to hold (default: half the peak, measured)")
    option("--warmup", type=int, default=60, help="seconds at the rate, set aside (60)")
    option("--interval", type=int, default=60, help="seconds per window and sample (60)")
    option("--connections", type=int, default=CONNECTIONS, help=f"of the load ({CONNECTIONS})")
    option("--home", type=Path, default=HOME, help=f"default: {HOME}")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.minutes, args.interval, args.warmup = 1.0, 10, 5
    if (args.rate is not None and args.rate <= 0) or args.interval < 1 or args.connections < 1:
        parser.error("--rate, --interval and --connections must be positive")
    if shutil.which("wrk") is None:
        raise SystemExit("bench.soak needs wrk: sudo apt-get install wrk")
    plan = Plan(
        windows=max(1, round(args.minutes * 60 / args.interval)),
        interval_s=args.interval,
        warmup_s=args.warmup,
        peak_s=2 if args.smoke else 5,
        peak_warmup_s=1 if args.smoke else 3,
        connections=args.connections,
        rate=args.rate,
        smoke=args.smoke,
    )
    home: Path = args.home.resolve()
    _, _, body = demo_request(home)
    work = scratch(args.results)
    work.mkdir(parents=True, exist_ok=True)
    interrupt_on([signal.SIGTERM, signal.SIGHUP])

    summary: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    latencies = np.zeros(0)
    try:
        with serving(TARGETS["A"], body, home, work, "soak") as server:
            summary["server"] = server.facts
            rows, latencies = soak(server, plan, body, summary)
    except TargetError as e:
        print(f"soak: failed: {e}", file=sys.stderr, flush=True)
        summary["failed"] = str(e)
    except KeyboardInterrupt as e:
        print(f"soak: interrupted ({e or 'Ctrl-C'}); the server is stopped", file=sys.stderr)
        return 130
    k = judged(len(rows), plan.interval_s)
    if rows:
        warmup_errors = errors(summary["warmup"]) if "warmup" in summary else 0
        summary["judged_windows"] = k
        summary["verdicts"] = verdicts(rows, k, warmup_errors)
        summary["requests"] = int(sum(r["requests"] for r in rows))
        summary["p50_ms"] = percentile(latencies, 50)
        summary["p99_ms"] = percentile(latencies, 99)
        summary["tree_first"], summary["tree_last"] = rows[0]["names"], rows[-1]["names"]
    for row in rows:
        del row["names"]  # the first and the last are in the summary
    summary.get("warmup", {}).pop("names", None)
    config = {
        "minutes": args.minutes,
        "interval_s": plan.interval_s,
        "warmup_s": plan.warmup_s,
        "connections": plan.connections,
        "rate": args.rate,
        "load": LOAD,
        "peak_levels": list(PEAK_LEVELS),
        "peak_s": plan.peak_s,
        "wrk": f"{wrk_version()}: -t<connections> -c<connections> --timeout {WRK_TIMEOUT} "
        f"-s {PACED.name}",
        "request": body,
        "spec": DEFAULT_SPEC,
        "judged_s": JUDGED_S,
        "flat": FLAT,
        "p99_steady": P99_STEADY,
        "smoke": args.smoke,
    }
    write("soak", config, rows, tables(rows, summary, plan), args.results, summary)
    plot(rows, k, summary.get("rate"), args.results)
    if "failed" in summary:
        return 1
    missed = [v["goal"] for v in summary.get("verdicts", []) if not v["ok"]]
    if missed and not args.smoke:
        print(f"soak: goals missed: {', '.join(missed)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
