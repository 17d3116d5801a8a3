"""``stageline init NAME``: a pipeline project for a user's own data and model.

The project is self-contained: a spec whose feature table and code files are paths
relative to it, a training script that registers the model under any home, and small
labelled template data, so that it trains and scores as generated. The text files are
templates under ``templates/init`` (``__NAME__`` stands for the project's name); the
data is generated here, seeded, so that events and feature table agree.
"""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from stageline.context import resolve_home
from stageline_cli.common import AddCommand, CliError

TEMPLATES = Path(__file__).parent / "templates" / "init"
PLACEHOLDER = "__NAME__"
NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
"""A name that is at once a folder, a file stem, a pipeline name and a model name."""
VIEW = "customer_stats"
CHANNELS = ("web", "mobile", "store")
START = pd.Timestamp("2026-01-01", tz="UTC")
EVENTS = "data/events.csv"
TABLE = f"data/{VIEW}.parquet"


@dataclass(frozen=True)
class ProjectFile:
    """One file of the project: where it goes, and what it is for."""

    path: str
    what: str
    template: str | None = None


FILES = (
    ProjectFile(
        f"{PLACEHOLDER}.yaml", "the spec: request fields, feature view, stages", "spec.yaml"
    ),
    ProjectFile(
        "transforms.py", "request-time features, for training and serving", "transforms.py"
    ),
    ProjectFile("stages.py", "a stage of your own, wired into the spec", "stages.py"),
    ProjectFile("train.py", "trains and registers the model, or registers yours", "train.py"),
    ProjectFile(EVENTS, "labelled example events: replace with yours"),
    ProjectFile(TABLE, "the feature view's table: replace with yours"),
    ProjectFile("README.md", "these steps and how to bring your own data", "README.md"),
)


def add_init(add: AddCommand) -> None:
    init = add(
        "init",
        "create a pipeline project for your own data and model",
        "Create the folder DIR/NAME with a pipeline spec for a binary classifier, a "
        "transform, a stage, a training script (which also registers a booster you already "
        "trained) and small labelled template data: it trains and scores as created. "
        "Existing files are never overwritten.",
    )
    init.add_argument(
        "name",
        metavar="NAME",
        help="the project's name: the folder, the spec, the pipeline and the model (lowercase "
        "letters, digits, '-' and '_', starting with a letter)",
    )
    init.add_argument("--dir", default=".", help="create the project under DIR (default: .)")
    init.set_defaults(func=cmd_init)


def cmd_init(args: argparse.Namespace) -> int:
    root = scaffold(args.name, Path(args.dir))
    print(f"created {root}/, the {args.name} pipeline:")
    paths = [project_path(f.path, args.name) for f in FILES]
    width = max(map(len, paths)) + 2
    for path, f in zip(paths, FILES, strict=True):
        print(f"  {path:<{width}}{f.what}")
    home = f" --home {shlex.quote(str(resolve_home(args.home)))}" if args.home else ""
    steps = next_steps(args.name, home, root)
    width = max(len(command) for command, _ in steps) + 2
    print("next steps:")
    for command, why in steps:
        print(f"  {command:<{width}}# {why}" if why else f"  {command}")
    print(f"your own data and model: see {root / 'README.md'}")
    return 0


def next_steps(name: str, home: str = "", root: Path | None = None) -> list[tuple[str, str]]:
    """The commands from the created project to a served model, run from its folder."""
    spec = f"{shlex.quote(name)}.yaml"
    return [
        (f"cd {shlex.quote(str(root or name))}", ""),
        (f"python train.py{home}", f"train on data/events.csv, register {name}@champion"),
        (f"stageline predict --spec {spec}{home} --input data/events.csv", "score in process"),
        (f"stageline serve --spec {spec}{home}", "over HTTP on 127.0.0.1:8000"),
        (
            f"stageline batch --spec {spec}{home} --input data/events.csv --output scores",
            "with Ray Data",
        ),
    ]


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise CliError(
            f"bad project name {name!r}: use lowercase letters, digits, '-' and '_', starting "
            "with a letter (it names the folder, the spec, the pipeline and the model)"
        )


def project_path(path: str, name: str) -> str:
    return path.replace(PLACEHOLDER, name)


def scaffold(name: str, parent: Path) -> Path:
    """Create the project ``parent/name``; refuse a folder that exists and is not empty."""
    check_name(name)
    root = parent / name
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise CliError(
            f"{root} already exists and is not empty; stageline init never overwrites: pick "
            "another NAME or --dir, or move it away"
        )
    events, table = template_data()
    for f in FILES:
        target = root / project_path(f.path, name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.template is not None:
            target.write_text(render(f.template, name))
        elif f.path == EVENTS:
            events.to_csv(target, index=False)
        elif f.path == TABLE:
            table.to_parquet(target, index=False)
    return root


def render(template: str, name: str) -> str:
    return (TEMPLATES / template).read_text().replace(PLACEHOLDER, name)


def template_data(
    events: int = 40, customers: int = 8, days: int = 56, seed: int = 3
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Labelled events and the feature table they join, as the template spec names them.

    A customer's features are snapshot weekly. An event is bad (``label`` 1) more often
    when its amount is far over the customer's habit, at night, or on the web: a signal
    the template model can learn and a larger ``events`` makes clear.
    """
    rng = np.random.default_rng(seed)
    ids = np.array([f"c{i:03d}" for i in range(1, customers + 1)])
    habit = rng.lognormal(np.log(60.0), 0.7, customers).round(2)
    weeks = np.arange(days // 7 + 1)
    table = pd.DataFrame(
        {
            "customer_id": np.repeat(ids, len(weeks)),
            # Snapshots start a day before the first event: every event finds one.
            "event_time": np.tile(
                START - pd.Timedelta(days=1) + pd.to_timedelta(weeks * 7, "D"), customers
            ),
            "avg_amount_30d": (
                np.repeat(habit, len(weeks)) * rng.uniform(0.9, 1.1, customers * len(weeks))
            ).round(2),
            "events_7d": rng.poisson(4, customers * len(weeks)).astype("int64"),
            "tenure_days": (
                np.repeat(rng.integers(30, 2000, customers), len(weeks))
                + np.tile(weeks * 7, customers)
            ).astype("int64"),
        }
    )
    who = rng.integers(0, customers, events)
    unusual = rng.random(events) < 0.3
    amount = habit[who] * np.where(
        unusual, rng.uniform(3, 9, events), rng.lognormal(0, 0.3, events)
    )
    ts = START + pd.to_timedelta(np.sort(rng.uniform(0, days * 86_400, events)).round(), "s")
    night = ts.hour < 6
    channel = rng.choice(CHANNELS, events, p=[0.4, 0.4, 0.2])
    logit = -2.4 + 3.0 * unusual + 1.2 * night + 0.8 * (channel == "web")
    label = (rng.random(events) < 1 / (1 + np.exp(-logit))).astype("int64")
    frame = pd.DataFrame(
        {
            "event_id": [f"e{i:05d}" for i in range(1, events + 1)],
            "customer_id": ids[who],
            "amount": amount.round(2),
            "channel": channel,
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "label": label,
        }
    )
    return frame, table
