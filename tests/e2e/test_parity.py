"""The core invariant over CSV: fraud transactions exported as CSV (text columns, an
empty field for a missing value, a file without the optional column) score in batch
(Ray Data) exactly as in process.

The same invariant over parquet and online over HTTP (Ray Serve), for every example
pipeline, is tests/e2e/test_pipelines.py."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from batch_app.run import run
from stageline import Pipeline
from stageline.spec import PipelineSpec
from tests.integration.serve_helpers import Scored, in_process

pytestmark = pytest.mark.e2e


def batch_scores(output: Path) -> dict[str, Scored]:
    frame = pd.concat(pd.read_parquet(p) for p in sorted(output.glob("run=*/*.parquet")))
    return {
        str(r["transaction_id"]): (
            float(r["score"]),
            bool(r["label"]),
            [str(x) for x in r["reasons"]],
            int(r["model_version"]),
        )
        for r in frame.to_dict(orient="records")
    }


def test_batch_over_csv_scores_as_in_process(
    ray_session: None,
    fraud_spec: PipelineSpec,
    demo_home: Path,
    holdout: pd.DataFrame,
    tmp_path: Path,
):
    fields = list(fraud_spec.request.fields)
    frame = holdout[fields].head(400).reset_index(drop=True)
    unknown = frame.index % 20 == 3
    frame.loc[unknown, "customer_id"] = [f"c-new-{i}" for i in frame.index[unknown]]
    frame["country"] = frame["country"].astype(object)
    frame.loc[frame.index % 9 == 4, "country"] = None
    frame.loc[300:, "country"] = None  # a file without the optional column at all
    optional = [n for n, f in fraud_spec.request.fields.items() if not f.is_required]
    assert optional == ["country"], "every optional field is left out of the rows below"

    csv = tmp_path / "csv"
    csv.mkdir()
    frame.iloc[:300].to_csv(csv / "part-0.csv", index=False)
    frame.iloc[300:].drop(columns=optional).to_csv(csv / "part-1.csv", index=False)
    summary = run(fraud_spec, csv, tmp_path / "out", demo_home)

    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (400, 400, 0)
    scores = batch_scores(tmp_path / "out")
    reference = in_process(Pipeline(fraud_spec, demo_home), frame)
    assert len(reference) == 400
    mismatched = {k: (scores.get(k), v) for k, v in reference.items() if scores.get(k) != v}
    assert not mismatched, f"CSV differs from in-process on {len(mismatched)} rows"
    # Not vacuous: unknown customers and missing countries change scores.
    assert len({v[0] for v in reference.values()}) > 300
