"""The demo world of a home, built on first use, and a sample record from it.

Used by the ``stageline`` command and the benchmarks: a run of the demo spec on an
empty home builds the world first instead of failing on a missing model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from stageline.spec import PipelineSpec


def ensure_demo(spec: PipelineSpec, home: Path) -> None:
    """Build the demo world first when the demo spec runs on an empty home.

    Progress goes to stderr: it takes a few seconds, and stdout may carry predictions.
    """
    from stageline.demo.train import MODEL, build_demo, demo_exists

    if spec.name == "fraud" and not demo_exists(home) and not (home / "models" / MODEL).exists():
        from stageline.demo.batch import batch_dir, write_batch_input

        print(f"no demo world under {home} yet: building it first ...", file=sys.stderr)
        build_demo(spec, home)
        if not batch_dir(home).exists():
            parts = write_batch_input(home)
            print(f"batch input: {len(parts)} files under {parts[0].parent}", file=sys.stderr)


def example_record(spec: PipelineSpec, home: Path) -> dict[str, object] | None:
    """One record to show in an example request: the demo's first held-out row."""
    holdout = home / "demo" / "holdout.parquet"
    if not holdout.exists():
        return None
    row = pd.read_parquet(holdout).iloc[0]
    return {
        f: (row[f].isoformat() if f == "ts" else row[f]) for f in spec.request.fields if f in row
    }
