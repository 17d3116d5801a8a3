"""The prediction log: what is logged is on disk after close, partitioned by day; a slow
or broken sink costs dropped (and counted) rows, never a blocked or failed caller."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from pydantic import ValidationError

from stageline import predlog
from stageline.predlog import PredictionLog, read_log, sampled
from stageline.spec_logging import PredictionLogSpec

DAY1 = datetime(2026, 3, 1, 23, 59, 0, tzinfo=timezone.utc)
DAY2 = datetime(2026, 3, 2, 0, 1, 0, tzinfo=timezone.utc)

MakeLog = Callable[..., PredictionLog]


def scored(start: int, n: int = 3) -> pd.DataFrame:
    """A scored frame as the serving path would log it."""
    ids = range(start, start + n)
    return pd.DataFrame(
        {
            "request_id": [f"r{i}" for i in ids],
            "amount": [float(i) for i in ids],
            "score": [0.5] * n,
            "reasons": [["amount_high", f"code{i}"] for i in ids],
            "model_version": ["3"] * n,
            "latency_ms": [1.5] * n,
        }
    )


@pytest.fixture
def drops() -> list[tuple[int, str]]:
    return []


@pytest.fixture
def make_log(tmp_path: Path, drops: list[tuple[int, str]]) -> Iterator[MakeLog]:
    """A log under a fresh home, closed at the end of the test whatever happened."""
    made: list[PredictionLog] = []

    def make(home: Path = tmp_path, clock: Any = None, **spec: Any) -> PredictionLog:
        extra = {"clock": clock} if clock is not None else {}
        made.append(
            PredictionLog(
                home,
                pipeline="fraud",
                spec=PredictionLogSpec(**spec),
                on_drop=lambda n, reason: drops.append((n, reason)),
                **extra,
            )
        )
        return made[-1]

    yield make
    for plog in made:
        plog.close(timeout_s=5)


def test_logged_frames_are_on_disk_after_close_partitioned_by_day(
    make_log: MakeLog, tmp_path: Path
) -> None:
    times = iter([DAY1, DAY1, DAY2, DAY2])
    plog = make_log(clock=lambda: next(times), flush_interval_s=60)
    for start in range(0, 12, 3):
        plog.log(scored(start))

    assert plog.close()

    root = tmp_path / "logs" / "fraud"
    assert plog.location == str(root)
    assert sorted(p.name for p in root.iterdir()) == ["date=2026-03-01", "date=2026-03-02"]
    back = read_log(root)
    assert back["request_id"].tolist() == [f"r{i}" for i in range(12)]
    assert back["reasons"].tolist() == [["amount_high", f"code{i}"] for i in range(12)]
    assert back["logged_at"].tolist() == [DAY1] * 6 + [DAY2] * 6
    assert (plog.logged_rows, plog.written_rows, plog.dropped_rows) == (12, 12, 0)


def test_rows_spanning_two_days_in_one_frame_go_to_two_files(
    make_log: MakeLog, tmp_path: Path
) -> None:
    plog = make_log()
    frame = scored(0, 2).assign(logged_at=[DAY1, DAY2])
    plog.log(frame)
    assert plog.flush()

    days = sorted((tmp_path / "logs" / "fraud").glob("date=*/part-*.parquet"))
    assert [p.parent.name for p in days] == ["date=2026-03-01", "date=2026-03-02"]
    assert read_log(plog.location)["request_id"].tolist() == ["r0", "r1"]


def test_read_log_since_skips_earlier_days_and_rows(make_log: MakeLog) -> None:
    times = iter([DAY1 - timedelta(days=3), DAY1, DAY2])
    plog = make_log(clock=lambda: next(times))
    for start in (0, 10, 20):
        plog.log(scored(start, 2))
    assert plog.flush()

    later = read_log(plog.location, since=DAY1)
    assert later["request_id"].tolist() == ["r10", "r11", "r20", "r21"]
    # A naive time is UTC.
    assert read_log(plog.location, since=DAY2.replace(tzinfo=None))["request_id"].tolist() == [
        "r20",
        "r21",
    ]
    assert read_log(Path(plog.location) / "never-written").empty


def test_a_slow_sink_never_blocks_log_and_rows_past_the_bound_are_dropped(
    make_log: MakeLog, monkeypatch: pytest.MonkeyPatch, drops: list[tuple[int, str]]
) -> None:
    release = threading.Event()
    real_write = predlog.write_parquet

    def stuck_write(*args: Any) -> None:
        release.wait(10)  # a sink that hangs until the test lets it go
        real_write(*args)

    monkeypatch.setattr(predlog, "write_parquet", stuck_write)
    plog = make_log(max_buffered_rows=12, flush_rows=3, flush_interval_s=0.01)

    started = time.monotonic()
    for start in range(0, 30, 3):
        plog.log(scored(start))
    took = time.monotonic() - started

    assert took < 1, "log() waited for the sink"
    assert not release.is_set()
    # Four frames fit under the bound (the one being written counts): six are dropped.
    assert plog.dropped_by_reason == {"full": 18}
    assert drops == [(3, "full")] * 6
    release.set()
    assert plog.close(timeout_s=5)
    assert plog.written_rows == 12
    assert len(read_log(plog.location)) == 12


def test_an_unwritable_location_drops_and_counts_and_never_raises(
    make_log: MakeLog,
    tmp_path: Path,
    drops: list[tuple[int, str]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("the log cannot go under a regular file")
    plog = make_log(home=not_a_dir, flush_interval_s=0.01)

    with caplog.at_level(logging.WARNING, logger="stageline.predlog"):
        for start in range(0, 9, 3):
            plog.log(scored(start))
            assert not plog.flush(timeout_s=5)
        plog.log(scored(9))
        plog.close(timeout_s=5)

    assert plog.dropped_by_reason == {"write_failed": 12}
    assert sum(n for n, _ in drops) == 12
    assert {reason for _, reason in drops} == {"write_failed"}
    assert plog.written_rows == 0
    # One warning saying what to do, not one per failed write.
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1
    assert "writable" in warnings[0].getMessage()


def test_after_a_failed_write_the_next_flush_writes(
    make_log: MakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = predlog.write_parquet
    failures = iter([OSError("disk full")])

    def flaky_write(*args: Any) -> None:
        for error in failures:
            raise error
        real_write(*args)

    monkeypatch.setattr(predlog, "write_parquet", flaky_write)
    plog = make_log()
    plog.log(scored(0))
    assert not plog.flush()
    plog.log(scored(3))
    assert plog.flush()

    assert read_log(plog.location)["request_id"].tolist() == ["r3", "r4", "r5"]
    assert plog.dropped_by_reason == {"write_failed": 3}


def test_a_frame_parquet_cannot_hold_costs_only_its_own_rows(make_log: MakeLog) -> None:
    plog = make_log(flush_interval_s=60)
    plog.log(scored(0))
    plog.log(scored(3).assign(amount=[1.0, "two", b"3"]))  # mixed types in one column
    plog.log(scored(6))
    assert not plog.flush()

    written = read_log(plog.location)["request_id"].tolist()
    assert written == ["r0", "r1", "r2", "r6", "r7", "r8"]
    assert plog.dropped_by_reason == {"unencodable": 3}


def test_close_writes_everything_buffered_and_later_rows_are_dropped_as_closed(
    make_log: MakeLog, drops: list[tuple[int, str]]
) -> None:
    plog = make_log(flush_rows=10_000, flush_interval_s=3600)  # nothing due on its own
    for start in range(0, 300, 3):
        plog.log(scored(start))

    assert plog.close()
    assert len(read_log(plog.location)) == 300
    plog.log(scored(300))
    assert plog.close()  # idempotent
    assert plog.dropped_by_reason == {"closed": 3}
    assert drops == [(3, "closed")]
    assert (plog.logged_rows, plog.written_rows, plog.pending_rows) == (303, 300, 0)


def test_a_disabled_log_writes_nothing(make_log: MakeLog, tmp_path: Path) -> None:
    plog = make_log(enabled=False)
    plog.log(scored(0))
    assert plog.flush()
    assert plog.close()
    assert not (tmp_path / "logs").exists()
    assert plog.logged_rows == 0


def test_uri_places_the_log_and_a_relative_path_is_taken_from_the_home(
    make_log: MakeLog, tmp_path: Path
) -> None:
    assert make_log(uri="elsewhere").location == str(tmp_path / "elsewhere")
    assert make_log(uri="s3://bucket/logs").location == "s3://bucket/logs"
    plog = make_log(uri=(tmp_path / "abs").as_uri())
    plog.log(scored(0))
    assert plog.flush()
    assert len(read_log(plog.location)) == 3


def test_sampling_keeps_about_the_rate_and_is_the_same_for_an_id_every_time() -> None:
    frame = pd.DataFrame({"request_id": [f"req-{i}" for i in range(20_000)], "x": 1.0})

    kept = sampled(frame, 0.25, seed_column="request_id")
    assert 0.23 < len(kept) / len(frame) < 0.27
    # Another frame holding some of the same ids, in another order, keeps the same ones.
    again = sampled(frame.sample(frac=0.5, random_state=1), 0.25, seed_column="request_id")
    assert set(again["request_id"]) == set(kept["request_id"]) & set(
        frame.sample(frac=0.5, random_state=1)["request_id"]
    )
    # A higher rate keeps a superset.
    wider = sampled(frame, 0.5, seed_column="request_id")
    assert set(kept["request_id"]) <= set(wider["request_id"])
    assert sampled(frame, 1.0, seed_column="request_id") is frame
    assert sampled(frame, 0.0, seed_column="request_id").empty


def test_sampling_names_a_missing_id_column() -> None:
    with pytest.raises(ValueError, match=r"'request_id'.*pass the request id column"):
        sampled(pd.DataFrame({"x": [1]}), 0.5, seed_column="request_id")


def test_the_spec_is_on_by_default() -> None:
    spec = PredictionLogSpec()
    assert spec.enabled
    assert spec.sample == 1.0
    assert spec.uri is None


@pytest.mark.parametrize(
    "bad",
    [
        {"sample": 1.5},
        {"sample": -0.1},
        {"max_buffered_rows": -1},
        {"flush_rows": 0},
        {"flush_interval_s": 0},
        {"close_timeout_s": -1},
        {"flush_rows": 10, "max_buffered_rows": 5},
        {"sink": "s3://x"},
    ],
)
def test_the_spec_refuses_bad_values_and_unknown_keys(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        PredictionLogSpec(**bad)
