"""``stageline demo``: the seeded demo world, its model and its batch input."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from stageline.context import resolve_home
from stageline_cli.common import AddCommand, load, online_option, positive, spec_option


def add_demo(add: AddCommand) -> None:
    demo = add(
        "demo",
        "build the demo world: data, features, a trained model, the online store",
        "Generate a seeded synthetic card-fraud world, train an XGBoost model through the "
        "pipeline's own stages, register it as fraud@champion and materialize the online store.",
    )
    spec_option(demo)
    demo.add_argument("--customers", type=positive, default=5_000, help="default: %(default)s")
    demo.add_argument("--transactions", type=positive, default=200_000, help="default: %(default)s")
    demo.add_argument(
        "--days", type=positive, default=60, help="days of history (default: %(default)s)"
    )
    demo.add_argument("--seed", type=int, default=7, help="default: %(default)s")
    demo.add_argument(
        "--rounds", type=positive, help="boosting rounds (default: the spec's training.rounds)"
    )
    demo.add_argument("--force", action="store_true", help="rebuild even if the demo exists")
    demo.add_argument(
        "--batch-rows",
        type=int,
        default=200_000,
        help="rows of batch input written to <home>/demo/batch, ~1%% of them bad; 0: none "
        "(default: %(default)s)",
    )
    online_option(demo)
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from stageline.demo.train import LITE_MODEL, build_demo, demo_exists

    spec, home = load(args), resolve_home(args.home)
    if demo_exists(home) and not args.force:
        print(f"demo already built under {home} (use --force to rebuild)")
        from stageline.demo.batch import batch_dir

        if args.batch_rows > 0 and not batch_dir(home).exists():
            _write_batch_input(home, args.batch_rows)
        return 0
    if args.force:
        # The ensemble example's second model too: trained on the old world, it is
        # trained again on the new one the next time that spec is used.
        for sub in ("demo", "features", "online", "models/fraud", f"models/{LITE_MODEL}"):
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
        _write_batch_input(home, args.batch_rows)
    return 0


def _write_batch_input(home: Path, rows: int) -> None:
    from stageline.demo.batch import write_batch_input

    parts = write_batch_input(home, rows=rows)
    print(f"batch input: {rows} rows in {len(parts)} files under {parts[0].parent}")
