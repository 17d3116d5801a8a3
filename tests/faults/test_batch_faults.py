"""Batch runs under faults (issue 7, cases 8 to 10): a map actor killed and a worker node
killed in the middle of a run, rows crafted to break each stage, the driver killed and
the run repeated. Every run completes, and the output holds each input row exactly once:
scored, or quarantined with its reason.

The runs use the demo spec with small batches (``SMALL_BATCH`` rows), so that a run has
many batches, some in flight, whenever the fault strikes. The schema rules one by one
are tested in tests/integration/test_batch.py; here, rows that break later stages too.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from batch_app.manifest import MANIFEST, QUARANTINE, STAGED_DATA, STAGING
from batch_app.run import Summary, run
from stageline import Pipeline
from stageline.demo.batch import transactions
from stageline.predlog import read_log
from stageline.spec import DATETIME_MAX, DATETIME_MIN, load_spec
from tests.conftest import FRAUD_SPEC, SMALL_DEMO
from tests.integration.serve_helpers import wait_for
from tests.multinode import Cluster
from tests.support.processes import descendants, process_name, spawned

pytestmark = pytest.mark.faults

SMALL_BATCH = 4096
"""Rows per batch of the stage actors in these runs (the demo spec has more)."""


def small_batches(directory: Path) -> Path:
    """The demo spec with ``SMALL_BATCH`` rows per batch, written to ``directory``."""
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    for stage in data["stages"]:
        if "batch" in stage:
            stage["batch"] = {**stage["batch"], "batch_size": SMALL_BATCH}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fraud.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def landing(directory: Path, rows: int, files: int, seed: int = 11) -> pd.DataFrame:
    """``rows`` valid transactions of the demo's customers in ``files`` parquet files."""
    frame = transactions(
        rows, customers=SMALL_DEMO["customers"], days=SMALL_DEMO["days"], bad_share=0.0, seed=seed
    )
    directory.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(rows), files)):
        frame.iloc[part].to_parquet(directory / f"part-{i}.parquet")
    return frame


