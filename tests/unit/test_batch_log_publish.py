"""A committed batch run's rows reach the prediction log exactly once: published file by
file under names of their own, so a publish repeated after a crash (between the commit
and the end of the publish, or halfway through it) replaces and never adds; an
uncommitted run's rows are dropped with its staging. No Ray: the manifest's repair."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from batch_app.manifest import STAGED_DATA, STAGED_LOG, STAGING, Manifest, reconcile
from stageline.predlog import read_log

RUN = "20261203T070000Z-abc123"
OTHER = "20261203T080000Z-def456"


def stage(output: Path, run_id: str, parts: int, rows: int = 10) -> None:
    """What a run's writer leaves in staging: its data and its log parts."""
    staged = output / STAGING / run_id
    (staged / STAGED_DATA).mkdir(parents=True)
    pd.DataFrame({"transaction_id": ["x"]}).to_parquet(staged / STAGED_DATA / "part-00000.parquet")
    (staged / STAGED_LOG).mkdir()
    for k in range(parts):
        ids = [f"{run_id}-{k}-{i}" for i in range(rows)]
        frame = pd.DataFrame(
            {
                "transaction_id": ids,
                "request_id": run_id,
                "logged_at": pd.Timestamp("2026-12-03T07:00:00Z"),
            }
        )
        frame.to_parquet(staged / STAGED_LOG / f"part-{k:05d}.parquet")


def committed(log: Path, *runs: str) -> Manifest:
    return Manifest(runs=[{"run_id": r, "log": str(log)} for r in runs])


def test_a_committed_runs_log_is_published_once_even_when_the_publish_is_repeated(
    tmp_path: Path,
) -> None:
    output, log = tmp_path / "out", tmp_path / "home" / "logs" / "fraud"
    stage(output, RUN, parts=3)
    staged_log = output / STAGING / RUN / STAGED_LOG
    kept = (staged_log / "part-00001.parquet").read_bytes()
    manifest = committed(log, RUN)

    reconcile(output, manifest)
    assert len(read_log(log)) == 30
    assert sorted(p.name for p in (log / "date=2026-12-03").iterdir()) == [
        f"batch-{RUN}-part-0000{k}.parquet" for k in range(3)
    ]

    # A crash halfway through that publish: a part moved already is staged again.
    staged_log.mkdir(parents=True)
    (staged_log / "part-00001.parquet").write_bytes(kept)
    reconcile(output, manifest)
    logged = read_log(log)
    assert len(logged) == 30
    assert logged["transaction_id"].is_unique
    assert not (output / STAGING / RUN).exists()


def test_an_uncommitted_runs_log_goes_with_its_staging(tmp_path: Path) -> None:
    output, log = tmp_path / "out", tmp_path / "logs"
    stage(output, RUN, parts=1)
    stage(output, OTHER, parts=2)

    reconcile(output, committed(log, OTHER))  # RUN never committed: killed while staging

    logged = read_log(log)
    assert set(logged["request_id"]) == {OTHER}
    assert len(logged) == 20
    assert not (output / STAGING / RUN).exists()


def test_a_run_without_a_log_publishes_its_output_only(tmp_path: Path) -> None:
    output = tmp_path / "out"
    stage(output, RUN, parts=1)
    reconcile(output, Manifest(runs=[{"run_id": RUN, "log": None}]))
    assert (output / f"run={RUN}" / "part-00000.parquet").exists()
    assert not list(tmp_path.rglob("batch-*"))
