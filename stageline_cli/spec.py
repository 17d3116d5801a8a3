"""``stageline spec``: check a pipeline spec, or print the reference of every key."""

from __future__ import annotations

import argparse

from stageline.spec_reference import reference
from stageline_cli.common import AddCommand, load, spec_option


def add_spec(add: AddCommand) -> None:
    spec = add(
        "spec",
        "check a pipeline spec, or print the spec reference",
        "Load a pipeline spec as every command does (each stage's class resolved, its params "
        "checked) and summarize it; with --reference, print every key a spec may hold.",
    )
    spec_option(spec)
    spec.add_argument(
        "--reference", action="store_true", help="print the spec reference (Markdown) and exit"
    )
    spec.set_defaults(func=cmd_spec)


def cmd_spec(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference(), end="")
        return 0
    spec = load(args)
    stages = ", ".join(s.name for s in spec.stages)
    fields = f"{len(spec.request.fields)} request fields (id: {spec.request.id_field})"
    print(f"{spec.name}: valid; {fields}, stages: {stages}")
    return 0
