"""The ``stageline`` command: the composition root.

Ray-backed commands (``serve``, ``batch``) import their apps lazily, so the
core commands start fast and work without a Ray cluster.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from stageline import localray, supervisor
from stageline.context import HOME_ENV, resolve_home
from stageline.features import FeatureStoreError, materialize
from stageline.registry import LocalRegistry, RegistryError, parse_model_ref
from stageline.spec import REDIS_PASSWORD_ENV, PipelineSpec, SpecError, load_spec
from stageline.stage import StageError

if TYPE_CHECKING:
    from serve_app import AppArgs

DEFAULT_SPEC = "pipelines/fraud.yaml"
EXPECTED = (SpecError, StageError, RegistryError, FeatureStoreError, OSError, ValueError)


class CliError(Exception):
    """A one-line error for the user; exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="stageline: %(levelname)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code: int = args.func(args)
        return code
    except (CliError, *EXPECTED) as e:
        message = str(e).strip() or type(e).__name__
        print(f"stageline: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stageline: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stageline",
        description="One tabular inference pipeline (XGBoost) for online serving and batch.",
        epilog=f"Files live under --home, else ${HOME_ENV}, else ./.stageline",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("--home", help=f"stageline home (default: ${HOME_ENV} or ./.stageline)")
        return p

    demo = add(
        "demo",
        "build the demo world: data, features, a trained model, the online store",
        "Generate a seeded synthetic card-fraud world, train an XGBoost model through the "
        "pipeline's own stages, register it as fraud@champion and materialize the online store.",
    )
    demo.add_argument("--spec", default=DEFAULT_SPEC, help="pipeline spec (default: %(default)s)")
    demo.add_argument("--customers", type=_positive, default=5_000, help="default: %(default)s")
    demo.add_argument(
        "--transactions", type=_positive, default=200_000, help="default: %(default)s"
    )
    demo.add_argument(
        "--days", type=_positive, default=60, help="days of history (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=7, help="default: %(default)s")
    demo.add_argument(
        "--rounds", type=_positive, default=150, help="boosting rounds (default: %(default)s)"
    )
    demo.add_argument("--force", action="store_true", help="rebuild even if the demo exists")
    demo.add_argument(
        "--batch-rows",
        type=int,
        default=200_000,
        help="rows of batch input written to <home>/demo/batch, ~1%% of them bad; 0: none "
        "(default: %(default)s)",
    )
    _online_option(demo)
    demo.set_defaults(func=cmd_demo)

    predict = add(
        "predict",
        "score a file in process (no Ray)",
        "Run every stage of the pipeline in this process on a parquet, CSV or JSON-lines file. "
        "Rows that fail a check are reported with their reason, not dropped.",
    )
    predict.add_argument(
        "--spec", default=DEFAULT_SPEC, help="pipeline spec (default: %(default)s)"
    )
    predict.add_argument("--input", required=True, help="records: .parquet, .csv, .json or .jsonl")
    predict.add_argument(
        "--output",
        help="write predictions here (.parquet, .csv or .jsonl); default: JSON lines on stdout",
    )
    _online_option(predict)
    predict.set_defaults(func=cmd_predict)

    batch = add(
        "batch",
        "score a folder of files with Ray Data (incremental, bad rows quarantined)",
        "Run the pipeline's stages over parquet or CSV files with Ray Data: one actor pool per "
        "stage. Writes <output>/run=<id>/ (scored rows) and <output>/_quarantine/run=<id>/ "
        "(rejected rows with stage and reason), published atomically; <output>/_manifest.json "
        "records the processed inputs, so the next run scores only new files.",
    )
    batch.add_argument("--spec", default=DEFAULT_SPEC, help="pipeline spec (default: %(default)s)")
    batch.add_argument(
        "--input",
        required=True,
        help="parquet or CSV: a file, a folder, a glob or a URI (s3://...); "
        "the demo writes <home>/demo/batch",
    )
    batch.add_argument("--output", required=True, help="output folder")
    batch.add_argument(
        "--full", action="store_true", help="reprocess every input file (replaces the output)"
    )
    batch.add_argument(
        "--address",
        help="Ray cluster to run on (auto, ray://host:10001, host:6379); "
        "default: $RAY_ADDRESS, else a local Ray on 127.0.0.1",
    )
    batch.add_argument(
        "--num-cpus", type=float, help="logical CPUs of the local Ray (default: 2 x cores)"
    )
    _online_option(batch)
    batch.set_defaults(func=cmd_batch)

    registry = add(
        "registry", "list, show and alias registered models", "The local model registry."
    )
    rsub = registry.add_subparsers(title="registry commands", metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return rsub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")

    rlist = action("list", "every model version with its aliases and metrics")
    rlist.set_defaults(func=cmd_registry_list)
    rshow = action("show", "one version's metadata as JSON")
    rshow.add_argument("model", help="NAME, NAME@ALIAS or NAME@VERSION (default alias: champion)")
    rshow.set_defaults(func=cmd_registry_show)
    ralias = action("alias", "point an alias (champion, challenger, ...) at a version")
    ralias.add_argument("name", help="model name, e.g. fraud")
    ralias.add_argument("alias", help="alias to point, e.g. champion or challenger")
    ralias.add_argument("version", type=_positive, help="version number it should point at")
    ralias.set_defaults(func=cmd_registry_alias)
    for p in (rlist, rshow, ralias):
        # SUPPRESS: a subparser's default would overwrite a --home given before the action.
        p.add_argument(
            "--home",
            default=argparse.SUPPRESS,
            help=f"stageline home (default: ${HOME_ENV} or ./.stageline)",
        )
    registry.set_defaults(func=lambda _a: _usage(registry))

    srv = add(
        "serve",
        "serve the pipeline over HTTP with Ray Serve (local Ray on 127.0.0.1)",
        "Start a local Ray bound to 127.0.0.1 and serve the pipeline: one autoscaling Ray Serve "
        "deployment per stage behind an HTTP ingress. With --model on an app that is already "
        "running, move it to that model version in place instead.",
    )
    srv.add_argument("--spec", default=DEFAULT_SPEC, help="pipeline spec (default: %(default)s)")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP host (default: %(default)s)")
    srv.add_argument(
        "--port", type=_positive, default=8000, help="HTTP port (default: %(default)s)"
    )
    srv.add_argument("--model", help="serve this model, e.g. fraud@challenger or fraud@2")
    srv.add_argument(
        "--api-key-file", help="require the API key in this file (or set $STAGELINE_API_KEY)"
    )
    srv.add_argument("--num-cpus", type=float, help="logical CPUs for Ray (default: 2 x cores)")
    srv.add_argument(
        "--metrics-port",
        type=_positive,
        default=8080,
        help="Prometheus metrics (default: %(default)s)",
    )
    _online_option(srv)
    srv.set_defaults(func=cmd_serve)

    mat = add(
        "materialize",
        "write the latest feature values to the online store",
        "Copy each feature view's latest value per entity from the offline store to the "
        "online store the spec selects.",
    )
    mat.add_argument("--spec", default=DEFAULT_SPEC, help="pipeline spec (default: %(default)s)")
    mat.add_argument("--view", action="append", help="only this view (repeatable)")
    _online_option(mat)
    mat.set_defaults(func=cmd_materialize)
    return parser


def _online_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--online",
        metavar="STORE",
        help="online feature store: memory or redis://host:port/db, in place of the spec's "
        f"features.online (a Redis password is read from ${REDIS_PASSWORD_ENV})",
    )


def _load(args: argparse.Namespace) -> PipelineSpec:
    """The spec named by ``--spec``, with ``--online`` applied."""
    spec = load_spec(args.spec)
    online = getattr(args, "online", None)
    return spec.with_online(online) if online else spec


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


# --------------------------------------------------------------------------- commands


def cmd_demo(args: argparse.Namespace) -> int:
    from stageline.demo.train import build_demo, demo_exists

    spec, home = _load(args), resolve_home(args.home)
    if demo_exists(home) and not args.force:
        print(f"demo already built under {home} (use --force to rebuild)")
        from stageline.demo.batch import batch_dir, write_batch_input

        if args.batch_rows > 0 and not batch_dir(home).exists():
            parts = write_batch_input(home, rows=args.batch_rows)
            print(
                f"batch input: {args.batch_rows} rows in {len(parts)} files under {parts[0].parent}"
            )
        return 0
    if args.force:
        for sub in ("demo", "features", "online", "models/fraud"):
            shutil.rmtree(home / sub, ignore_errors=True)
    print(f"building the demo world under {home} ...", file=sys.stderr)
    result = build_demo(
        spec,
        home,
        customers=args.customers,
        transactions=args.transactions,
        days=args.days,
        seed=args.seed,
        rounds=args.rounds,
    )
    meta = result.model
    print(
        f"registered {meta.name} v{meta.version} as champion: held-out AUC "
        f"{meta.metrics['auc']:.3f}, threshold {meta.threshold:.3f} ({result.seconds:.1f} s)\n"
        f"held-out transactions: {result.holdout}"
    )
    if args.batch_rows > 0:
        from stageline.demo.batch import write_batch_input

        parts = write_batch_input(home, rows=args.batch_rows)
        print(f"batch input: {args.batch_rows} rows in {len(parts)} files under {parts[0].parent}")
    return 0


def ensure_demo(spec: PipelineSpec, home: Path) -> None:
    """Build the demo world first when the demo spec runs on an empty home."""
    from stageline.demo.train import MODEL, build_demo, demo_exists

    if spec.name == "fraud" and not demo_exists(home) and not (home / "models" / MODEL).exists():
        from stageline.demo.batch import batch_dir, write_batch_input

        print(f"no demo world under {home} yet: building it first ...", file=sys.stderr)
        build_demo(spec, home)
        if not batch_dir(home).exists():
            parts = write_batch_input(home)
            print(f"batch input: {len(parts)} files under {parts[0].parent}", file=sys.stderr)


def cmd_predict(args: argparse.Namespace) -> int:
    from stageline.pipeline import Pipeline, records

    spec, home = _load(args), resolve_home(args.home)
    ensure_demo(spec, home)
    batch = read_records(Path(args.input))
    started = time.perf_counter()
    result = Pipeline(spec, home).predict(batch)
    seconds = time.perf_counter() - started
    if args.output:
        write_records(result, Path(args.output))
    else:
        for row in records(result):
            print(json.dumps(row, default=str))
    rejected = int(result["error"].notna().sum())
    models = sorted(
        {
            f"{n} v{v}"
            for n, v in zip(result["model_name"], result["model_version"], strict=True)
            if pd.notna(n)
        }
    )
    print(
        f"scored {len(result) - rejected} of {len(result)} rows ({rejected} rejected, see 'error') "
        f"with {', '.join(models) or 'no model'} in {seconds:.2f} s"
        + (f"; wrote {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 0


def cmd_batch(args: argparse.Namespace) -> int:
    spec, home = _load(args), resolve_home(args.home)
    ensure_demo(spec, home)
    # Supervised when it starts a Ray of its own: on a cluster (--address, $RAY_ADDRESS,
    # as under `ray job submit`) the cluster outlives the driver, and its job manager
    # stops it.
    external = bool(args.address or os.environ.get("RAY_ADDRESS"))
    if not os.environ.get(supervisor.RUN_ENV) and not external and not ray_connected():
        return supervise(args, home, "batch")
    from batch_app.run import connect, run

    stop = StopSignal(interrupt=True)
    connected = connect(args.address, num_cpus=args.num_cpus)
    stop.install()  # again: ray.init sets a SIGTERM handler of its own
    try:
        summary = run(spec, args.input, args.output, home, full=args.full)
    except KeyboardInterrupt:
        raise CliError(
            "stopped: nothing of this run was published; the next run scores its input again"
        ) from None
    finally:
        if connected:
            ray_disconnect()
    print(summary.line())
    return 0


def read_records(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise CliError(f"no such input file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.is_dir():
        return pd.read_parquet(path)
    if suffix == ".csv":
        # As batch reads CSV: only an empty field is missing ("NA" is a country code).
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    if suffix in (".jsonl", ".ndjson"):
        # Plain JSON records, as an HTTP client sends them: no pandas type guessing.
        with path.open() as f:
            return pd.DataFrame.from_records([json.loads(line) for line in f if line.strip()])
    if suffix == ".json":
        data = json.loads(path.read_text())
        rows = data.get("records", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise CliError(f'{path}: expected a JSON list of records or {{"records": [...]}}')
        return pd.DataFrame.from_records(rows)
    raise CliError(f"{path}: unknown input format {suffix!r} (use .parquet, .csv, .json or .jsonl)")


def write_records(frame: pd.DataFrame, path: Path) -> None:
    from stageline.pipeline import records

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in records(frame)))
    else:
        raise CliError(f"{path}: unknown output format {suffix!r} (use .parquet, .csv or .jsonl)")


def cmd_registry_list(args: argparse.Namespace) -> int:
    registry = LocalRegistry(resolve_home(args.home) / "models")
    rows = []
    for name in registry.models():
        aliases = registry.aliases(name)
        for meta in registry.versions(name):
            tags = ",".join(a for a, v in sorted(aliases.items()) if v == meta.version) or "-"
            auc = meta.metrics.get("auc")
            rows.append(
                (
                    name,
                    str(meta.version),
                    tags,
                    f"{auc:.3f}" if auc is not None else "-",
                    meta.created_at.strftime("%Y-%m-%d %H:%M"),
                    meta.sha256[:12],
                )
            )
    if not rows:
        print(f"no models registered under {registry.root} (run `stageline demo`)")
        return 0
    header = ("MODEL", "VERSION", "ALIASES", "AUC", "CREATED (UTC)", "SHA256")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_registry_show(args: argparse.Namespace) -> int:
    registry = LocalRegistry(resolve_home(args.home) / "models")
    name, ref = parse_model_ref(args.model)
    print(registry.resolve(name, ref).model_dump_json(indent=2))
    return 0


def cmd_registry_alias(args: argparse.Namespace) -> int:
    registry = LocalRegistry(resolve_home(args.home) / "models")
    before = registry.aliases(args.name).get(args.alias)
    registry.set_alias(args.name, args.alias, args.version)
    moved = f" (was v{before})" if before is not None and before != args.version else ""
    print(f"{args.name}@{args.alias} -> v{args.version}{moved}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    spec, home = _load(args), resolve_home(args.home)
    if os.environ.get(supervisor.RUN_ENV) is None and args.model:
        # Before serve_app imports Ray: connecting to a running server needs settings
        # Ray reads at import.
        running = localray.running_server(home)
        if running is not None:
            return swap_model(args, spec, home, running)
    if os.environ.get(supervisor.RUN_ENV):
        return run_server(args, spec, home)
    # The server runs in a child of its own session (see supervise).
    ensure_demo(spec, home)
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


STOP_TIMEOUT_S = 9.5
"""From a stop signal to the server's exit; past it the supervisor kills what is left.
The server drains first (:func:`serve_app.drain.drain_budget`), then stops Ray."""


def supervise(
    args: argparse.Namespace, home: Path, kind: str, before: Callable[[], None] | None = None
) -> int:
    """Run this very command again as a supervised child (stageline.supervisor): this
    process stays light (no Ray) and is the one signals reach; the child runs Ray.
    ``before`` runs once what a previous run left is gone (it may hold ports)."""
    folder = home / "run"
    killed = supervisor.clear_stale(folder, kind, grace_s=STOP_TIMEOUT_S)
    if killed:
        print(f"ended {len(killed)} process(es) a previous {kind} left", file=sys.stderr)
    if before is not None:
        before()
    child = [sys.executable, "-m", "stageline.cli", *args.argv]
    run = supervisor.Supervisor(child, folder=folder, kind=kind, stop_timeout_s=STOP_TIMEOUT_S)
    return run.run()


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
    return report_models(str(running["url"]), args.model)


def _app_args(args: argparse.Namespace, home: Path) -> AppArgs:
    from serve_app import AppArgs

    return AppArgs(
        spec=args.spec,
        home=str(home),
        model=args.model,
        api_key_file=args.api_key_file,
        online=args.online,
    )


def run_server(args: argparse.Namespace, spec: PipelineSpec, home: Path) -> int:
    """The supervised server: Ray, Serve and the app until SIGTERM or SIGINT, then a
    drain (requests in flight are answered) and a stop of everything it started."""
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
            example = example_record(spec, home)
            print(f"serving {spec.name} at {url}  (docs: {url}/docs)")
            print(f"metrics: http://127.0.0.1:{args.metrics_port}/metrics (Prometheus)")
            if example is not None:
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
    import os

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
    if failed:
        raise CliError(f"{wanted} did not load; the previous version keeps serving (see above)")
    return 0


def ray_connected() -> bool:
    """This process already holds a Ray connection (``main`` called from a program that
    runs Ray itself): the command runs here, on that Ray, not in a supervised child."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(ray.is_initialized())


def ray_disconnect() -> None:
    """Leave a cluster this process only attached to (it keeps running)."""
    import ray

    ray.shutdown()


class StopSignal:
    """SIGTERM and SIGINT, noted (``interrupt``: also raised as KeyboardInterrupt): set
    up before Ray starts, so a stop that arrives while it starts is not lost, and
    installed explicitly, so it works even where the parent ignored SIGINT (a background
    job, nohup)."""

    def __init__(self, *, interrupt: bool = False) -> None:
        import threading

        self._event = threading.Event()
        self._at: float | None = None
        self._interrupt = interrupt
        self.install()

    def install(self) -> None:
        """(Again:) Ray's core worker sets a SIGTERM handler of its own in ``ray.init``,
        which prints a stack trace and ends the process at once."""
        import signal

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._received)

    def _received(self, _signum: int, _frame: object) -> None:
        if self._at is None:
            self._at = time.monotonic()
        self._event.set()
        if self._interrupt:
            raise KeyboardInterrupt

    def elapsed(self) -> float:
        """Seconds since the first stop signal (0 before it)."""
        return 0.0 if self._at is None else time.monotonic() - self._at

    @property
    def received(self) -> bool:
        return self._event.is_set()

    def wait(self) -> None:
        while not self._event.wait(timeout=1.0):
            pass


def example_record(spec: PipelineSpec, home: Path) -> dict[str, object] | None:
    """One record to show in the example curl: the demo's first held-out row."""
    holdout = home / "demo" / "holdout.parquet"
    if not holdout.exists():
        return None
    row = pd.read_parquet(holdout).iloc[0]
    return {
        f: (row[f].isoformat() if f == "ts" else row[f]) for f in spec.request.fields if f in row
    }


def cmd_materialize(args: argparse.Namespace) -> int:
    spec, home = _load(args), resolve_home(args.home)
    unknown = sorted(set(args.view or ()) - set(spec.features.views))
    if unknown:
        raise CliError(
            f"unknown feature view(s) {unknown}; the spec defines {sorted(spec.features.views)}"
        )
    for view, rows in materialize(spec, home, args.view).items():
        print(f"materialized {view}: {rows} entities -> {spec.features.online.kind} online store")
    return 0


if __name__ == "__main__":
    sys.exit(main())
