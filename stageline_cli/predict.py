"""``stageline predict``: score a file in this process, without Ray."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd

from stageline.context import AS_OF_FEATURES, as_of_field, resolve_home
from stageline.spec import prepare_home
from stageline_cli.common import AddCommand, CliError, load, online_option, spec_option


def add_predict(add: AddCommand) -> None:
    predict = add(
        "predict",
        "score a file in process (no Ray)",
        "Run every stage of the pipeline in this process on a parquet, CSV or JSON-lines file. "
        "Rows that fail a check are reported with their reason, not dropped.",
    )
    spec_option(predict)
    predict.add_argument("--input", required=True, help="records: .parquet, .csv, .json or .jsonl")
    predict.add_argument(
        "--output",
        help="write predictions here (.parquet, .csv or .jsonl); default: JSON lines on stdout",
    )
    online_option(predict)
    predict.add_argument(
        "--as-of",
        action="store_true",
        help="features as of each row's event time (the spec's request.event_time), joined "
        "from the offline store's history as training joins them, instead of the online "
        "store's latest values: for backfills and backtests",
    )
    predict.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    from stageline.pipeline import Pipeline, records

    spec, home = load(args), resolve_home(args.home)
    if args.as_of:
        as_of_field(spec)  # a spec without request.event_time fails now, not after setup
    prepare_home(spec, home)
    batch = read_records(Path(args.input))
    started = time.perf_counter()
    result = Pipeline(spec, home, as_of=args.as_of).predict(batch)
    seconds = time.perf_counter() - started
    if args.output:
        write_records(result, Path(args.output))
    else:
        for row in records(result):
            print(json.dumps(row, default=str))
    rejected = int(result["error"].notna().sum())
    models = sorted(
        {
            f"{n} v{v}"
            for n, v in zip(result["model_name"], result["model_version"], strict=True)
            if pd.notna(n)
        }
    )
    print(
        f"scored {len(result) - rejected} of {len(result)} rows ({rejected} rejected, see 'error') "
        f"with {', '.join(models) or 'no model'}{', ' + AS_OF_FEATURES if args.as_of else ''} "
        f"in {seconds:.2f} s" + (f"; wrote {args.output}" if args.output else ""),
        file=sys.stderr,
    )
    return 0


def read_records(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise CliError(f"no such input file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".parquet" or path.is_dir():
        return pd.read_parquet(path)
    if suffix == ".csv":
        # As batch reads CSV: only an empty field is missing ("NA" is a country code).
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    if suffix in (".jsonl", ".ndjson"):
        # Plain JSON records, as an HTTP client sends them: no pandas type guessing.
        with path.open() as f:
            return pd.DataFrame.from_records([json.loads(line) for line in f if line.strip()])
    if suffix == ".json":
        data = json.loads(path.read_text())
        rows = data.get("records", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise CliError(f'{path}: expected a JSON list of records or {{"records": [...]}}')
        return pd.DataFrame.from_records(rows)
    raise CliError(f"{path}: unknown input format {suffix!r} (use .parquet, .csv, .json or .jsonl)")


def write_records(frame: pd.DataFrame, path: Path) -> None:
    from stageline.pipeline import records

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        frame.to_parquet(path, index=False)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix in (".jsonl", ".ndjson"):
        path.write_text("".join(json.dumps(r, default=str) + "\n" for r in records(frame)))
    else:
        raise CliError(f"{path}: unknown output format {suffix!r} (use .parquet, .csv or .jsonl)")
