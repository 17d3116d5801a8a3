"""What every command shares: the error type, option helpers and the spec they load."""

from __future__ import annotations

import argparse
import os
from typing import Protocol

from stageline.context import HOME_ENV
from stageline.features import FeatureStoreError
from stageline.registry import RegistryError
from stageline.spec import REDIS_PASSWORD_ENV, PipelineSpec, SpecError, load_spec
from stageline.stage import StageError

DEFAULT_SPEC = "pipelines/fraud.yaml"
HOME_HELP = f"stageline home (default: ${HOME_ENV} or ./.stageline)"
EXPECTED = (SpecError, StageError, RegistryError, FeatureStoreError, OSError, ValueError)
"""Errors a user can cause and fix: printed as one line, exit status 1 (with the
traceback above it under ``--debug``). Any other exception is a bug: its traceback is
always printed."""

DEBUG_ENV = "STAGELINE_DEBUG"
"""Set to 1 (or true, yes, on): as ``stageline --debug``, every error with its traceback."""


def debugging(flag: bool = False) -> bool:
    """``--debug`` was given, or :data:`DEBUG_ENV` is set to a true value."""
    return flag or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class CliError(Exception):
    """A one-line error for the user; exit status 1."""


class AddCommand(Protocol):
    """Adds a command (with ``--home``) to the ``stageline`` parser."""

    def __call__(self, name: str, help: str, description: str) -> argparse.ArgumentParser: ...


def spec_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spec", default=DEFAULT_SPEC, help="pipeline spec (default: %(default)s)")


def online_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--online",
        metavar="STORE",
        help="online feature store: memory or redis://host:port/db, in place of the spec's "
        f"features.online (a Redis password is read from ${REDIS_PASSWORD_ENV})",
    )


def load(args: argparse.Namespace) -> PipelineSpec:
    """The spec named by ``--spec``, with ``--online`` applied."""
    spec = load_spec(args.spec)
    online = getattr(args, "online", None)
    return spec.with_online(online) if online else spec


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
