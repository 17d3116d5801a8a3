"""Scale: the demo pipeline in the ``graph`` placement on a Ray of two nodes on this
machine, under a step load: how each deployment's replicas follow the load, and what
the clients see meanwhile.

    python -m bench.scale [--steps 1:60,16:150,1:120] [--interval 2] [--sample 1]
                          [--upscale-delay 3] [--downscale-delay 20]
                          [--trees 1000] [--records 50] [--target-busy 0.3]
                          [--home H] [--results DIR] [--smoke]

1. A Ray of two nodes (``bench.cluster.LocalCluster``: a head and a worker, two raylets
   started with ``ray start``, loopback only, token authentication on), each declaring
   :data:`NODE_CPUS` logical CPUs, with the Serve settings ``stageline serve`` ships
   (``serve_app.ray_internals.SETTINGS``: replicas report their load every second).
2. The shipped spec, copied with the run's scaling (:func:`scale_spec`): ``serve.placement:
   graph`` (every stage a deployment of its own behind an ingress that only routes),
   each stage's replica range and CPU share (:data:`SCALING`, fractional, so that every
   deployment's maximum fits the nodes' CPUs), and delays short enough for a run of
   minutes (``--upscale-delay``, ``--downscale-delay``), and every stage's
   ``target_busy`` (``--target-busy``).
3. ``cluster/serve.yaml`` with that spec, ``placement: graph``, the demo home under
   ``--home`` and a free port, deployed with ``serve deploy`` through the dashboard;
   polled until the app runs and ``POST /predict`` answers 200. The app serves a model
   of ``--trees`` deep trees on the demo's features (``bench.heavy``, registered in the
   home as ``fraud@heavy``): a model stage that costs several times the others per row,
   as production models do (``--trees 0``: the demo's own small model, which costs about
   what the feature lookup does). Each request carries ``--records`` records, so that
   the load is the stages' work per row, not HTTP's cost per request.
4. The load, in steps (``--steps clients:seconds,...``): wrk as ``bench.online`` runs it
   (closed loop, ``wrk_predict.lua``, one thread, one connection per client), in windows
   of ``--interval`` seconds, each a wrk run of its own: req/s, p50 and p99 latency and
   errors (connect, read, write, non-2xx, no answer within 2 s) per window.
5. Meanwhile, every ``--sample`` seconds, a thread reads every deployment's replicas
   from the dashboard's REST API (``/api/serve/applications/``): the running ones and the
   autoscaler's target; and the machine's CPU: cores busy, stolen by the hypervisor,
   and used by processes outside this run (another test on the machine shows there). A
   Ray driver of its own (:func:`probe`) calls each stage deployment's
   ``record_autoscaling_stats`` (the busy share Serve's autoscaler reads,
   ``serve_app.autoscaling``) on twice as many replicas as run, every ``--sample``
   seconds: the replicas a call reaches are Serve's choice, so this samples them.
6. Everything started is stopped: the probe, then the cluster, whether the run finished,
   failed or was interrupted (Ctrl-C, SIGTERM, SIGHUP).

What it reports: the time from a step up to a rise of the model stage's replicas (the
autoscaler's decision, and the new replica running), from a step down until every
deployment is back at its minimum, the most replicas of each deployment, and the errors
(goal: 0). It writes ``scale.json``, ``scale.md`` and ``scale.png`` (replicas over
time with the load steps, the busy shares, req/s and p99). It exits 1 when the run
fails, or (not with ``--smoke``, whose figures mean nothing) when a request failed.
The home defaults to ``bench/.data/home``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

from bench.cluster import LocalCluster, LocalNode
from bench.heavy import TREES, register_heavy_model
from bench.online import (
    HOME,
    LUA,
    WRK_TIMEOUT,
    TargetError,
    copies,
    demo_request,
    errors,
    tail,
    wait_ready,
    wrk,
    wrk_version,
)
from bench.processes import descendants, free_port, process_name, start, stop_group
from bench.report import add_run_options, markdown, scratch, write
from bench.soak import interrupt_on
from serve_app.autoscaling import BUSY
from serve_app.ray_internals import SETTINGS
from stageline.spec import load_spec
from stageline_cli.common import DEFAULT_SPEC

ROOT = Path(__file__).resolve().parents[1]
STEPS = "1:60,16:150,1:120"
SMOKE_STEPS = "1:4,8:6,1:6"
NODE_CPUS = 2
"""Logical CPUs each of the two nodes declares: the machine's cores, twice over. The
replicas' shares are fractions of them (:data:`SCALING`)."""
MODEL = "model"
"""The deployment whose scale-up is timed: the fraud spec's model stage."""
SCALING: dict[str, dict[str, Any]] = {
    "features": {"num_cpus": 0.2, "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
    "transform": {"num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 2}},
    "model": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 3}},
    "postprocess": {"num_cpus": 0.1, "autoscaling": {"min_replicas": 1, "max_replicas": 2}},
}
"""Each stage deployment's CPU share and replica range in this run (the rest of the
stage's ``serve:`` as shipped). At every maximum, with the ingress's, 2.25 of the 4
logical CPUs are reserved, so no replica waits for a CPU the cluster lacks."""
INGRESS: dict[str, Any] = {
    "num_cpus": 0.25,
    "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
}
"""The ingress in the graph (``serve.graph.ingress``): it only routes; one replica per 32
requests in flight."""
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
"""A node told to stop stops at once: by default it first waits up to 30 s for Serve to
move its replicas away, which at the end of a run only delays the next."""
READY_TIMEOUT_S = 300.0
"""For the cluster, and then for the app, to come up (both share two cores)."""
TARGET_BUSY = 0.3
"""Stage replicas scale to be busy 30% of the time in this run (the spec's default is
70%). Two nodes share two cores here, with the ingress, Serve's proxies and wrk: the
stages never get a core each, and none would reach 70% however long the queue."""
TIMELINE_S = 10.0
"""The Markdown timeline's step (the JSON keeps every sample)."""


