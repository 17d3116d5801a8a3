"""The core invariant: the same transactions score exactly the same in batch (Ray
Data, over parquet and CSV), in process and online over HTTP (Ray Serve)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest

from batch_app.run import run
from stageline import Pipeline
from stageline.spec import PipelineSpec
from tests.integration.serve_helpers import Scored, client_records, in_process, predict

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


def test_batch_in_process_and_http_scores_are_identical(
    ray_session: None,
    fraud_url: str,
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

    # Batch, over parquet files as a warehouse export lands them, and over CSV.
    parquet, csv = tmp_path / "parquet", tmp_path / "csv"
    parquet.mkdir()
    csv.mkdir()
    frame.iloc[:300].to_parquet(parquet / "part-0.parquet")
    frame.iloc[300:].drop(columns=optional).to_parquet(parquet / "part-1.parquet")
    frame.iloc[:300].to_csv(csv / "part-0.csv", index=False)
    frame.iloc[300:].drop(columns=optional).to_csv(csv / "part-1.csv", index=False)
    by_format = {}
    for name, source in (("parquet", parquet), ("csv", csv)):
        summary = run(fraud_spec, source, tmp_path / f"out-{name}", demo_home)
        assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (400, 400, 0)
        by_format[name] = batch_scores(tmp_path / f"out-{name}")

    # Online: the records as clients send them (a missing field is left out), 50 a request.
    sent = client_records(frame)
    assert sum("country" not in r for r in sent) > 100
    chunks = [sent[i : i + 50] for i in range(0, len(sent), 50)]
    with ThreadPoolExecutor(max_workers=3) as pool:
        online: dict[str, Scored] = {}
        for part in pool.map(lambda c: predict(fraud_url, c), chunks):
            online.update(part)

    reference = in_process(Pipeline(fraud_spec, demo_home), frame)
    assert len(reference) == 400
    for name, scores in (("HTTP", online), *by_format.items()):
        mismatched = {k: (scores.get(k), v) for k, v in reference.items() if scores.get(k) != v}
        assert not mismatched, f"{name} differs from in-process on {len(mismatched)} rows"
    # Not vacuous: unknown customers and missing countries change scores.
    assert len({v[0] for v in reference.values()}) > 300
