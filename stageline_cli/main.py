"""``main`` and the ``stageline`` parser, assembled from each command group's module."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stageline.context import HOME_ENV
from stageline_cli import batch, demo, materialize, predict, registry, serve
from stageline_cli.common import EXPECTED, HOME_HELP, CliError


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
        p.add_argument("--home", help=HOME_HELP)
        return p

    # In this order in `stageline --help`.
    demo.add_demo(add)
    predict.add_predict(add)
    batch.add_batch(add)
    registry.add_registry(add)
    serve.add_serve(add)
    materialize.add_materialize(add)
    return parser
