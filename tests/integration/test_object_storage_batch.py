"""A Ray Data batch run whose registry and feature tables are in a bucket: the
workers load them from object storage (no shared folder) and score exactly as the
in-process pipeline on the local home."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest

from batch_app.run import run
from stageline import Pipeline
from stageline.spec import PipelineSpec
from stageline.storage import s3_filesystem
from tests.conftest import S3Server
from tests.integration.test_batch import REQUEST, scored

pytestmark = pytest.mark.integration


def test_a_batch_run_loads_its_model_and_features_from_s3(
    ray_session: None,
    s3_server: S3Server,
    s3_bucket: str,
    fraud_spec: PipelineSpec,
    demo_home: Path,
    holdout: pd.DataFrame,
    tmp_path: Path,
) -> None:
    bucket = s3_bucket.removeprefix("s3://")
    for folder in ("models", "features", "online"):
        pafs.copy_files(
            str(demo_home / folder), f"{bucket}/{folder}", destination_filesystem=s3_filesystem()
        )
    # The endpoint in the URIs themselves: the workers need no AWS_ENDPOINT_URL.
    query = f"?endpoint_override={s3_server.endpoint}&region=us-east-1"
    storage = {f: f"{s3_bucket}/{f}{query}" for f in ("models", "features", "online")}
    spec = fraud_spec.model_copy(update={"storage": fraud_spec.storage.model_copy(update=storage)})
    rows = holdout.iloc[:600][REQUEST].reset_index(drop=True)
    source = tmp_path / "in"
    source.mkdir()
    rows.to_parquet(source / "part-0.parquet")
    home = tmp_path / "home"  # no models, no tables: they are in the bucket

    summary = run(spec, source, tmp_path / "out", home)

    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (600, 600, 0)
    assert summary.models == ("fraud v1",)
    assert not (home / "models").exists()
    out = scored(tmp_path / "out").set_index("transaction_id").loc[rows["transaction_id"]]
    expected = Pipeline(fraud_spec, demo_home).predict(rows).set_index("transaction_id")
    np.testing.assert_array_equal(out["score"].to_numpy(), expected["score"].to_numpy())
