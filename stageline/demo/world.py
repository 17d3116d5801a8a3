"""The demo world of a home, built on first use, and an example record from it.

Used by the ``stageline`` command and the benchmarks: a run of the demo spec on an
empty home builds the world first instead of failing on a missing model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import ValidationError

from stageline import examples
from stageline.spec import PipelineSpec


def ensure_demo(spec: PipelineSpec, home: Path) -> None:
    """Build the demo world first when the demo spec runs on an empty home: the demo
    spec's ``setup``.

    Progress goes to stderr: it takes a few seconds, and stdout may carry predictions.
    """
    from stageline.demo.train import MODEL, build_demo, demo_exists

    if not demo_exists(home) and not (home / "models" / MODEL).exists():
        from stageline.demo.batch import batch_dir, write_batch_input

        print(f"no demo world under {home} yet: building it first ...", file=sys.stderr)
        build_demo(spec, home)
        if not batch_dir(home).exists():
            parts = write_batch_input(home)
            print(f"batch input: {len(parts)} files under {parts[0].parent}", file=sys.stderr)


def ensure_ensemble(spec: PipelineSpec, home: Path) -> None:
    """The ensemble example's setup (``pipelines/fraud-ensemble.yaml``): the demo world,
    then its second model, ``fraud_lite``, trained once on the demo's events when the
    home has none (a few seconds; the demo alone never trains it)."""
    from stageline.demo.train import LITE_MODEL, train_lite

    ensure_demo(spec, home)
    if not (home / "models" / LITE_MODEL).exists():
        print(f"training the ensemble's second model, {LITE_MODEL} ...", file=sys.stderr)
        print(train_lite(spec, home).summary(), file=sys.stderr)


def example_record(spec: PipelineSpec, home: Path) -> dict[str, Any]:
    """One record to show in an example request.

    The demo's first held-out row when ``home`` holds the demo and the row fits the
    spec (a real customer, so the example finds features); else a record made from
    the spec's request schema.
    """
    holdout = home / "demo" / "holdout.parquet"
    if holdout.exists():
        row = pd.read_parquet(holdout).iloc[0]
        if all(f in row for f in spec.request.fields):
            record = {f: _plain(row[f]) for f in spec.request.fields}
            try:
                spec.request.record_model().model_validate(record)
            except ValidationError:
                pass
            else:
                return record
    return examples.example_record(spec.request)


def _plain(value: Any) -> Any:
    """A JSON-ready Python value from a pandas cell."""
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return None if pd.api.types.is_scalar(value) and pd.isna(value) else value
