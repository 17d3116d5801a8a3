"""``main`` and the ``stageline`` parser, assembled from each command group's module."""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import traceback
from collections.abc import Sequence

from stageline.context import HOME_ENV
from stageline_cli import (
    batch,
    demo,
    init,
    materialize,
    monitor,
    predict,
    registry,
    serve,
    spec,
    train,
)
from stageline_cli.common import DEBUG_ENV, EXPECTED, HOME_HELP, CliError, debugging

EXIT_PIPE_CLOSED = 128 + signal.SIGPIPE
"""Exit status when the reader closes stdout early (``stageline predict ... | head``): what
a shell reports for a writer that SIGPIPE stopped, as ``seq 1000000 | head`` does."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``stageline`` command; returns its exit status."""
    try:
        try:
            return _run(argv)
        finally:
            # Inside the try, so that a reader who left early is met here, not at exit.
            sys.stdout.flush()
    except BrokenPipeError:
        if not stdout_closed():
            raise
        # The Python docs' recipe (library/signal, "Note on SIGPIPE"): point stdout at
        # devnull so the flush at exit fails no more, and leave quietly. SIGPIPE keeps
        # Python's disposition: a dropped socket must stay an exception, not a silent exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PIPE_CLOSED


def _run(argv: Sequence[str] | None) -> int:
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
        if isinstance(e, BrokenPipeError) and stdout_closed():
            raise  # no one reads on: main leaves quietly
        if debugging(args.debug):
            traceback.print_exc()
        message = str(e).strip() or type(e).__name__
        print(f"stageline: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stageline: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        # Not a mistake the user can fix from the message: the whole traceback, always.
        traceback.print_exc()
        print(
            f"stageline: unexpected {type(e).__name__} (traceback above): if it comes from "
            "your own code (a stage, a transform), fix it there; else it is a bug in "
            "stageline, please report it with the traceback",
            file=sys.stderr,
        )
        return 1


def stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone: a broken pipe elsewhere (a socket,
    a child's stdin) is an error to report, not a reason to leave quietly."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        # Linux flags the write end of a pipe without readers POLLERR.
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured), no poll
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stageline",
        description="One tabular inference pipeline (XGBoost) for online serving and batch.",
        epilog=f"Files live under --home, else ${HOME_ENV}, else ./.stageline",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"print the full traceback of any error (also ${DEBUG_ENV}=1); without it, "
        "an error you can fix is one line",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    def add(name: str, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("--home", help=HOME_HELP)
        return p

    # In this order in `stageline --help`.
    demo.add_demo(add)
    train.add_train(add)
    predict.add_predict(add)
    batch.add_batch(add)
    registry.add_registry(add)
    serve.add_serve(add)
    monitor.add_monitor(add)
    materialize.add_materialize(add)
    spec.add_spec(add)
    init.add_init(add)
    return parser
