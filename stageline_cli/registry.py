"""``stageline registry list|show|alias``: the local model registry."""

from __future__ import annotations

import argparse

from stageline.context import resolve_home
from stageline.registry import LocalRegistry, parse_model_ref
from stageline_cli.common import HOME_HELP, AddCommand, positive, usage


def add_registry(add: AddCommand) -> None:
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
    ralias.add_argument("version", type=positive, help="version number it should point at")
    ralias.set_defaults(func=cmd_registry_alias)
    for p in (rlist, rshow, ralias):
        # SUPPRESS: a subparser's default would overwrite a --home given before the action.
        p.add_argument("--home", default=argparse.SUPPRESS, help=HOME_HELP)
    registry.set_defaults(func=lambda _a: usage(registry))


def _registry(args: argparse.Namespace) -> LocalRegistry:
    return LocalRegistry(resolve_home(args.home) / "models")


def cmd_registry_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
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
    registry = _registry(args)
    name, ref = parse_model_ref(args.model)
    print(registry.resolve(name, ref).model_dump_json(indent=2))
    return 0


def cmd_registry_alias(args: argparse.Namespace) -> int:
    registry = _registry(args)
    before = registry.aliases(args.name).get(args.alias)
    registry.set_alias(args.name, args.alias, args.version)
    moved = f" (was v{before})" if before is not None and before != args.version else ""
    print(f"{args.name}@{args.alias} -> v{args.version}{moved}")
    return 0
