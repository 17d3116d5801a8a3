"""``stageline materialize``: the latest feature values into the online store."""

from __future__ import annotations

import argparse

from stageline.context import resolve_home
from stageline.features import materialize
from stageline_cli.common import AddCommand, CliError, load, online_option, spec_option


def add_materialize(add: AddCommand) -> None:
    mat = add(
        "materialize",
        "write the latest feature values to the online store",
        "Copy each feature view's latest value per entity from the offline store to the "
        "online store the spec selects.",
    )
    spec_option(mat)
    mat.add_argument("--view", action="append", help="only this view (repeatable)")
    online_option(mat)
    mat.set_defaults(func=cmd_materialize)


def cmd_materialize(args: argparse.Namespace) -> int:
    spec, home = load(args), resolve_home(args.home)
    unknown = sorted(set(args.view or ()) - set(spec.features.views))
    if unknown:
        raise CliError(
            f"unknown feature view(s) {unknown}; the spec defines {sorted(spec.features.views)}"
        )
    for view, rows in materialize(spec, home, args.view).items():
        print(f"materialized {view}: {rows} entities -> {spec.features.online.kind} online store")
    return 0
