"""``stageline monitor`` and ``stageline evaluate``: what the prediction log says."""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from stageline.context import resolve_home
from stageline_cli.common import AddCommand, load, spec_option
from stageline_cli.predict import read_records

EXIT_DRIFT = 3
"""``stageline monitor --fail-on-drift``'s status when a feature or the score drifted."""


def add_monitor(add: AddCommand) -> None:
    monitor = add(
        "monitor",
        "compare logged features and scores with the model's training profile",
        "Read the prediction log since --since and compare, for each model version that "
        "scored it, every feature's and the score's distribution with the version's "
        "training profile: the population stability index on the training deciles (under "
        "0.1 stable, 0.1-0.25 a shift, 0.25 and over a drift) and the means. Prints a "
        "table and writes an HTML report with a chart per feature.",
    )
    spec_option(monitor)
    monitor.add_argument(
        "--since", default="1d", help="1d, 12h, 30m or an ISO time (default: %(default)s)"
    )
    monitor.add_argument(
        "--html",
        type=Path,
        help="write the report here (default: <home>/reports/<pipeline>-drift.html)",
    )
    monitor.add_argument(
        "--fail-on-drift",
        action="store_true",
        help=f"exit with status {EXIT_DRIFT} when anything drifted (for a scheduled check)",
    )
    monitor.set_defaults(func=cmd_monitor)

    evaluate = add(
        "evaluate",
        "score logged predictions against labels that arrived later",
        "Join labels (the request's id field and the label) to the logged predictions by "
        "id, and report per model version and day: n, AUC, log loss and the positive rate "
        "for a binary model, MAE and RMSE for a regression one. With a challenger in the "
        "log, champion and challenger side by side: in shadow mode on the same records, "
        "in canary mode each on the records it answered.",
    )
    spec_option(evaluate)
    evaluate.add_argument(
        "--labels",
        required=True,
        type=Path,
        help="the outcomes (.parquet, .csv, .json or .jsonl): the id field and the label",
    )
    evaluate.add_argument("--label", help="the label column (default: the spec's training.label)")
    evaluate.add_argument("--since", help="only predictions logged since (1d, 12h, or a time)")
    evaluate.add_argument("--json", action="store_true", help="one JSON object per line")
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_monitor(args: argparse.Namespace) -> int:
    from stageline.monitoring import drift, html_report, parse_since

    spec, home = load(args), resolve_home(args.home)
    reports = drift(spec, home, parse_since(args.since))
    for report in reports:
        print(report.table())
    path: Path = args.html or home / "reports" / f"{spec.name}-drift.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_report(spec, reports))
    print(f"report: {path}")
    drifted = any(r.flagged() for r in reports)
    return EXIT_DRIFT if drifted and args.fail_on_drift else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stageline.monitoring import compare, labelled, parse_since, scores

    spec, home = load(args), resolve_home(args.home)
    since = parse_since(args.since) if args.since else None
    found = labelled(spec, home, read_records(args.labels), label=args.label, since=since)
    table, comparisons = scores(found), compare(found)
    if args.json:
        for row in table.to_dict(orient="records"):
            print(json.dumps(row))
        for comparison in comparisons:
            print(json.dumps(comparison.record()))
        return 0
    now = datetime.now(timezone.utc)
    print(f"{spec.name}: logged predictions with labels, per model version and day")
    print(f"(as of {now:%Y-%m-%d %H:%M} UTC)")
    shown = table.assign(mode=table["mode"].fillna("-"))
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for comparison in comparisons:
        print()
        print(comparison.table())
    return 0