def published(output: Path, folder: str = "") -> pd.DataFrame:
    """Every published row under ``output`` (``folder``: ``_quarantine`` for those)."""
    parts = sorted((output / folder).glob("run=*/*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def published_ids(output: Path) -> list[str]:
    parts = sorted(output.glob("run=*/*.parquet"))
    return [
        i for p in parts for i in pd.read_parquet(p, columns=["transaction_id"])["transaction_id"]
    ]


def staged(output: Path) -> bool:
    """Whether a run in progress has written its first scored batch."""
    return bool(list((output / STAGING).glob(f"*/{STAGED_DATA}/*.parquet")))


def wait_until_staged(
    process: subprocess.Popen[bytes], output: Path, log: Path, timeout_s: float = 180
) -> None:
    """Until the batch run ``process`` drives has staged its first scored batch into
    ``output``; fails with the run's log if it ends or takes longer first."""
    deadline = time.monotonic() + timeout_s
    while not staged(output):
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


def exactly_once(output: Path, frame: pd.DataFrame) -> tuple[int, int]:
    """(rows lost, rows duplicated) of the published output against the input ids."""
    got, want = Counter(published_ids(output)), Counter(frame["transaction_id"])
    return sum((want - got).values()), sum((got - want).values())


# --------------------------------------------------------------------------- case 8


def test_a_worker_node_killed_mid_run_loses_and_duplicates_nothing(
    multinode: Cluster, tmp_path: Path
) -> None:
    """A batch job through the Jobs API on two nodes, its stage actors on the worker (the
    head's CPUs are held, as on a cluster whose head takes no work). The worker node dies
    (every process on it, SIGKILL) while its stage actors are running and output is being
    staged; the head's CPUs are freed (as a replacement node would bring). The job
    completes on what is left, with every row exactly once."""
    worker = multinode.ensure_worker()
    worker_id = next(iter(multinode.alive_nodes() - {multinode.head_node()}))
    source, output = tmp_path / "in", tmp_path / "out"
    frame = landing(source, 240_000, files=8)
    seen: list[tuple[float, bool, list[str]]] = []  # (when, staged, nodes of stage actors)

    def on_worker() -> list[dict[str, Any]]:
        actors = multinode.actors("MapWorker")
        seen.append((time.monotonic() - started, staged(output), [a["node_id"] for a in actors]))
        if multinode.job_status(job) not in ("PENDING", "RUNNING"):
            raise AssertionError(f"the job ended first: {seen[-10:]}")
        return [a for a in actors if a["node_id"] == worker_id]

    with multinode.head_busy() as held:
        started = time.monotonic()
        job = multinode.submit_batch(source, output, small_batches(tmp_path / "spec"))
        wait_for(lambda: on_worker() and staged(output), 240, "mid-run on the worker", 0.2)
        victims = on_worker()
        multinode.ray.kill(worker)
        killed_after = time.monotonic() - started
    assert multinode.job_status(job) == "RUNNING", "the kill came after the job ended"

    status, logs = multinode.wait_job(job)
    assert status == "SUCCEEDED", logs
    assert "240000 rows in from 8 file(s) -> 240000 scored, 0 quarantined" in logs, logs
    lost, duplicated = exactly_once(output, frame)
    print(
        f"worker node killed {killed_after:.1f} s into a 240000-row job, with "
        f"{len(victims)} stage actor(s) on it ({held:g} head CPUs held until then): job "
        f"{status}, {lost} rows lost, {duplicated} duplicated, in "
        f"{time.monotonic() - started:.1f} s"
    )
    assert (lost, duplicated) == (0, 0)


def test_a_map_actor_killed_mid_run_loses_and_duplicates_nothing(
    ray_session: None, demo_home: Path, tmp_path: Path
) -> None:
    """One of the run's stage actors dies (SIGKILL to its process, as an OOM kill or a
    crash does) while batches are in flight: Ray restarts it and retries its batches;
    the run completes with every row exactly once."""
    source, output = tmp_path / "in", tmp_path / "out"
    frame = landing(source, 400_000, files=4)
    spec = load_spec(small_batches(tmp_path / "spec"))
    outcome: dict[str, Any] = {}

    def batch_run() -> None:
        try:
            outcome["summary"] = run(spec, source, output, demo_home)
        except BaseException as e:  # reported below, in the test's thread
            outcome["error"] = e
        outcome["finished"] = time.monotonic()

    def map_actors() -> list[int]:
        """Processes of this session's Ray running a Ray Data stage actor."""
        return [p for p in descendants(os.getpid()) if process_name(p) == "ray::MapWorker"]

    started = time.monotonic()
    driver = threading.Thread(target=batch_run, daemon=True)
    driver.start()
    wait_for(lambda: staged(output) and map_actors(), 180, "the run to be mid-way", interval=0.05)
    actors = map_actors()
    victim = actors[0]
    os.kill(victim, signal.SIGKILL)  # an actor process of this session's own Ray
    killed_at = time.monotonic()
    driver.join(timeout=300)
    assert not driver.is_alive(), "the run did not finish within 300 s of the kill"
    assert "error" not in outcome, outcome.get("error")
    assert outcome["finished"] > killed_at, "the kill came after the run ended"

    summary: Summary = outcome["summary"]
    lost, duplicated = exactly_once(output, frame)
    print(
        f"1 of {len(actors)} stage actors killed {killed_at - started:.1f} s into a "
        f"400000-row run: {summary.rows_out} scored, {lost} lost, {duplicated} duplicated, "
        f"run took {summary.seconds:.1f} s"
    )
    assert (summary.rows_in, summary.rows_out, summary.rows_quarantined) == (400_000, 400_000, 0)
    assert (lost, duplicated) == (0, 0)


# --------------------------------------------------------------------------- case 9

POISONED_CUSTOMERS = {
    # customer: its avg_amount_30d in the online store, as a broken upstream job left it
    "transform-div-zero": -1.0,  # amount / (avg + 1): a division by zero
    "model-inf": float("inf"),  # amount_to_avg is 0, but the model's own input is inf
    "model-float32": 1e308,  # finite in float64, inf as the model's float32
}

POISON_ROWS: list[tuple[dict[str, Any], str | None]] = [
    # (what the row changes, "stage: reason" it is quarantined with; None: it is scored)
    ({"amount": -0.01}, "validate: amount: must be >= 0"),
    ({"amount": 1_000_000.01}, "validate: amount: must be <= 1000000"),
    ({"merchant_category": "casino"}, "validate: merchant_category: must be one of"),
    ({"customer_id": None}, "validate: customer_id: required field is missing"),
    ({"customer_id": "c" * 65}, "validate: customer_id: must be a string of at most 64"),
    ({"country": "USA"}, "validate: country: must be a string of at most 2 characters"),
    ({"ts": pd.Timestamp("1500-01-01", tz="UTC")}, "validate: ts: must be an ISO 8601"),
    ({"ts": pd.Timestamp("9999-12-31", tz="UTC")}, "validate: ts: must be an ISO 8601"),
    ({"ts": pd.Timestamp(DATETIME_MIN) - pd.Timedelta(1, "us")}, "validate: ts: must be"),
    ({"ts": pd.Timestamp(DATETIME_MIN)}, None),  # the very first instant accepted
    ({"ts": pd.Timestamp(DATETIME_MAX) - pd.Timedelta(1, "us")}, None),  # and the last
    ({"amount": 0.0}, None),
    ({"amount": 1_000_000.0}, None),
    ({"amount": 5e-324}, None),  # the smallest float there is
    ({"country": "ZZ"}, None),  # a country the model never saw: is_foreign, not an error
    # customers the feature store does not know: scored with the view's defaults
    ({"customer_id": "nobody-we-know"}, None),
    ({"customer_id": ""}, None),
    ({"customer_id": "客户-\u202e-\U0001f600"}, None),
    ({"customer_id": "a\x00b\r\n*?[]"}, None),
    # the feature store serves values that break the stages after it
    (
        {"customer_id": "transform-div-zero", "amount": 10.0},
        "transform: amount_to_avg is not a finite number",
    ),
    (
        {"customer_id": "transform-div-zero", "amount": 0.0},  # 0 / 0
        "transform: amount_to_avg is not a finite number",
    ),
    ({"customer_id": "model-inf"}, "model: avg_amount_30d: not a finite number"),
    ({"customer_id": "model-float32"}, "model: avg_amount_30d: not a finite number"),
]


def poison_the_store(home: Path) -> None:
    """Add ``POISONED_CUSTOMERS`` to the home's online store snapshot."""
    path = home / "online" / "customer_stats.parquet"
    table = pd.read_parquet(path)
    extra = pd.concat([table.iloc[[0]]] * len(POISONED_CUSTOMERS), ignore_index=True)
    extra["customer_id"] = list(POISONED_CUSTOMERS)
    extra["avg_amount_30d"] = list(POISONED_CUSTOMERS.values())
    pd.concat([table, extra], ignore_index=True).to_parquet(path)


def test_poison_rows_are_quarantined_with_reasons_and_the_run_completes(
    ray_session: None, demo_home: Path, tmp_path: Path
) -> None:
    """Rows that break each stage, not only the schema: values the transform turns into
    inf, features the model cannot take, unknown customers, timestamps at and past the
    edges. Each is quarantined with its stage and reason, or scored; none fails the run."""
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    poison_the_store(home)
    good = transactions(
        5000, customers=SMALL_DEMO["customers"], days=SMALL_DEMO["days"], bad_share=0.0
    )
    poison = pd.concat([good.iloc[[0]]] * len(POISON_ROWS), ignore_index=True).astype(object)
    for i, (change, _why) in enumerate(POISON_ROWS):
        for column, value in change.items():
            poison.at[i, column] = value
    poison["transaction_id"] = [f"poison-{i:02d}" for i in range(len(POISON_ROWS))]
    poison["amount"] = poison["amount"].astype("float64")
    poison["ts"] = poison["ts"].map(lambda t: t.as_unit("us")).astype("datetime64[us, UTC]")
    frame = pd.concat([good.iloc[:2500], poison, good.iloc[2500:]], ignore_index=True)
    source, output = tmp_path / "in", tmp_path / "out"
    source.mkdir()
    frame.iloc[:2600].to_parquet(source / "a.parquet")
    frame.iloc[2600:].to_parquet(source / "b.parquet")
    spec = load_spec(small_batches(tmp_path / "spec"))

    summary = run(spec, source, output, home)

    q = published(output, QUARANTINE).set_index("transaction_id")
    expected = {f"poison-{i:02d}": why for i, (_c, why) in enumerate(POISON_ROWS) if why}
    got = {str(i): f"{r.stage}: {r.reason}" for i, r in q.iterrows()}
    stages = Counter(why.split(":")[0] for why in expected.values())
    print(
        f"{len(frame)} rows with {len(POISON_ROWS)} crafted ones: {summary.rows_out} scored, "
        f"{summary.rows_quarantined} quarantined by stage {dict(stages)}, run completed"
    )
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    wrong = {i: (got[i], why) for i, why in expected.items() if not got[i].startswith(why)}
    assert wrong == {}
    assert q["record"].map(lambda r: isinstance(json.loads(r), dict)).all()
    assert summary.rows_in == len(frame) == summary.rows_out + summary.rows_quarantined
    scored = published(output)
    assert Counter(scored["transaction_id"]) + Counter(q.index) == Counter(frame["transaction_id"])
    assert scored["score"].between(0, 1).all()
    # The same verdicts as the pipeline in process: one code path.
    inline = Pipeline(spec, home).predict(poison).set_index("transaction_id")["error"]
    assert {i: e for i, e in inline.items() if e is not None} == got


# --------------------------------------------------------------------------- case 10


@pytest.mark.parametrize("own_ray", [False, True], ids=["on-the-cluster", "with-its-own-ray"])
def test_driver_killed_midway_then_rerun_leaves_complete_output_without_duplicates(
    ray_session: None, demo_copy: Path, tmp_path: Path, own_ray: bool
) -> None:
    """The nightly run is killed (SIGKILL, no cleanup) once it has staged its first batch,
    then run again: the output is complete and holds every row once. On a cluster
    (``$RAY_ADDRESS``) the driver process dies alone; with a Ray of its own
    (``python -m batch_app`` and no address), every process of the run dies at once,
    its Ray's included, as when the machine's OOM killer or a job scheduler ends it."""
    import ray

    source, output = tmp_path / "in", tmp_path / "out"
    frame = landing(source, 300_000, files=6)
    spec = small_batches(tmp_path / "spec")
    home = demo_copy  # a run of its own records itself, and logs, under the home
    (source / "part-5.parquet").rename(tmp_path / "later.parquet")  # arrives after run 1

    first = run(load_spec(spec), [str(source / "part-0.parquet")], output, home)
    assert first.rows_out == 50_000
    (tmp_path / "later.parquet").rename(source / "part-5.parquet")

    # The nightly run over the landing folder, as a process of its own.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STAGELINE_RUN")}
    env["PYTHONUNBUFFERED"] = "1"
    if not own_ray:
        env |= {"RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}
    argv = [sys.executable, "-m", "batch_app", "--spec", str(spec)]
    argv += ["--home", str(home), "--input", str(source), "--output", str(output)]
    log = tmp_path / "driver.log"
    started = time.monotonic()
    with spawned(argv, log, env) as driver:
        # The first scored batch is staged; Ray Data's backpressure keeps the rest
        # of the 250,000 rows from running far ahead of the writer.
        wait_until_staged(driver, output, log, timeout_s=300 if own_ray else 180)
        if own_ray:
            kill_run_outright(driver, home)
        else:
            driver.send_signal(signal.SIGKILL)
        driver.wait()
    killed_after = time.monotonic() - started
    assert driver.returncode == -signal.SIGKILL

    manifest = json.loads((output / MANIFEST).read_text())
    assert [r["run_id"] for r in manifest["runs"]] == [first.run_id], "the kill came too late"
    assert any((output / STAGING).iterdir()), "the killed run left its staging behind"
    assert published_ids(output) == list(frame["transaction_id"].iloc[:50_000])

    again = run(load_spec(spec), source, output, home)

    lost, duplicated = exactly_once(output, frame)
    print(
        f"driver killed {killed_after:.1f} s into a 250000-row run (after run 1 of 50000): "
        f"rerun scored {again.rows_out} from {again.files} files; {lost} rows lost, "
        f"{duplicated} duplicated, staging left {len(list((output / STAGING).iterdir()))}"
    )
    assert (again.files, again.rows_in) == (5, 250_000)
    assert (lost, duplicated) == (0, 0)
    assert not any((output / STAGING).iterdir())
    # The prediction log: each scored row of the two committed runs once, nothing of the
    # killed one (its rows were staged with its output, and went with it).
    logged = read_log(home / "logs" / "fraud")
    batch = logged[logged["request_id"].isin([first.run_id, again.run_id])]
    assert len(batch) == first.rows_out + again.rows_out
    assert batch["transaction_id"].is_unique
    ran = {r["run_id"] for r in json.loads((output / MANIFEST).read_text())["runs"]}
    assert ran == {first.run_id, again.run_id}
    published = {
        p.name.removeprefix("batch-").split("-part-")[0]
        for p in (home / "logs" / "fraud").glob("date=*/batch-*.parquet")
    }
    assert published == ran


def kill_run_outright(supervisor: subprocess.Popen[bytes], home: Path) -> None:
    """SIGKILL every process of the supervised batch run ``supervisor`` leads: the child
    that drives the run and the Ray it started (found by their run marker) first, so
    that none of them gets to stop cleanly, then the supervisor's process group."""
    from stageline.supervisor import end_run, records, run_processes

    [(_, record)] = records(home / "run", "batch")
    assert run_processes(record.run_id), "the run has no processes to kill"
    end_run(record.run_id)  # no grace: SIGKILL
    os.killpg(supervisor.pid, signal.SIGKILL)
    end_run(record.run_id)  # anything Ray started in between
    assert run_processes(record.run_id) == []


def test_batch_stopped_by_sigterm_to_its_group_publishes_nothing_and_the_next_run_continues(
    ray_session: None, demo_home: Path, tmp_path: Path
) -> None:
    """``stageline batch`` with a Ray of its own, stopped as a scheduler stops a job (SIGTERM
    to its process group) once it has staged its first batch: it stops within the stop
    budget, says so, publishes nothing, leaves no process behind, and the next run
    scores every row exactly once."""
    from stageline.supervisor import records, run_processes
    from stageline_cli.processes import STOP_TIMEOUT_S

    source, output = tmp_path / "in", tmp_path / "out"
    frame = landing(source, 200_000, files=4)
    spec = small_batches(tmp_path / "spec")
    home = tmp_path / "home"
    shutil.copytree(demo_home, home)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "STAGELINE_RUN")}
    argv = [sys.executable, "-m", "stageline_cli", "batch", "--spec", str(spec)]
    argv += ["--home", str(home), "--input", str(source), "--output", str(output)]
    log = tmp_path / "batch.log"
    with spawned(argv, log, {**env, "PYTHONUNBUFFERED": "1"}) as batch:
        wait_until_staged(batch, output, log)
        [(_, record)] = records(home / "run", "batch")
        signalled = time.monotonic()
        os.killpg(batch.pid, signal.SIGTERM)
        batch.wait(timeout=STOP_TIMEOUT_S + 20)
    took = time.monotonic() - signalled
    assert batch.returncode == 1, log.read_text()[-3000:]
    assert took < STOP_TIMEOUT_S + 1, took
    assert "stopped: nothing of this run was published" in log.read_text()
    assert run_processes(record.run_id) == []
    assert records(home / "run", "batch") == []
    manifest = output / MANIFEST
    assert not manifest.exists() or json.loads(manifest.read_text())["runs"] == []
    assert published_ids(output) == []

    again = run(load_spec(spec), source, output, home)
    assert (again.files, again.rows_in) == (4, 200_000)
    assert exactly_once(output, frame) == (0, 0)