@dataclass(frozen=True)
class Step:
    clients: int
    seconds: int


@dataclass(frozen=True)
class Plan:
    """What a run does, from the command line."""

    steps: tuple[Step, ...]
    interval_s: int
    """Seconds of each wrk window."""
    sample_s: float
    """Seconds between samples of the replicas (and of the busy shares)."""
    upscale_delay_s: float
    downscale_delay_s: float
    smoke: bool
    trees: int = TREES
    """The served model's trees (0: the demo's own model)."""
    records: int = 50
    """Records per request."""
    target_busy: float = 0.3
    """Every stage's ``autoscaling.target_busy``."""


def request_body(record: dict[str, Any], records: int) -> str:
    """A ``POST /predict`` body of ``records`` copies of ``record``, each its own
    transaction id."""
    return json.dumps({"records": copies(record, records)}, default=str)


def parse_steps(text: str) -> tuple[Step, ...]:
    """``"1:60,64:120"``: 1 client for 60 s, then 64 for 120 s."""
    steps = []
    for part in text.split(","):
        clients, _, seconds = part.strip().partition(":")
        try:
            step = Step(int(clients), int(seconds))
        except ValueError:
            raise ValueError(f"{part!r} is not clients:seconds (e.g. 64:120)") from None
        if step.clients < 1 or step.seconds < 1:
            raise ValueError(f"{part!r}: clients and seconds must be at least 1")
        steps.append(step)
    return tuple(steps)


# --------------------------------------------------------------------------- the app


def scale_spec(work: Path, plan: Plan) -> Path:
    """The shipped spec in the ``graph`` placement with this run's scaling
    (:data:`SCALING`, :data:`INGRESS`, the delays), every stage a deployment of its
    own, written to ``work``."""
    data = yaml.safe_load((ROOT / DEFAULT_SPEC).read_text())
    delays = {"upscale_delay_s": plan.upscale_delay_s, "downscale_delay_s": plan.downscale_delay_s}
    for stage in data["stages"]:
        serve = stage.setdefault("serve", {})
        serve.update(SCALING[stage["name"]])
        serve["autoscaling"] = {**serve["autoscaling"], **delays, "target_busy": plan.target_busy}
    serve = data["serve"]
    serve["placement"] = "graph"
    serve.setdefault("ingress", {})["num_cpus"] = INGRESS["num_cpus"]
    serve.setdefault("graph", {})["ingress"] = {**INGRESS["autoscaling"], **delays}
    # Every stage a deployment of its own (not the shipped spec's fused groups): the run
    # shows each stage following its own cost.
    serve["graph"]["fuse"] = []
    path = work / "fraud-scale.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    load_spec(path)  # a tweak the spec refuses fails here, not in the cluster
    return path


