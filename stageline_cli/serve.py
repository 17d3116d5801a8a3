"""``stageline serve``: the pipeline over HTTP with Ray Serve, or a model swap in place."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stageline import localray, supervisor
from stageline.context import resolve_home
from stageline.examples import example_record
from stageline.spec import PipelineSpec, prepare_home
from stageline_cli.common import AddCommand, CliError, load, online_option, positive, spec_option
from stageline_cli.processes import STOP_TIMEOUT_S, StopSignal, ray_disconnect, supervise

if TYPE_CHECKING:
    from serve_app import AppArgs


def share(text: str) -> float:
    """A share of traffic: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share from 0 to 1 (0.1 is 10%)")
    return value


def add_serve(add: AddCommand) -> None:
    srv = add(
        "serve",
        "serve the pipeline over HTTP with Ray Serve (local Ray on 127.0.0.1)",
        "Start a local Ray bound to 127.0.0.1 and serve the pipeline behind an HTTP ingress "
        "with Ray Serve, placed as the spec's serve section says: the stages in serve.inline "
        "run inside the ingress replicas (by default, every stage not in a serve.fuse group), "
        "each other stage in an autoscaling deployment of its own (serve.fuse groups share "
        "one). With --model or --challenger on an app that is already running, move it to that "
        "model version, or set its challenger, in place instead (each swap sets both: what "
        "it does not name goes back to the spec's).",
    )
    spec_option(srv)
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    srv.add_argument("--port", type=positive, default=8000, help="HTTP port (default: %(default)s)")
    srv.add_argument(
        "--placement",
        choices=("local", "graph"),
        help="local: every stage inside the ingress replicas (the fastest on one machine); "
        "graph: each stage an autoscaling deployment of its own (a cluster); "
        "default: the spec's serve.placement (local)",
    )
    srv.add_argument("--model", help="serve this model, e.g. fraud@challenger or fraud@2")
    challenger = srv.add_argument_group(
        "challenger", "compare another model version with the champion on live traffic"
    )
    challenger.add_argument(
        "--challenger",
        metavar="REF",
        help="the challenger, e.g. fraud@challenger or fraud@3, in place of the spec's",
    )
    challenger.add_argument(
        "--challenger-mode",
        choices=("shadow", "canary", "off"),
        default="shadow",
        help="shadow: both score every record, the champion answers, the challenger is "
        "logged; canary: the challenger answers a share of entities; off: the champion "
        "alone (default: %(default)s)",
    )
    challenger.add_argument(
        "--share",
        type=share,
        default=0.1,
        help="canary: the share of entities the challenger answers (default: %(default)s)",
    )
    challenger.add_argument(
        "--sticky-by",
        metavar="FIELD",
        help="canary: the field naming the entity, e.g. customer_id (default: the "
        "request's id field)",
    )
    srv.add_argument(
        "--api-key-file", help="require the API key in this file (or set $STAGELINE_API_KEY)"
    )
    srv.add_argument("--num-cpus", type=float, help="logical CPUs for Ray (default: 2 x cores)")
    srv.add_argument(
        "--metrics-port",
        type=positive,
        default=8080,
        help="Prometheus metrics (default: %(default)s)",
    )
    online_option(srv)
    srv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    spec, home = load(args), resolve_home(args.home)
    if os.environ.get(supervisor.RUN_ENV) is None and (args.model or args.challenger):
        # Before serve_app imports Ray: connecting to a running server needs settings
        # Ray reads at import.
        running = localray.running_server(home)
        if running is not None:
            return swap_model(args, spec, home, running)
    if os.environ.get(supervisor.RUN_ENV):
        return run_server(args, spec, home)
    # The server runs in a child of its own session (see supervise).
    prepare_home(spec, home)
    for _path, other in supervisor.records(home / "run", "serve"):
        if other.running:
            raise CliError(
                f"a stageline serve for {home} is already running (pid {other.pid}); stop "
                "it first, or swap its model with --model"
            )

    def ports_free() -> None:
        localray.check_port_free(args.host, args.port, "--port")
        localray.check_port_free("127.0.0.1", args.metrics_port, "--metrics-port")

    return supervise(args, home, "serve", before=ports_free)


