"""Batch inference with Ray Data on the session's local Ray: parity with the
in-process pipeline, the quarantine, incremental runs and crash recovery."""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from batch_app.dataset import ArrowBatchChain, BatchChain
from batch_app.manifest import (
    LOCK,
    MANIFEST,
    QUARANTINE,
    STAGED_DATA,
    STAGED_LOG,
    STAGED_QUARANTINE,
    STAGING,
)
from batch_app.ray_internals import PARQUET_READ_UNIT_ENV, SCANNER_READAHEAD_ENV, read_parquet
from batch_app.run import Summary, run
from stageline import Pipeline
from stageline.demo.batch import BAD_KINDS, transactions
from stageline.features import StoreUnavailableError
from stageline.predlog import read_log
from stageline.spec import PipelineSpec
from stageline_cli import main
from tests.conftest import FRAUD_SPEC, SMALL_DEMO, RedisServer

pytestmark = pytest.mark.integration

REQUEST = ["transaction_id", "customer_id", "amount", "merchant_category", "ts", "country"]


def scored(output: Path) -> pd.DataFrame:
    """Every published scored row under ``output``."""
    parts = sorted(output.glob("run=*/*.parquet"))
    frames = [pd.read_parquet(p) for p in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def quarantined(output: Path) -> pd.DataFrame:
    parts = sorted((output / QUARANTINE).glob("run=*/*.parquet"))
    frames = [pd.read_parquet(p) for p in parts]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def test_batch_scores_equal_in_process_pipeline_scores(
    ray_session: None, fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame, tmp_path
):
    rows = holdout.iloc[:1500][REQUEST].reset_index(drop=True)
    rows.loc[rows.index[::7], "country"] = None  # optional field missing: its default applies
    assert rows["customer_id"].str.startswith("u").any(), "want customers the store never saw"
    source = tmp_path / "in"
    source.mkdir()
    rows.iloc[:900].to_parquet(source / "part-0.parquet")
    rows.iloc[900:].to_parquet(source / "part-1.parquet")

    summary = run(fraud_spec, source, tmp_path / "out", demo_home)

    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (1500, 1500, 0)
    assert summary.models == ("fraud v1",)
    out = scored(tmp_path / "out").set_index("transaction_id").loc[rows["transaction_id"]]
    expected = Pipeline(fraud_spec, demo_home).predict(rows).set_index("transaction_id")
    assert expected["error"].isna().all()
    np.testing.assert_array_equal(out["score"].to_numpy(), expected["score"].to_numpy())
    np.testing.assert_array_equal(out["label"].to_numpy(), expected["label"].to_numpy(bool))
    assert [list(r) for r in out["reasons"]] == [list(r) for r in expected["reasons"]]
    assert set(out["model_name"]) == {"fraud"}
    assert set(out["model_version"]) == {1}
    assert set(out["run_id"]) == {summary.run_id}


BAD_ROWS: list[tuple[dict[str, str | None], str]] = [
    ({"transaction_id": None}, "transaction_id: required field is missing"),
    ({"customer_id": None}, "customer_id: required field is missing"),
    ({"customer_id": "c" * 65}, "customer_id: must be a string of at most 64 characters"),
    ({"amount": None}, "amount: required field is missing"),
    ({"amount": "abc"}, "amount: must be a finite number"),
    ({"amount": "inf"}, "amount: must be a finite number"),
    ({"amount": "-5"}, "amount: must be >= 0"),
    ({"amount": "2000000"}, "amount: must be <= 1000000"),
    ({"merchant_category": None}, "merchant_category: required field is missing"),
    ({"merchant_category": "casino"}, "merchant_category: must be one of"),
    ({"ts": None}, "ts: required field is missing"),
    ({"ts": "not-a-date"}, "ts: must be an ISO 8601 date-time"),
    ({"ts": "1500-01-01T00:00:00Z"}, "ts: must be an ISO 8601 date-time"),
    ({"country": "USA"}, "country: must be a string of at most 2 characters"),
]
"""One row per rule of the fraud spec's request schema, and the reason it gets."""


def test_every_request_rule_is_quarantined_with_its_reason(
    ray_session: None, fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame, tmp_path
):
    # Text columns, as a CSV export or JSON landing zone gives them: every rule applies.
    base = holdout.iloc[:40][REQUEST].reset_index(drop=True)
    base["ts"] = base["ts"].map(lambda t: t.isoformat())
    base["amount"] = base["amount"].map(str)
    records: list[dict[str, object]] = [
        {str(k): v for k, v in r.items()} for r in base.to_dict(orient="records")
    ]
    for i, (change, _reason) in enumerate(BAD_ROWS):
        records[i] = {**records[i], "transaction_id": f"bad-{i}", **change}
    frame = pd.DataFrame.from_records(records, columns=REQUEST).astype(object)
    source = tmp_path / "bad.parquet"
    frame.to_parquet(source)
    good = len(frame) - len(BAD_ROWS)

    summary = run(fraud_spec, source, tmp_path / "out", demo_home)

    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (40, good, 14)
    assert summary.rows_in == summary.rows_out + summary.rows_quarantined
    q = quarantined(tmp_path / "out")
    assert len(q) == len(BAD_ROWS)
    assert set(q["stage"]) == {"validate"}
    by_amount = dict(zip(q["reason"], q["amount"], strict=True))
    for change, reason in BAD_ROWS:
        hits = [r for r in q["reason"] if r.startswith(reason)]
        assert hits, f"no quarantined row says {reason!r}"
        if "amount" in change and change["amount"] is not None:
            # the original value, as it arrived, for the user to find and fix
            assert any(by_amount[h] == change["amount"] for h in hits)
    assert q["record"].map(lambda r: set(json.loads(r)) == set(REQUEST)).all()
    # The same reasons the in-process pipeline gives, row for row.
    expected = Pipeline(fraud_spec, demo_home).predict(frame)
    assert sorted(q["stage"] + ": " + q["reason"]) == sorted(expected["error"].dropna())
    out = scored(tmp_path / "out")
    assert sorted(out["transaction_id"]) == sorted(frame["transaction_id"].iloc[len(BAD_ROWS) :])


def _runs(output: Path) -> list[str]:
    return sorted(p.name for p in output.glob("run=*"))


def leave_as_killed(output: Path, run_id: str, log: Path, manifest: bytes | None = None) -> None:
    """Turn ``output``, after run ``run_id`` completed, into what that run leaves when it
    is killed (SIGKILL: nothing of it runs after) once its output is staged: its
    published folders, and its files in the prediction log at ``log``, moved back under
    ``_staging/<run_id>/``, as its writer left them.
    ``manifest``: the manifest from before the run, put back, for a kill before the
    commit; without it, the run stays committed (a kill between commit and publish).

    Both instants are too brief for a kill from outside to hit them reliably; a kill
    from outside while a run is staging is tests/faults/test_batch_faults.py's
    ``test_driver_killed_midway_then_rerun...``."""
    staged = output / STAGING / run_id
    staged.mkdir(parents=True)
    (output / f"run={run_id}").rename(staged / STAGED_DATA)
    rejected = output / QUARANTINE / f"run={run_id}"
    if rejected.exists():
        rejected.rename(staged / STAGED_QUARANTINE)
    (staged / STAGED_LOG).mkdir()
    for part in log.glob(f"date=*/batch-{run_id}-part-*.parquet"):
        part.rename(staged / STAGED_LOG / part.name.removeprefix(f"batch-{run_id}-"))
    if manifest is not None:
        (output / MANIFEST).write_bytes(manifest)


def test_incremental_runs_crashes_and_full(
    ray_session: None, fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame, tmp_path
):
    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    rows = holdout[REQUEST].reset_index(drop=True)

    def add(name: str, part: slice) -> None:
        rows.iloc[part].to_parquet(source / f"{name}.parquet")

    def go(full: bool = False) -> Summary:
        return run(fraud_spec, source, output, demo_home, full=full)

    log = demo_home / "logs" / "fraud"  # the session's home: other tests log there too

    def batch_log(*runs: Summary) -> pd.DataFrame:
        """The prediction log's rows of these runs."""
        rows = read_log(log)
        return rows[rows["request_id"].isin([r.run_id for r in runs])]

    add("a", slice(0, 300))
    first = go()
    assert (first.rows_in, first.files) == (300, 1)

    # A new file arrives; the run is killed after staging its output, before its commit.
    add("b", slice(300, 500))
    before = (output / MANIFEST).read_bytes()
    killed = go()
    assert killed.run_id is not None
    leave_as_killed(output, killed.run_id, log, manifest=before)
    assert _runs(output) == [f"run={first.run_id}"], "a killed run published nothing"
    assert any((output / STAGING).iterdir())
    assert len(scored(output)) == 300

    # The rerun drops the stale staging and scores only the new file.
    second = go()
    assert (second.rows_in, second.files) == (200, 1)
    assert not any((output / STAGING).iterdir())
    assert _runs(output) == sorted([f"run={first.run_id}", f"run={second.run_id}"])
    out = scored(output)
    assert len(out) == 500
    assert out["transaction_id"].is_unique

    # Killed after committing the manifest, before publishing: the next run publishes it.
    add("c", slice(500, 600))
    third = go()
    assert third.run_id is not None
    leave_as_killed(output, third.run_id, log)
    assert len(_runs(output)) == 2
    nothing = go()
    assert nothing.run_id is None
    assert "no new input" in nothing.line()
    out = scored(output)
    assert len(_runs(output)) == 3
    assert not any((output / STAGING).iterdir())
    assert len(out) == 600
    assert out["transaction_id"].is_unique
    manifest = json.loads((output / MANIFEST).read_text())
    assert sorted(Path(p).name for p in manifest["files"]) == [
        "a.parquet",
        "b.parquet",
        "c.parquet",
    ]
    assert sum(r["rows_in"] for r in manifest["runs"]) == 600
    # The prediction log holds every scored row of the committed runs once, with the
    # features the model received; the run killed before its commit logged nothing.
    logged = batch_log(first, killed, second, third)
    assert len(logged) == 600
    assert logged["transaction_id"].is_unique
    assert set(logged["request_id"]) == {first.run_id, second.run_id, third.run_id}
    assert logged["avg_amount_30d"].notna().all()
    assert (logged["model_name"] == "fraud").all()

    # --full: everything again, into a fresh output.
    full = go(full=True)
    assert (full.rows_in, full.files) == (600, 3)
    assert _runs(output) == [f"run={full.run_id}"]
    out = scored(output)
    assert len(out) == 600
    assert out["transaction_id"].is_unique
    assert [r["run_id"] for r in json.loads((output / MANIFEST).read_text())["runs"]] == [
        full.run_id
    ]


def test_cli_batch_on_demo_input(
    ray_session: None, demo_home: Path, tmp_path, capsys: pytest.CaptureFixture[str]
):
    frame = transactions(
        2000, customers=SMALL_DEMO["customers"], days=SMALL_DEMO["days"], bad_share=0.02
    )
    source, output = tmp_path / "batch", tmp_path / "out"
    source.mkdir()
    frame.iloc[:1000].to_parquet(source / "part-000.parquet")
    frame.iloc[1000:].to_parquet(source / "part-001.parquet")
    argv = ["batch", "--spec", str(FRAUD_SPEC), "--home", str(demo_home)]
    argv += ["--input", str(source), "--output", str(output)]

    assert main(argv) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "2000 rows in from 2 file(s) -> 1960 scored, 40 quarantined" in line
    assert "fraud v1" in line
    assert str(output) in line
    assert "rows/s" in line
    q = quarantined(output)
    reasons = set(q["reason"].str.split(":").str[0])
    assert reasons == {"amount", "merchant_category", "customer_id", "ts"}, BAD_KINDS
    assert len(scored(output)) == 1960

    assert main(argv) == 0
    assert "no new input" in capsys.readouterr().out


def test_a_second_run_on_the_same_output_is_refused(
    fraud_spec: PipelineSpec, demo_home: Path, tmp_path
):
    import fcntl

    output = tmp_path / "out"
    output.mkdir()
    (tmp_path / "in.parquet").write_bytes(b"")
    with (output / LOCK).open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(ValueError, match="another batch run"):
            run(fraud_spec, tmp_path / "in.parquet", output, demo_home)


def test_cli_batch_on_an_empty_home_builds_the_demo_first(
    ray_session: None, tmp_path, capsys: pytest.CaptureFixture[str]
):
    home, output = tmp_path / "home", tmp_path / "out"
    argv = ["batch", "--spec", str(FRAUD_SPEC), "--home", str(home)]
    argv += ["--input", str(home / "demo" / "batch"), "--output", str(output)]

    assert main(argv) == 0

    captured = capsys.readouterr()
    assert "building it first" in captured.err
    line = captured.out.strip().splitlines()[-1]
    assert "200000 rows in from 4 file(s) -> 198000 scored, 2000 quarantined" in line
    assert "fraud v1" in line
    assert len(scored(output)) == 198_000


def test_batch_with_redis_online_store_scores_as_memory_and_fails_clearly_when_it_is_down(
    ray_session: None,
    fraud_spec: PipelineSpec,
    demo_home: Path,
    holdout: pd.DataFrame,
    redis_server: RedisServer,
    tmp_path,
    capsys: pytest.CaptureFixture[str],
):
    source = tmp_path / "in"
    source.mkdir()
    rows = holdout.iloc[:2000][REQUEST].reset_index(drop=True)
    rows.iloc[:1000].to_parquet(source / "a.parquet")
    home = ["--spec", str(FRAUD_SPEC), "--home", str(demo_home)]
    online = ["--online", redis_server.url]

    assert main(["materialize", *home, *online]) == 0
    assert "redis online store" in capsys.readouterr().out
    argv = ["batch", *home, *online, "--input", str(source), "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    expected = Pipeline(fraud_spec, demo_home).predict(rows).set_index("transaction_id")
    out = scored(tmp_path / "out").set_index("transaction_id")
    assert len(out) == 1000
    np.testing.assert_array_equal(
        out["score"].to_numpy(), expected.loc[out.index, "score"].to_numpy()
    )

    # Redis goes away: the run retries, then fails saying so, and publishes nothing.
    rows.iloc[1000:].to_parquet(source / "b.parquet")
    redis_spec_ = fraud_spec.with_online(redis_server.url)
    impatient = redis_spec_.model_copy(
        update={"batch": redis_spec_.batch.model_copy(update={"store_retries": 1})}
    )
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailableError) as failed:
            run(impatient, source, tmp_path / "out", demo_home)
    finally:
        redis_server.start()  # same port, data back from its append-only file
    message = str(failed.value)
    assert "nothing was published" in message
    assert "stayed unavailable through 2 tries" in message
    assert redis_server.url.removesuffix("/0").split("//")[1] in message
    assert len(scored(tmp_path / "out")) == 1000

    # Back up: the next run scores the file the failed run could not.
    again = run(impatient, source, tmp_path / "out", demo_home)
    assert (again.files, again.rows_out) == (1, 1000)
    out = scored(tmp_path / "out").set_index("transaction_id")
    assert sorted(out.index) == sorted(rows["transaction_id"])
    np.testing.assert_array_equal(
        out["score"].to_numpy(), expected.loc[out.index, "score"].to_numpy()
    )


def test_actors_hand_ray_their_frames_as_arrow_and_anything_else_as_it_is(
    fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame
):
    """What a pool's actor returns: the chain's frame as an Arrow table (scores, errors
    and reasons intact); a frame Arrow cannot hold goes back unchanged."""
    frame = holdout[REQUEST].head(40).reset_index(drop=True)
    frame.loc[[3, 7], "amount"] = -5.0  # rejected by validation
    kwargs: dict[str, Any] = {"spec": fraud_spec, "stages": [s.name for s in fraud_spec.stages],
                              "home": str(demo_home), "validate": True}  # fmt: skip
    actor = ArrowBatchChain(**kwargs)
    out = actor(frame)
    expected = BatchChain(**kwargs)(frame)
    assert isinstance(out, pa.Table)
    assert out.column_names == list(expected.columns)
    # NaN (no score) is null in Arrow, as Ray's own conversion makes it.
    pd.testing.assert_series_equal(out["score"].to_pandas(), expected["score"], check_names=False)
    assert out["_error"].to_pylist() == expected["_error"].tolist()
    assert [i for i, e in enumerate(out["_error"].to_pylist()) if e] == [3, 7]
    assert out["reasons"].to_pylist() == expected["reasons"].tolist()

    class Mixed(BatchChain):
        def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
            return pd.DataFrame({"odd": pd.Series([1, "a"], dtype=object)})

    actor.chain = Mixed(**kwargs)
    assert isinstance(actor(frame), pd.DataFrame)


@pytest.mark.parametrize(
    ("module", "variable"),
    [
        (
            "ray.data._internal.datasource_v2.formats.parquet.parquet_datasource_v2",
            PARQUET_READ_UNIT_ENV,
        ),
        ("ray.data._internal.datasource_v2.common.file_reader", SCANNER_READAHEAD_ENV),
    ],
)
def test_ray_data_still_reads_the_settings_batch_app_gives_it(module: str, variable: str):
    """batch_app.ray_internals sets these because Ray Data has no API for them. When this
    fails, a Ray upgrade moved or dropped the setting: batch reads would quietly go back
    to Ray's defaults (larger read tasks, more memory per read worker)."""
    what = f"batch_app.ray_internals relies on Ray Data reading ${variable} in {module}"
    try:
        source = inspect.getsource(importlib.import_module(module))
    except ModuleNotFoundError:
        pytest.fail(f"{what}, and that module is gone: find what replaced it")
    assert f'"{variable}"' in source, f"{what}, and it no longer does: find what replaced it"


def test_a_parquet_read_leaves_the_environment_as_it_found_it(
    ray_session: None, holdout: pd.DataFrame, tmp_path, monkeypatch: pytest.MonkeyPatch
):
    """A program that sets Ray Data's read unit itself keeps its setting after a run."""
    holdout[REQUEST].head(10).to_parquet(tmp_path / "a.parquet")
    monkeypatch.setenv(PARQUET_READ_UNIT_ENV, "12345678")
    ds = read_parquet([str(tmp_path / "a.parquet")], 1024 * 1024)
    assert os.environ[PARQUET_READ_UNIT_ENV] == "12345678"
    monkeypatch.delenv(PARQUET_READ_UNIT_ENV)
    read_parquet([str(tmp_path / "a.parquet")], 1024 * 1024)
    assert PARQUET_READ_UNIT_ENV not in os.environ
    assert ds.count() == 10
