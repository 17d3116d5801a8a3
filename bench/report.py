"""What every benchmark result records: the machine, the versions, the configuration;
and how results are written (JSON for machines, Markdown for people)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).parent / ".data"
"""Inputs and work files of the default runs, reused by later runs (gitignored)."""
PACKAGES = ("ray", "xgboost", "pandas", "pyarrow", "numpy", "pydantic")
ROOT = Path(__file__).resolve().parents[1]


def portable(text: str) -> str:
    """``text`` without this machine's paths: the repository's own relative to its
    root, this Python as ``python``. Results are committed and read elsewhere."""
    return text.replace(sys.executable, "python").replace(f"{ROOT}/", "").replace(str(ROOT), ".")


def machine() -> dict[str, Any]:
    memory = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in PACKAGES},
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def median_seconds(call: Callable[[], Any], repeat: int) -> float:
    """Median seconds of ``call()`` over ``repeat`` runs, one at a time, after a warm-up."""
    call()
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--results DIR`` and ``--smoke``, which every benchmark takes."""
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="write <name>.json, .md (and .png) here (default: bench/results)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, a few seconds: checks that the benchmark runs, measures nothing",
    )


def scratch(results: Path) -> Path:
    """Where a run keeps its inputs and work files: :data:`DATA` for the default
    results folder, else ``<results>/tmp``, so a run elsewhere (a test, a quick try)
    leaves nothing in the project and reuses nothing from it."""
    return DATA if results.resolve() == RESULTS.resolve() else results / "tmp"


def write(
    name: str,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    table: str,
    results: Path = RESULTS,
    summary: dict[str, Any] | None = None,
) -> Path:
    """``<results>/<name>.json`` and ``<name>.md``, the Markdown also printed; returns
    the Markdown path.

    ``summary``: figures derived from the rows (best rates, ratios), recorded as well."""
    results.mkdir(parents=True, exist_ok=True)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    m = machine()
    record = {"benchmark": name, "at": when, "machine": m, "config": config, "rows": rows}
    if summary is not None:
        record["summary"] = summary
    (results / f"{name}.json").write_text(portable(json.dumps(record, indent=1)) + "\n")
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    md = results / f"{name}.md"
    md.write_text(
        portable(
            f"# {name}\n\n{m['cores']} cores, {m['memory_gib']} GiB, Python {m['python']}; "
            f"{versions}. Run {when}.\n\nConfiguration: `{json.dumps(config)}`\n\n{table}\n"
        )
    )
    print(md.read_text(), flush=True)
    return md


def markdown(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
