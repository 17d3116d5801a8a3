"""``stageline registry list|register|show|alias``: the local model registry."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import xgboost

from stageline.context import resolve_home
from stageline.registry import ModelMetadata, ModelRegistry, open_registry, parse_model_ref
from stageline.registry.integrity import MAX_MODEL_BYTES_ENV, looks_like_pickle
from stageline.registry.metadata import TASKS, objective, tasks_of
from stageline.storage import MODELS_ENV
from stageline_cli.common import HOME_HELP, AddCommand, CliError, positive, usage

SAVE_HINT = (
    'save it with booster.save_model("model.ubj") (a scikit-learn model: '
    'model.get_booster().save_model("model.ubj")) and register that file'
)


def add_registry(add: AddCommand) -> None:
    registry = add(
        "registry",
        "list, register, show and alias model versions",
        "The model registry: <home>/models, another folder, or object storage (--registry).",
    )
    rsub = registry.add_subparsers(title="registry commands", metavar="ACTION")

    def action(name: str, help: str) -> argparse.ArgumentParser:
        return rsub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")

    rlist = action("list", "every model version with its aliases, task and metrics")
    rlist.set_defaults(func=cmd_registry_list)
    rregister = action("register", "register a trained XGBoost model file as a new version")
    _register_options(rregister)
    rregister.set_defaults(func=cmd_registry_register)
    rshow = action("show", "one version's metadata as JSON")
    rshow.add_argument("model", help="NAME, NAME@ALIAS or NAME@VERSION (default alias: champion)")
    rshow.set_defaults(func=cmd_registry_show)
    ralias = action("alias", "point an alias (champion, challenger, ...) at a version")
    ralias.add_argument("name", help="model name, e.g. fraud")
    ralias.add_argument("alias", help="alias to point, e.g. champion or challenger")
    ralias.add_argument("version", type=positive, help="version number it should point at")
    ralias.set_defaults(func=cmd_registry_alias)
    for p in (rlist, rregister, rshow, ralias):
        # SUPPRESS: a subparser's default would overwrite a --home given before the action.
        p.add_argument("--home", default=argparse.SUPPRESS, help=HOME_HELP)
        p.add_argument(
            "--registry",
            default=argparse.SUPPRESS,
            metavar="URI",
            help="the registry: a folder, s3://bucket/prefix or mlflow:<registry URI> "
            f"(default: ${MODELS_ENV}, else <home>/models)",
        )
    registry.set_defaults(func=lambda _a: usage(registry))


def _register_options(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Only XGBoost's own formats are accepted (never a pickle). The version is stored "
        "with its features, task, threshold or classes, and metrics; a spec's model stage "
        "serves it with params {model: NAME, task: TASK}."
    )
    p.add_argument("name", help="model name, e.g. credit (a new version if it exists)")
    p.add_argument(
        "file", type=Path, help="the booster, saved with booster.save_model() as .ubj or .json"
    )
    p.add_argument(
        "--features",
        type=_names,
        metavar="A,B,C",
        help="feature names in training order (default: the ones the booster carries)",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        help="what the model predicts (default: read from its objective, e.g. binary:logistic)",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="a binary model's decision threshold: label is true at or over it (default: 0.5)",
    )
    p.add_argument(
        "--classes",
        type=_names,
        metavar="A,B,C",
        help='a multiclass model\'s class names in label order (default: "0", "1", ...)',
    )
    p.add_argument(
        "--metric",
        type=_metric,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a held-out metric, e.g. auc=0.91 (repeat it; `list` shows the first ones)",
    )
    p.add_argument(
        "--alias",
        action="append",
        default=[],
        help="point this alias at the new version, e.g. champion (repeat it)",
    )
    p.add_argument("--description", default="", help="free text shown by `registry show`")


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(","))


def _metric(text: str) -> tuple[str, float]:
    name, equals, value = text.partition("=")
    try:
        if not equals or not name.strip():
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"write a metric as NAME=VALUE, e.g. auc=0.91; got {text!r}"
        ) from None


def _registry(args: argparse.Namespace) -> ModelRegistry:
    location = getattr(args, "registry", None) or os.environ.get(MODELS_ENV)
    return open_registry(location or resolve_home(args.home) / "models")


def cmd_registry_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    rows = []
    for name in registry.models():
        aliases = registry.aliases(name)
        for meta in registry.versions(name):
            tags = ",".join(a for a, v in sorted(aliases.items()) if v == meta.version) or "-"
            rows.append(
                (
                    name,
                    str(meta.version),
                    tags,
                    meta.task,
                    meta.metrics_summary(),
                    meta.created_at.strftime("%Y-%m-%d %H:%M"),
                    meta.sha256[:12],
                )
            )
    if not rows:
        print(
            f"no models registered under {registry.location}: register a trained XGBoost model "
            "with `stageline registry register NAME MODEL_FILE`, or build the demo's with "
            "`stageline demo`"
        )
        return 0
    header = ("MODEL", "VERSION", "ALIASES", "TASK", "METRICS", "CREATED (UTC)", "SHA256")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_registry_register(args: argparse.Namespace) -> int:
    registry = _registry(args)
    path: Path = args.file
    booster = read_booster(path, registry.max_model_bytes)
    features = args.features or booster.feature_names
    if not features:
        raise CliError(
            f"{path} carries no feature names (it was trained on a plain array); name the "
            "features in training order with --features a,b,c"
        )
    task = args.task
    if task is None:
        trained = objective(booster)[0]
        fits = tasks_of(trained)
        if len(fits) > 1:
            raise CliError(
                f"{path} was trained with objective {trained!r}, which can serve "
                f"{' or '.join(fits)}; say which with {' or '.join(f'--task {t}' for t in fits)}"
            )
    metrics = dict(args.metric)
    if len(metrics) < len(args.metric):
        names = [name for name, _ in args.metric]
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CliError(f"--metric {', '.join(twice)} given more than once; give each once")
    options: dict[str, Any] = {}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    meta = registry.register(
        args.name,
        booster,
        features=features,
        task=task,
        classes=args.classes,
        metrics=metrics,
        description=args.description,
        format="json" if path.suffix.lower() == ".json" else "ubj",
        aliases=args.alias,
        **options,
    )
    print(_registered(meta, registry.aliases(meta.name)))
    print(f"sha256 {meta.sha256}")
    return 0


def _registered(meta: ModelMetadata, aliases: dict[str, int]) -> str:
    """``registered credit v2: binary (threshold 0.5), 3 features, alias champion``."""
    task: str = meta.task
    if meta.threshold is not None:
        task += f" (threshold {meta.threshold:g})"
    elif meta.classes is not None:
        task += f" (classes {', '.join(meta.classes)})"
    tags = sorted(a for a, v in aliases.items() if v == meta.version)
    named = f", alias {', '.join(tags)}" if tags else ""
    return f"registered {meta.name} v{meta.version}: {task}, {len(meta.features)} features{named}"


def read_booster(path: Path, max_bytes: int) -> xgboost.Booster:
    """The booster saved at ``path`` in XGBoost's UBJSON or JSON format, as the registry
    stores it: a pickle is refused unread, never unpickled."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size > max_bytes:
                raise CliError(
                    f"{path} is {size} bytes, over the {max_bytes}-byte limit on model files; "
                    f"if the model is genuine, raise ${MAX_MODEL_BYTES_ENV}"
                )
            f.seek(0)
            raw = f.read()
    except OSError as e:
        raise CliError(f"cannot read the model file {path}: {e.strerror or e}") from e
    if looks_like_pickle(raw):
        raise CliError(
            f"{path} is a Python pickle; stageline never loads pickle (unpickling runs "
            f"arbitrary code): {SAVE_HINT}"
        )
    if raw[:1] != b"{":
        raise CliError(f"{path} is not an XGBoost model in its JSON or UBJSON format: {SAVE_HINT}")
    booster = xgboost.Booster()
    try:
        booster.load_model(bytearray(raw))
    # XGBoost raises XGBoostError for most bad input, but not only (see registry.integrity).
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CliError(f"XGBoost cannot load {path} ({reason}): {SAVE_HINT}") from e
    return booster


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