def serve_config(work: Path, spec: Path, home: Path, port: int, model: str | None) -> Path:
    """``cluster/serve.yaml`` for this run: its spec and home, ``placement: graph``, the
    model to serve (None: the spec's), a free port, and no ``deployments:`` overrides
    (the spec's scaling is what is measured)."""
    config = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app.pop("deployments", None)
    app["args"] = {**app["args"], "spec": str(spec), "home": str(home), "placement": "graph"}
    if model is not None:
        app["args"]["model"] = model
    path = work / "serve.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Dashboard:
    """The cluster's dashboard REST API, with its token."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.url = cluster.dashboard_url
        self.headers = cluster.headers()

    def get(self, path: str) -> Any:
        response = requests.get(self.url + path, headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.json()

    def alive_nodes(self) -> int:
        nodes = self.get("/api/v0/nodes")["data"]["result"]["result"]
        return sum(n["state"] == "ALIVE" for n in nodes)

    def application(self, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.get("/api/serve/applications/")["applications"].get(
            name
        )
        return found


@dataclass
class Target:
    """The app running on the cluster: what :func:`deployed` yields."""

    url: str
    """Its ``/predict``."""
    app: str
    cluster: LocalCluster
    dashboard: Dashboard
    facts: dict[str, Any]

    def check(self) -> None:
        """TargetError if a node has stopped."""
        for node in self.cluster.nodes:
            if not node.alive:
                raise TargetError(f"the {node.name} node exited:\n{tail(node.log)}")


@contextlib.contextmanager
def deployed(plan: Plan, home: Path, work: Path, body: str) -> Iterator[Target]:
    """A two-node cluster with the app deployed and answering ``body``; the cluster stopped
    however the block is left (and, the process tree then listed, what is left of it
    in ``facts["left_running"]``)."""
    cluster = LocalCluster(work / "ray", env={**SETTINGS, **NO_DRAIN})
    facts: dict[str, Any] = {"nodes": 2, "node_cpus": NODE_CPUS, "settings": dict(SETTINGS)}
    try:
        started = time.monotonic()
        dashboard = Dashboard(cluster)  # makes the machine's token first if there is none
        print(f"cluster: starting a head and a worker node ({NODE_CPUS:g} CPUs each)", flush=True)
        head = cluster.start_head(num_cpus=NODE_CPUS)
        until(lambda: _answers(dashboard), "the head node", cluster.nodes)
        cluster.add_worker(num_cpus=NODE_CPUS)
        until(lambda: dashboard.alive_nodes() == 2, "the worker node", cluster.nodes)
        facts["cluster_ready_s"] = time.monotonic() - started
        spec = scale_spec(work, plan)
        port = free_port()
        model = register_heavy_model(home, plan.trees) if plan.trees else None
        config = serve_config(work, spec, home, port, model)
        started = time.monotonic()
        print(f"serve deploy {config}", flush=True)
        deploy(cluster, config)
        app = load_spec(spec).name
        until(lambda: app_running(dashboard, app), "the app to run", cluster.nodes)
        url = f"http://127.0.0.1:{port}/predict"
        wait_ready(url, body, head.process, head.log, READY_TIMEOUT_S)
        facts.update(deploy_ready_s=time.monotonic() - started, spec=str(spec),
                     serve_config=str(config), logs=str(cluster.workdir))  # fmt: skip
        yield Target(url, app, cluster, dashboard, facts)
    finally:
        started = time.monotonic()
        cluster.stop()
        facts["stop_s"] = time.monotonic() - started
        facts["left_running"] = leftovers()


def deploy(cluster: LocalCluster, config: Path) -> None:
    done = subprocess.run(
        ["serve", "deploy", str(config), "--address", cluster.dashboard_url],
        env=cluster.env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    if done.returncode != 0:
        raise TargetError(f"serve deploy failed: {done.stdout}{done.stderr}")


def app_running(dashboard: Dashboard, name: str) -> bool:
    app = dashboard.application(name)
    if app is not None and app["status"] == "DEPLOY_FAILED":
        raise TargetError(f"the app failed to deploy: {app.get('message', '')[-2000:]}")
    return app is not None and app["status"] == "RUNNING"


def _answers(dashboard: Dashboard) -> bool:
    try:
        return dashboard.alive_nodes() >= 1
    except requests.RequestException:
        return False


def until(ready: Callable[[], bool], what: str, nodes: list[LocalNode]) -> None:
    """Poll ``ready`` until it holds; TargetError if a node exits or
    :data:`READY_TIMEOUT_S` passes first."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        for node in nodes:
            if not node.alive:
                raise TargetError(f"the {node.name} node exited:\n{tail(node.log)}")
        with contextlib.suppress(requests.RequestException):
            if ready():
                return
        if time.monotonic() > deadline:
            logs = "\n".join(f"{n.name}:\n{tail(n.log, 10)}" for n in nodes)
            raise TargetError(f"no {what} within {READY_TIMEOUT_S:.0f} s:\n{logs}")
        time.sleep(1)


def leftovers() -> list[str]:
    """What still runs below this process (nothing, once the cluster is stopped)."""
    return [f"{process_name(p)} ({p})" for p in descendants(os.getpid())[1:]]


# --------------------------------------------------------------------------- sampling


class CpuMeter:
    """The machine's CPU between calls, in cores: busy, stolen by the hypervisor (the
    cores the machine lacked), and used by processes that are not this run's (not this
    process or below it: another test on the machine)."""

    def __init__(self) -> None:
        self._last: tuple[float, float, float, dict[tuple[int, float], float]] | None = None

    def sample(self) -> dict[str, float]:
        now = time.monotonic()
        t = psutil.cpu_times()
        busy = sum(getattr(t, k, 0.0) for k in ("user", "nice", "system", "irq", "softirq"))
        steal = getattr(t, "steal", 0.0)
        ours = set(descendants(os.getpid()))
        others: dict[tuple[int, float], float] = {}
        for proc in psutil.process_iter():
            if proc.pid in ours:
                continue
            with contextlib.suppress(psutil.Error):
                cpu = proc.cpu_times()
                others[(proc.pid, proc.create_time())] = cpu.user + cpu.system
        last, self._last = self._last, (now, busy, steal, others)
        if last is None:
            return {}
        dt = now - last[0]
        # A process not seen last time started since: all of its time is new.
        other = sum(s - last[3].get(key, 0.0) for key, s in others.items())
        return {"machine_cpu": (busy - last[1]) / dt, "steal_cpu": (steal - last[2]) / dt,
                "other_cpu": max(0.0, other) / dt}  # fmt: skip


