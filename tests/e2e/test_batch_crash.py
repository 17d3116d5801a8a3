"""A batch driver killed midway (SIGKILL, no cleanup), then run again: the output
is complete and holds every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from batch_app.run import MANIFEST, STAGING, run
from stageline.demo.batch import transactions
from stageline.spec import PipelineSpec
from tests.conftest import FRAUD_SPEC, SMALL_DEMO

pytestmark = pytest.mark.e2e


def published_ids(output: Path) -> list[str]:
    parts = sorted(output.glob("run=*/*.parquet"))
    return [
        i for p in parts for i in pd.read_parquet(p, columns=["transaction_id"])["transaction_id"]
    ]


def test_driver_killed_midway_then_rerun_leaves_complete_output_without_duplicates(
    ray_session: None, fraud_spec: PipelineSpec, demo_home: Path, tmp_path: Path
) -> None:
    import ray

    frame = transactions(
        300_000, customers=SMALL_DEMO["customers"], days=SMALL_DEMO["days"], bad_share=0.0
    )
    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    for i in range(6):
        frame.iloc[i * 50_000 : (i + 1) * 50_000].to_parquet(source / f"part-{i}.parquet")
    (source / "part-5.parquet").rename(tmp_path / "later.parquet")  # arrives after run 1

    first = run(fraud_spec, [str(source / "part-0.parquet")], output, demo_home)
    assert first.rows_out == 50_000
    (tmp_path / "later.parquet").rename(source / "part-5.parquet")

    # The nightly run over the landing folder, as its own process on the same cluster.
    env = {
        **os.environ,
        "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
        "RAY_AUTH_MODE": "token",
        "PYTHONUNBUFFERED": "1",
    }
    argv = [sys.executable, "-m", "batch_app", "--spec", str(FRAUD_SPEC)]
    argv += ["--home", str(demo_home), "--input", str(source), "--output", str(output)]
    log = tmp_path / "driver.log"
    with log.open("w") as sink:
        driver = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 180
        while not list((output / STAGING).glob("*/data/*.parquet")):
            assert driver.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # The first scored batch is staged; Ray Data's backpressure keeps the rest
        # of the 250,000 rows from running far ahead of the writer.
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    assert driver.returncode == -signal.SIGKILL

    manifest = json.loads((output / MANIFEST).read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [first.run_id], "the kill came too late"
    assert any((output / STAGING).iterdir()), "the killed run left its staging behind"
    assert published_ids(output) == list(frame["transaction_id"].iloc[:50_000])

    again = run(fraud_spec, source, output, demo_home)

    assert (again.files, again.rows_in) == (5, 250_000)
    ids = published_ids(output)
    assert len(ids) == len(set(ids)) == 300_000
    assert set(ids) == set(frame["transaction_id"])
    assert not any((output / STAGING).iterdir())