def swap_model(
    args: argparse.Namespace, spec: PipelineSpec, home: Path, running: dict[str, Any]
) -> int:
    """``stageline serve --model REF`` while a server runs for the home: swap in place."""
    from serve_app import local

    local.attach(running)
    try:
        if not local.app_running(spec.name):
            raise CliError(f"the Ray at {running['url']} runs no {spec.name!r} app")
        local.deploy(_app_args(args, home))
    finally:
        ray_disconnect()
    return report_models(str(running["url"]), args.model or args.challenger)


def _app_args(args: argparse.Namespace, home: Path) -> AppArgs:
    from serve_app import AppArgs

    challenger = None
    if args.challenger:
        challenger = {
            "model": args.challenger,
            "mode": args.challenger_mode,
            "share": args.share,
            "sticky_by": args.sticky_by,
        }
    return AppArgs.model_validate({
        "spec": args.spec,
        "home": str(home),
        "model": args.model,
        "challenger": challenger,
        "api_key_file": args.api_key_file,
        "online": args.online,
        "placement": args.placement,
    })  # fmt: skip


def run_server(args: argparse.Namespace, spec: PipelineSpec, home: Path) -> int:
    """The supervised server: Ray, Serve and the app until SIGTERM or SIGINT, then a
    drain (requests in flight are answered) and a stop of everything it started."""
    # Before serve_app imports Ray, which reads the setting once: the Ray this child
    # starts then listens on 127.0.0.1 only.
    localray.use_loopback()
    from serve_app import local
    from serve_app.drain import drain, drain_budget

    stop = StopSignal()
    print(f"starting Ray and the {spec.name!r} app ...", file=sys.stderr)
    try:
        url = local.start(
            _app_args(args, home),
            home=home,
            host=args.host,
            port=args.port,
            num_cpus=args.num_cpus,
            metrics_port=args.metrics_port,
        )
        stop.install()
        if not stop.received:
            example = example_record(spec.request)
            print(f"serving {spec.name} at {url}  (docs: {url}/docs)")
            print(f"metrics: http://127.0.0.1:{args.metrics_port}/metrics (Prometheus)")
            print(local.example_curl(url, example))
            print("Ctrl-C to stop", flush=True)
            stop.wait()
        print("stopping: draining requests in flight ...", file=sys.stderr, flush=True)
        drained = drain(args.port, drain_budget(spec))
        print(
            f"drained in {stop.elapsed():.1f} s" if drained else "drain deadline passed",
            file=sys.stderr,
            flush=True,
        )
    finally:
        # What is left of the stop budget, less a margin for Ray's own stop.
        local.stop(home, serve_timeout_s=max(1.0, STOP_TIMEOUT_S - 4.0 - stop.elapsed()))
        print(f"stopped in {stop.elapsed():.1f} s", file=sys.stderr, flush=True)
    return 0


def report_models(url: str, wanted: str) -> int:
    """What the running app serves after a swap: a model that failed to load is an error."""
    import requests

    key = os.environ.get("STAGELINE_API_KEY")
    response = requests.get(f"{url}/models", headers={"X-API-Key": key} if key else {}, timeout=30)
    if response.status_code != 200:
        print(f"asked {url} to serve {wanted}; /models answered {response.status_code}")
        return 0
    failed = False
    for model in response.json()["models"]:
        line = f"{model['stage']}: serving {model['model']} v{model['version']} ({model['ref']})"
        if model.get("load_error"):
            failed = True
            line += f"; could not load {wanted}: {model['load_error']}"
        print(line)
        rival = model.get("challenger")
        if rival:
            print(f"{model['stage']}: challenger {_challenger_line(rival)}")
            if rival.get("load_error"):
                failed = True
    if failed:
        raise CliError(f"{wanted} did not load; the previous version keeps serving (see above)")
    return 0


def _challenger_line(rival: dict[str, Any]) -> str:
    """``v2 (challenger) in canary, 10% of customer_id``, as /models reports it."""
    if rival.get("mode") == "off" or "version" not in rival:
        line = "off"
    else:
        alias = f" ({rival['alias']})" if rival.get("alias") else ""
        line = f"v{rival['version']}{alias} in {rival['mode']}"
        if rival["mode"] == "canary":
            line += f", {rival['share']:.0%} of {rival['sticky_by']}"
    if rival.get("load_error"):
        line += f"; could not load: {rival['load_error']}"
    return line