def replica_counts(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per deployment: replicas running, the autoscaler's target, replicas by state."""
    counts = {}
    for name, d in app["deployments"].items():
        states = Counter(r["state"] for r in d["replicas"])
        counts[name] = {"running": states.get("RUNNING", 0), "target": d["target_num_replicas"],
                        "states": dict(sorted(states.items()))}  # fmt: skip
    return counts


def replica_bounds(app: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per deployment: the autoscaling range Serve applies."""
    bounds = {}
    for name, d in app["deployments"].items():
        config = d["deployment_config"].get("autoscaling_config") or {}
        n = d["deployment_config"].get("num_replicas") or 1
        bounds[name] = {"min": config.get("min_replicas", n), "max": config.get("max_replicas", n)}
    return bounds


class Sampler:
    """Every ``every_s``, in a thread of its own while in the block: the replicas of each
    deployment (the dashboard) and the machine's CPU (:class:`CpuMeter`). Times are
    ``time.monotonic()``, as the load's."""

    def __init__(self, target: Target, every_s: float) -> None:
        self.target, self.every_s = target, every_s
        self.samples: list[dict[str, Any]] = []
        self.bounds: dict[str, dict[str, int]] = {}
        self.cpu = CpuMeter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self.cpu.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            sample: dict[str, Any] = {"t": started}
            try:
                app = self.target.dashboard.application(self.target.app)
                if app is None:
                    raise KeyError(f"no app {self.target.app}")
                sample["deployments"] = replica_counts(app)
                self.bounds = self.bounds or replica_bounds(app)
            except (requests.RequestException, KeyError, ValueError) as e:
                sample["error"] = f"{type(e).__name__}: {e}"[:300]
            sample.update(self.cpu.sample())
            self.samples.append(sample)
            self._stop.wait(max(0.0, self.every_s - (time.monotonic() - started)))


def probe(address: str, app: str, every_s: float) -> None:
    """The busy-share probe (:func:`start_probe` runs it): a Ray driver that, every
    ``every_s``, calls each stage deployment's ``record_autoscaling_stats`` (what Serve's
    autoscaler reads of a replica) twice per running replica, and prints one JSON line:
    ``{"t": monotonic, "busy": {deployment: [share, ...]}}``. A process of its own: a
    driver's threads must not share a process with the forks that start wrk."""
    import ray
    from ray import serve

    from serve_app.app import INGRESS as INGRESS_NAME

    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    handles: dict[str, Any] = {}
    while True:
        started = time.monotonic()
        record: dict[str, Any] = {"t": started, "busy": {}}
        try:
            calls = {}
            for name, status in serve.status().applications[app].deployments.items():
                if name == INGRESS_NAME:
                    continue
                running = status.replica_states.get("RUNNING", 0)  # type: ignore[call-overload]
                handle = handles.setdefault(name, serve.get_deployment_handle(name, app))
                method = handle.record_autoscaling_stats
                calls[name] = [method.remote() for _ in range(2 * max(1, running))]
            for name, responses in calls.items():
                record["busy"][name] = [float(r.result(timeout_s=5)[BUSY]) for r in responses]
        except Exception as e:  # a failed round is recorded, not fatal
            record["error"] = f"{type(e).__name__}: {e}"[:300]
        print(json.dumps(record), flush=True)
        time.sleep(max(0.0, every_s - (time.monotonic() - started)))


def start_probe(target: Target, every_s: float, work: Path) -> subprocess.Popen[bytes]:
    code = "import sys; from bench.scale import probe; probe(*sys.argv[1:3], float(sys.argv[3]))"
    argv = [sys.executable, "-c", code, target.cluster.address, target.app, str(every_s)]
    return start(argv, work / "probe.jsonl", target.cluster.env, ROOT,
                 stderr_log=work / "probe.log")  # fmt: skip


def probe_rounds(path: Path) -> list[dict[str, Any]]:
    """The probe's rounds: per stage deployment, the mean and the highest busy share seen."""
    rounds = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            if not line.startswith('{"t"'):
                continue
            record = json.loads(line)
            busy = {
                name: {"mean": statistics.fmean(v), "max": max(v), "calls": len(v)}
                for name, v in record["busy"].items()
                if v
            }
            rounds.append({"t": record["t"], "busy": busy, **({"error": record["error"]}
                           if "error" in record else {})})  # fmt: skip
    return rounds


# --------------------------------------------------------------------------- the load


def load(
    target: Target, plan: Plan, body: str, t0: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The steps, each in wrk windows of ``plan.interval_s``: (windows, steps), times in
    seconds from ``t0``."""
    rows: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    for i, step in enumerate(plan.steps):
        begin = time.monotonic() - t0
        steps.append({"step": i + 1, "clients": step.clients, "seconds": step.seconds,
                      "start_s": begin})  # fmt: skip
        print(f"step {i + 1}: {step.clients} clients for {step.seconds} s", flush=True)
        end = begin + step.seconds
        while (now := time.monotonic() - t0) < end - 0.5:
            seconds = max(1, min(plan.interval_s, round(end - now)))
            result = wrk(target.url, step.clients, seconds, body)
            target.check()
            rows.append({"step": i + 1, "clients": step.clients, "start_s": now,
                         "end_s": time.monotonic() - t0, **result})  # fmt: skip
        steps[-1]["end_s"] = time.monotonic() - t0
    return rows, steps


# --------------------------------------------------------------------------- results


def at(samples: list[dict[str, Any]], t: float) -> dict[str, Any] | None:
    """The last sample with replicas taken at or before ``t``."""
    found = None
    for s in samples:
        if s["t"] > t:
            break
        if "deployments" in s:
            found = s
    return found


def scale_events(
    samples: list[dict[str, Any]], steps: list[dict[str, Any]], bounds: dict[str, dict[str, int]]
) -> list[dict[str, Any]]:
    """For each step after the first, how the replicas answered it (times from the step's
    start; None: not within the step).

    A step up: ``model_decided_s`` until the autoscaler's target for :data:`MODEL`
    exceeded what ran at the step's start, ``model_up_s`` until that many ran, and
    ``first_rise_s``, per deployment, until its running replicas first rose. A step
    down: ``all_at_min_s`` until every deployment ran its minimum (0 if all already
    did)."""
    events = []
    for prev, step in itertools.pairwise(steps):
        start, end = step["start_s"], step["end_s"]
        during = [s for s in samples if start <= s["t"] <= end and "deployments" in s]
        before = at(samples, start) or (during[0] if during else None)
        event: dict[str, Any] = {"step": step["step"], "from": prev["clients"],
                                 "to": step["clients"]}  # fmt: skip
        if before is None:
            event["direction"] = "unknown (no sample of the replicas)"
        elif step["clients"] > prev["clients"]:
            base = {n: d["running"] for n, d in before["deployments"].items()}
            event["direction"] = "up"
            event["model_decided_s"] = first(during, start, above(MODEL, "target", base))
            event["model_up_s"] = first(during, start, above(MODEL, "running", base))
            rises = {n: first(during, start, above(n, "running", base)) for n in base}
            event["first_rise_s"] = rises
        elif step["clients"] < prev["clients"]:

            def at_min(d: dict[str, Any]) -> bool:
                return all(d[n]["running"] == b["min"] for n, b in bounds.items() if n in d)

            event["direction"] = "down"
            event["above_min_at_start"] = sorted(
                n
                for n, d in before["deployments"].items()
                if n in bounds and d["running"] > bounds[n]["min"]
            )
            event["all_at_min_s"] = first(during, start, at_min)
        else:
            event["direction"] = "same"
        events.append(event)
    return events


def above(name: str, key: str, base: dict[str, int]) -> Callable[[dict[str, Any]], bool]:
    """Whether deployment ``name``'s ``key`` (running, target) exceeds its ``base``."""
    return lambda deployments: bool(deployments[name][key] > base.get(name, 0))


def first(
    samples: list[dict[str, Any]], start: float, holds: Callable[[dict[str, Any]], bool]
) -> float | None:
    """Seconds from ``start`` to the first sample whose deployments satisfy ``holds``."""
    for s in samples:
        with contextlib.suppress(KeyError):
            if holds(s["deployments"]):
                return float(max(0.0, s["t"] - start))
    return None


def step_figures(rows: list[dict[str, Any]], step: dict[str, Any]) -> dict[str, Any]:
    """The load's figures over one step: its windows together."""
    mine = [r for r in rows if r["step"] == step["step"]]
    duration = sum(r["duration_s"] for r in mine)
    p99s = [r["p99_ms"] for r in mine if r["requests"]]
    return {
        "requests": sum(r["requests"] for r in mine),
        "rps": sum(r["requests"] for r in mine) / duration if duration else 0.0,
        "p50_ms": statistics.median(r["p50_ms"] for r in mine if r["requests"]) if p99s else None,
        "p99_ms": statistics.median(p99s) if p99s else None,
        "p99_worst_ms": max(p99s, default=None),
        "errors": sum(errors(r) for r in mine),
    }


def summarize(
    rows: list[dict[str, Any]],
    steps: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    bounds: dict[str, dict[str, int]],
    rounds: list[dict[str, Any]],
) -> dict[str, Any]:
    """Scale-up and scale-down times, the most replicas, the load per step, errors, the
    machine's CPU: the figures the report leads with."""
    events = scale_events(samples, steps, bounds)
    ups = [e for e in events if e["direction"] == "up"]
    downs = [e for e in events if e["direction"] == "down" and ups and e["step"] > ups[0]["step"]]
    counted = [s for s in samples if "deployments" in s]
    names = sorted({n for s in counted for n in s["deployments"]})
    most = {n: max(s["deployments"][n]["running"] for s in counted if n in s["deployments"])
            for n in names}  # fmt: skip
    last = counted[-1]["deployments"] if counted else {}
    for step in steps:
        step.update(step_figures(rows, step))
        end = at(samples, step["end_s"])
        running = (end or {}).get("deployments", {})
        step["replicas_at_end"] = {n: d["running"] for n, d in running.items()}
        step["busy"] = mean_busy(rounds, step["start_s"], step["end_s"])
    cpu = [s for s in samples if "machine_cpu" in s]
    # Only a step down that found a deployment above its minimum times a scale-down.
    down = downs[0]["all_at_min_s"] if downs and downs[0]["above_min_at_start"] else None

    def mean(key: str) -> float | None:
        return statistics.fmean(s[key] for s in cpu) if cpu else None

    return {
        "scale_up_s": ups[0]["model_up_s"] if ups else None,
        "scale_up_decided_s": ups[0]["model_decided_s"] if ups else None,
        "scale_down_s": down,
        "events": events,
        "bounds": bounds,
        "max_replicas": most,
        "replicas_at_end": {n: d["running"] for n, d in last.items()},
        "requests": sum(r["requests"] for r in rows),
        "errors": sum(errors(r) for r in rows),
        "error_kinds": dict(sum((Counter(r["errors"]) for r in rows), Counter())),
        "steps": steps,
        "sample_errors": sum("error" in s for s in samples),
        "probe_errors": sum("error" in r for r in rounds),
        "machine_cpu_mean": mean("machine_cpu"),
        "steal_cpu_mean": mean("steal_cpu"),
        "other_cpu_mean": mean("other_cpu"),
        "other_cpu_max": max((s["other_cpu"] for s in cpu), default=None),
    }


def mean_busy(rounds: list[dict[str, Any]], start: float, end: float) -> dict[str, float]:
    """Per stage deployment, the mean busy share the probe saw between ``start`` and ``end``."""
    seen: dict[str, list[float]] = {}
    for r in rounds:
        if start <= r["t"] <= end:
            for name, b in r["busy"].items():
                seen.setdefault(name, []).append(b["mean"])
    return {n: statistics.fmean(v) for n, v in sorted(seen.items())}


def ordered(names: Any) -> list[str]:
    """Deployment names in the pipeline's order: the ingress (not a stage) first."""
    stages = list(SCALING)
    return sorted(names, key=lambda n: (n in stages, stages.index(n) if n in stages else 0, n))


def seconds(value: float | None, none: str = "-") -> str:
    return none if value is None else f"{value:.0f} s"


def tables(
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    samples: list[dict[str, Any]],
    rounds: list[dict[str, Any]],
    plan: Plan,
) -> str:
    def num(value: float | None, fmt: str = ",.1f") -> str:
        return "-" if value is None else format(value, fmt)

    parts = []
    bounds: dict[str, dict[str, int]] = summary.get("bounds", {})
    names = ordered(bounds)
    steps = ", ".join(f"{s.clients} for {s.seconds} s" for s in plan.steps)
    parts.append(
        f"The fraud pipeline in the `graph` placement (each stage a deployment of its own, "
        f"scaling on its replicas' busy share; the ingress on requests in flight) on a Ray "
        f"of two nodes on this machine ({NODE_CPUS:g} logical CPUs each), deployed with "
        f"`serve deploy`. Load: wrk, closed loop, clients (connections) in steps: {steps}; "
        f"windows of {plan.interval_s} s. Replicas sampled every {plan.sample_s:g} s. Delays: "
        f"up {plan.upscale_delay_s:g} s, down {plan.downscale_delay_s:g} s. "
        + (
            f"The model: {plan.trees} trees of depth 8 on the demo's features (`bench.heavy`). "
            if plan.trees
            else "The model: the demo's own. "
        )
        + f"Each request: {plan.records} records. Stages' target busy share: "
        f"{plan.target_busy:g}."
    )
    if summary.get("events") is not None:
        ranges = ", ".join(
            f"{n} {bounds[n]['min']}-{bounds[n]['max']} (max reached "
            f"{summary['max_replicas'].get(n, '-')})"
            for n in names
        )
        findings = [
            ["time to scale up (step up until another model replica runs)",
             seconds(summary["scale_up_s"], "the model stage did not scale up")],
            ["  of which until the autoscaler decided",
             seconds(summary["scale_up_decided_s"], "never")],
            ["time to scale down (step down until every deployment is at its minimum)",
             seconds(summary["scale_down_s"], "nothing above its minimum at the step down")],
            ["replicas per deployment: range (max reached)", ranges],
            ["requests, errors", f"{summary['requests']:,}, {summary['errors']}"
             + (f" ({summary['error_kinds']})" if summary["errors"] else "")],
            ["machine CPU busy, mean (cores of 2)", num(summary["machine_cpu_mean"], ".2f")],
            ["used by other processes, mean / max (cores)",
             f"{num(summary['other_cpu_mean'], '.2f')} / {num(summary['other_cpu_max'], '.2f')}"],
            ["stolen by the hypervisor, mean (cores)", num(summary["steal_cpu_mean"], ".2f")],
        ]  # fmt: skip
        parts.append(markdown(["", ""], findings))
        per_step = [
            [s["step"], s["clients"], s["seconds"], f"{s['rps']:,.0f}", num(s["p50_ms"]),
             num(s["p99_ms"]), num(s["p99_worst_ms"]), s["errors"],
             " ".join(f"{n} {s['replicas_at_end'].get(n, '-')}" for n in names),
             " ".join(f"{n} {b:.2f}" for n, b in s["busy"].items()) or "-"]
            for s in summary["steps"]
        ]  # fmt: skip
        header = ["step", "clients", "s", "req/s", "p50 ms", "p99 ms", "worst p99 ms",
                  "errors", "replicas at its end", "mean busy share"]  # fmt: skip
        parts.append(
            "Per step (p50 and p99: the median of its windows'; worst: its worst window's):\n\n"
            + markdown(header, per_step)
        )
        parts.append(timeline(rows, samples, rounds, names))
    if "failed" in summary:
        parts.append(f"**Failed:** {summary['failed'].splitlines()[0]}")
    return "\n\n".join(parts)


def timeline(
    rows: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    rounds: list[dict[str, Any]],
    names: list[str],
) -> str:
    """Every :data:`TIMELINE_S`: replicas running (target when it differs), busy shares, the
    load's last window."""
    if not rows:
        return ""
    lines = []
    t = 0.0
    end = rows[-1]["end_s"]
    while t <= end:
        sample = at(samples, t)
        window = next((r for r in reversed(rows) if r["start_s"] <= t), rows[0])
        recent = [r for r in rounds if t - TIMELINE_S < r["t"] <= t]
        cells = []
        for n in names:
            d = (sample or {}).get("deployments", {}).get(n)
            if d is None:
                cells.append("-")
                continue
            moving = f" (→{d['target']})" if d["target"] != d["running"] else ""
            shown = f"{d['running']}{moving}"
            busy = [r["busy"][n]["mean"] for r in recent if n in r["busy"]]
            cells.append(shown + (f", {statistics.fmean(busy):.2f}" if busy else ""))
        p99 = "-" if not window["requests"] else f"{window['p99_ms']:.0f}"
        lines.append([f"{t:.0f}", window["clients"], *cells, f"{window['rps']:,.0f}", p99])
        t += TIMELINE_S
    header = ["s", "clients", *names, "req/s", "p99 ms"]
    return (
        f"Every {TIMELINE_S:g} s: replicas running (→ the autoscaler's target when it "
        "differs), busy share (mean of the last probes); the load's window then:\n\n"
        + markdown(header, lines)
    )


def plot(
    rows: list[dict[str, Any]],
    steps: list[dict[str, Any]],
    samples: list[dict[str, Any]],
    rounds: list[dict[str, Any]],
    summary: dict[str, Any],
    target_busy: float,
    results: Path,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (replicas, busy, latency) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    counted = [s for s in samples if "deployments" in s]
    names = ordered({n for s in counted for n in s["deployments"]})
    colors = {n: f"C{i}" for i, n in enumerate(names)}
    for i, n in enumerate(names):
        xs = [s["t"] for s in counted if n in s["deployments"]]
        ys = [s["deployments"][n]["running"] + 0.04 * (i - len(names) / 2) for s in counted
              if n in s["deployments"]]  # fmt: skip
        replicas.step(xs, ys, where="post", color=colors[n], label=n)
    replicas.set(ylabel="replicas running",
                 title="replicas per deployment (offset a little to keep lines apart)")  # fmt: skip
    clients = replicas.twinx()
    edges = [s["start_s"] for s in steps] + ([steps[-1]["end_s"]] if steps else [])
    levels = [s["clients"] for s in steps] + [s["clients"] for s in steps[-1:]]
    clients.fill_between(edges, levels, step="post", color="gray", alpha=0.12)
    clients.set_ylabel("clients (shaded)")
    clients.set_ylim(bottom=0)
    for n in names:
        xs = [r["t"] for r in rounds if n in r["busy"]]
        if xs:
            busy.plot(xs, [r["busy"][n]["mean"] for r in rounds if n in r["busy"]],
                      color=colors[n], label=n)  # fmt: skip
    busy.axhline(target_busy, color="red", alpha=0.4, linestyle="--", label="target")
    busy.set(ylabel="busy share", ylim=(0, 1.05),
             title="stage deployments' busy share (mean of the replicas probed)")  # fmt: skip
    mids = [(r["start_s"] + r["end_s"]) / 2 for r in rows]
    latency.plot(mids, [r["rps"] for r in rows], color="tab:blue", marker=".", label="req/s")
    latency.set(ylabel="requests/s", xlabel="seconds since the load started")
    latency.set_ylim(bottom=0)
    p99 = latency.twinx()
    p99.plot(mids, [r["p99_ms"] if r["requests"] else None for r in rows], color="tab:red",
             marker="x", linestyle="--", label="p99 ms")  # fmt: skip
    p99.set(ylabel="p99 ms")
    p99.set_ylim(bottom=0)
    latency.set_title("req/s (solid) and p99 latency (dashed), per wrk window")
    for ax in (replicas, busy, latency):
        ax.grid(alpha=0.3)
        for edge in edges[1:-1]:
            ax.axvline(edge, color="black", alpha=0.3, linestyle=":")
    if names:
        replicas.legend(fontsize=8, loc="upper left")
        busy.legend(fontsize=8, loc="upper left")
    up, down = summary.get("scale_up_s"), summary.get("scale_down_s")
    fig.suptitle(f"graph placement on two nodes: scale up {seconds(up)}, "
                 f"scale down {seconds(down)}, {summary.get('errors', 0)} errors")  # fmt: skip
    fig.tight_layout()
    path = results / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def relative(items: list[dict[str, Any]], t0: float) -> None:
    """Monotonic times to seconds since the load started."""
    for item in items:
        item["t"] = round(item["t"] - t0, 3)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    option = parser.add_argument
    option("--steps", default=STEPS, help=f"clients:seconds, ... ({STEPS})")
    option("--interval", type=int, default=2, help="seconds per wrk window (2)")
    option("--sample", type=float, default=1.0, help="seconds between replica samples (1)")
    option("--upscale-delay", type=float, default=3.0, help="every deployment's, s (3)")
    option("--downscale-delay", type=float, default=20.0, help="every deployment's, s (20)")
    option(
        "--trees",
        type=int,
        default=TREES,
        help=f"trees of the served model ({TREES}; 0: the demo's own)",
    )
    option("--records", type=int, default=50, help="records per request (50)")
    option(
        "--target-busy",
        type=float,
        default=TARGET_BUSY,
        help=f"every stage's target busy share ({TARGET_BUSY})",
    )
    option("--home", type=Path, default=HOME, help=f"default: {HOME}")
    add_run_options(parser)
    args = parser.parse_args(argv)
    try:
        steps = parse_steps(SMOKE_STEPS if args.smoke else args.steps)
    except ValueError as e:
        parser.error(f"--steps: {e}")
    if args.interval < 1 or args.sample <= 0 or min(args.upscale_delay, args.downscale_delay) < 0:
        parser.error("--interval and --sample must be positive, the delays not negative")
    if args.trees < 0 or args.records < 1 or not 0 < args.target_busy <= 1:
        parser.error("--trees must be >= 0, --records >= 1, --target-busy in (0, 1]")
    for tool in ("wrk", "serve", "ray"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench.scale needs {tool} on PATH (wrk: sudo apt-get install wrk)")
    plan = Plan(steps, args.interval, args.sample, args.upscale_delay, args.downscale_delay,
                args.smoke, args.trees, args.records, args.target_busy)  # fmt: skip
    home: Path = args.home.resolve()
    _, record, _ = demo_request(home)
    body = request_body(record, plan.records)
    work = scratch(args.results) / "scale"
    work.mkdir(parents=True, exist_ok=True)
    interrupt_on([signal.SIGTERM, signal.SIGHUP])

    summary: dict[str, Any] = {"load_average_before": list(os.getloadavg())}
    rows: list[dict[str, Any]] = []
    steps_run: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    bounds: dict[str, dict[str, int]] = {}
    t0 = time.monotonic()
    facts: dict[str, Any] = {}
    try:
        with deployed(plan, home, work, body) as target:
            facts = target.facts
            prober = start_probe(target, plan.sample_s, work)
            try:
                with Sampler(target, plan.sample_s) as sampler:
                    t0 = time.monotonic()
                    try:
                        rows, steps_run = load(target, plan, body, t0)
                    finally:
                        samples, bounds = sampler.samples, sampler.bounds
            finally:
                stop_group(prober, grace_s=10)
    except TargetError as e:
        print(f"scale: failed: {e}", file=sys.stderr, flush=True)
        summary["failed"] = str(e)
    except KeyboardInterrupt as e:
        print(f"scale: interrupted ({e or 'Ctrl-C'}); the cluster is stopped", file=sys.stderr)
        return 130
    summary["cluster"] = facts
    summary["load_average_after"] = list(os.getloadavg())
    if facts.get("left_running"):
        print(f"scale: still running after the stop: {facts['left_running']}", file=sys.stderr)
    rounds = probe_rounds(work / "probe.jsonl")
    for items in (samples, rounds):
        relative(items, t0)
    if steps_run:
        summary.update(summarize(rows, steps_run, samples, bounds, rounds))
    summary["samples"] = samples
    summary["busy_rounds"] = rounds
    config = {
        "steps": [[s.clients, s.seconds] for s in plan.steps],
        "interval_s": plan.interval_s,
        "sample_s": plan.sample_s,
        "upscale_delay_s": plan.upscale_delay_s,
        "downscale_delay_s": plan.downscale_delay_s,
        "nodes": 2,
        "node_cpus": NODE_CPUS,
        "scaling": SCALING,
        "ingress": INGRESS,
        "placement": "graph",
        "proxy": "Serve's proxy on every node (cluster/serve.yaml, as tests/multinode.py "
        "deploys it)",
        "wrk": f"{wrk_version()}: -t1 -c<clients> --timeout {WRK_TIMEOUT} -s {LUA.name}",
        "request": body,
        "spec": DEFAULT_SPEC,
        "smoke": args.smoke,
        "trees": plan.trees,
        "records": plan.records,
        "target_busy": plan.target_busy,
    }
    write("scale", config, rows, tables(rows, summary, samples, rounds, plan), args.results,
          summary)  # fmt: skip
    plot(rows, steps_run, samples, rounds, summary, plan.target_busy, args.results)
    if "failed" in summary:
        return 1
    if summary.get("errors") and not args.smoke:
        print(f"scale: {summary['errors']} requests failed", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
