"""``stageline train``: the model stage's model from labelled events, registered."""

from __future__ import annotations

import argparse
from pathlib import Path

from stageline.context import resolve_home
from stageline_cli.common import AddCommand, CliError, load, positive, spec_option
from stageline_cli.predict import read_records


def add_train(add: AddCommand) -> None:
    train = add(
        "train",
        "train the pipeline's model from labelled events and register it",
        "Build the training set as serving computes features (the request schema, each "
        "feature view as of each event's time, the spec's own stages up to the model), "
        "train XGBoost with the spec's training: section, evaluate on the newest events "
        "(training.holdout) and register the version with its metrics, encoders and a "
        "training profile (for stageline monitor).",
    )
    spec_option(train)
    train.add_argument(
        "--labels",
        required=True,
        type=Path,
        help="labelled events (.parquet, .csv, .json or .jsonl): the request fields, "
        "the event time and the label column; with --from-log, the outcomes: the "
        "request's id field and the label",
    )
    train.add_argument(
        "--from-log",
        action="store_true",
        help="train on the prediction log joined with --labels by id: the features the "
        "model saw when serving are the training features",
    )
    train.add_argument(
        "--since", help="with --from-log: predictions logged since (30d, 12h, or a time)"
    )
    train.add_argument(
        "--alias",
        help="point this alias at the new version (default: the one the model stage "
        "serves, e.g. champion; challenger to compare before promoting)",
    )
    train.add_argument("--seed", type=int, help="in place of training.params.seed")
    train.add_argument("--rounds", type=positive, help="in place of training.rounds")
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from stageline.training import train, train_from_log

    spec, home = load(args), resolve_home(args.home)
    records = read_records(args.labels)
    options = {"alias": args.alias, "seed": args.seed, "rounds": args.rounds}
    if args.from_log:
        from stageline.monitoring import logged, parse_since

        since = parse_since(args.since) if args.since else None
        trained = train_from_log(spec, logged(spec, home, since), records, home, **options)
    else:
        if args.since:
            raise CliError("--since goes with --from-log")
        trained = train(spec, records, home, **options)
    print(trained.summary())
    return 0
