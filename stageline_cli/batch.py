"""``stageline batch``: score a folder of files with Ray Data."""

from __future__ import annotations

import argparse
import os

from stageline import localray, supervisor
from stageline.context import as_of_field, resolve_home
from stageline.spec import prepare_home
from stageline_cli.common import AddCommand, CliError, load, online_option, spec_option
from stageline_cli.processes import StopSignal, ray_connected, ray_disconnect, supervise


def add_batch(add: AddCommand) -> None:
    batch = add(
        "batch",
        "score a folder of files with Ray Data (incremental, bad rows quarantined)",
        "Run the pipeline's stages over parquet or CSV files with Ray Data: by default the "
        "whole chain in one actor pool, sized by the first stage's batch options (the spec's "
        "batch.fuse splits it into several). Writes <output>/run=<id>/ (scored rows) and "
        "<output>/_quarantine/run=<id>/ (rejected rows with stage and reason), published "
        "atomically; <output>/_manifest.json records the processed inputs, so the next run "
        "scores only new files.",
    )
    spec_option(batch)
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
    online_option(batch)
    batch.add_argument(
        "--as-of",
        action="store_true",
        help="features as of each row's event time (the spec's request.event_time), joined "
        "from the offline store's history as training joins them, instead of the online "
        "store's latest values: for backfills and backtests. An output holds one mode: "
        "adding to it in the other needs --full or another --output",
    )
    batch.set_defaults(func=cmd_batch)


def cmd_batch(args: argparse.Namespace) -> int:
    spec, home = load(args), resolve_home(args.home)
    if args.as_of:
        as_of_field(spec)  # a spec without request.event_time fails now, not after setup
    prepare_home(spec, home)
    # Supervised when it starts a Ray of its own: on a cluster (--address, $RAY_ADDRESS,
    # as under `ray job submit`) the cluster outlives the driver, and its job manager
    # stops it.
    external = bool(args.address or os.environ.get("RAY_ADDRESS"))
    own_ray = not external and not ray_connected()
    if own_ray and not os.environ.get(supervisor.RUN_ENV):
        return supervise(args, home, "batch")
    if own_ray:
        # Before batch_app imports Ray, which reads the setting once: the Ray this child
        # starts then listens on 127.0.0.1 only.
        localray.use_loopback()
    from batch_app.run import connect, run

    stop = StopSignal(interrupt=True)
    connected = connect(args.address, num_cpus=args.num_cpus)
    stop.install()  # again: ray.init sets a SIGTERM handler of its own
    try:
        summary = run(spec, args.input, args.output, home, full=args.full, as_of=args.as_of)
    except KeyboardInterrupt:
        raise CliError(
            "stopped: nothing of this run was published; the next run scores its input again"
        ) from None
    finally:
        if connected:
            ray_disconnect()
    print(summary.line())
    return 0
