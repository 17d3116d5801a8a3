"""The prediction log: every scored frame appended to a date-partitioned parquet dataset.

``PredictionLog.log`` only queues the frame (a reference and a timestamp) and returns;
a daemon thread writes what is queued in batches, one file per day per flush, under
``<location>/date=YYYY-MM-DD/``. A slow or failing sink never blocks or fails the
caller: rows past the memory bound, rows of a failed write and rows logged after
``close`` are dropped and counted, by reason. ``on_drop`` is where the serving layer
bumps its metric; this module has no metrics dependency.

``read_log`` reads the dataset back, for monitoring and evaluation.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from stageline.spec_logging import PredictionLogSpec
from stageline.stage import ERROR_COLUMN

log = logging.getLogger(__name__)

TIME_COLUMN = "logged_at"
"""When a row was logged (UTC); ``log`` adds it to frames that lack it. Rows are
partitioned by its date."""
REQUEST_ID = "_request_id"
"""The column that carries each row's request id through the stages (the service adds
it); the log names it ``request_id``."""
RECEIVED_AT = "_received_at"
"""The column that carries when each row reached the service (epoch seconds); the log
keeps ``latency_ms`` from it to the row's scores."""
PARTITION = "date"
"""The hive partition key of the dataset's folders: ``date=YYYY-MM-DD``."""

# Why rows were dropped: the ``reason`` given to ``on_drop`` and the keys of
# ``PredictionLog.dropped_by_reason``.
FULL = "full"
"""The buffer held ``max_buffered_rows`` already: the sink is slower than the traffic."""
WRITE_FAILED = "write_failed"
"""Writing their file failed (unwritable location, disk full, object store error)."""
UNENCODABLE = "unencodable"
"""Parquet cannot hold one of the frame's columns (for example mixed types)."""
CLOSED = "closed"
"""Logged after ``close``."""

# One warning per reason at most this often; the next one says how many were dropped.
_WARN_EVERY_S = 10.0

_ADVICE = {
    FULL: "the sink is slower than the predictions: raise logging.max_buffered_rows, "
    "lower logging.sample, or log to a faster location",
    WRITE_FAILED: "check that the location exists, is writable and has space",
    UNENCODABLE: "give that column one type (lists of one type are fine)",
    CLOSED: "log() was called after close(); close the log last",
}

Clock = Callable[[], datetime]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def log_location(home: str | Path, pipeline: str, spec: PredictionLogSpec) -> str:
    """Where a pipeline's prediction log goes: ``spec.uri``, else ``<home>/logs/<pipeline>``.
    A relative local path is taken from the home."""
    if spec.uri is None:
        return str(Path(home).resolve() / "logs" / pipeline)
    if "://" in spec.uri:
        return spec.uri
    return str((Path(home) / spec.uri).resolve())


def sampled(frame: pd.DataFrame, rate: float, *, seed_column: str) -> pd.DataFrame:
    """The rows of ``frame`` to log at sampling ``rate`` (0..1).

    A row is kept when a hash of its ``seed_column`` value (the request id) falls in the
    first ``rate`` of the hash range: the same id is kept or not in every process and
    every run, so a request is logged whole or not at all, and about ``rate`` of the
    ids are kept.
    """
    if not 0 <= rate <= 1:
        raise ValueError(f"the sampling rate must be between 0 and 1, not {rate}")
    if rate == 1:
        return frame
    if seed_column not in frame.columns:
        raise ValueError(
            f"cannot sample the prediction log by {seed_column!r}: the frame has no such "
            f"column (it has {list(frame.columns)}); pass the request id column"
        )
    if rate == 0:
        return frame.iloc[:0]
    # As strings, so that the id 7 and the id "7" are the same request on every path.
    hashes = pd.util.hash_pandas_object(frame[seed_column].astype(str), index=False)
    return frame[hashes.to_numpy() < np.uint64(rate * 2.0**64)]


def scored_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Finished frames (stamped ``logged_at``) as the log keeps them: every column the
    stages gave (the request's fields, the features the model received, the model and
    its outputs), ``request_id``, ``error``, and ``latency_ms`` from the rows' arrival to
    their scores. The writer thread applies it to each batch (``prepare``): the request
    path only queues its frame."""
    renames = {REQUEST_ID: "request_id", ERROR_COLUMN: "error"}
    frame = frame.rename(columns={k: v for k, v in renames.items() if k in frame.columns})
    if RECEIVED_AT in frame.columns:
        logged = frame[TIME_COLUMN].to_numpy(dtype="datetime64[us]").astype("int64") / 1e3
        latency = logged - frame[RECEIVED_AT].to_numpy(dtype="float64") * 1e3
        frame = frame.drop(columns=[RECEIVED_AT]).assign(latency_ms=latency)
    return frame


@dataclass(frozen=True)
class _Queued:
    frame: pd.DataFrame
    at: datetime  # when it was logged, UTC
    queued: float  # time.monotonic() then: the flush interval counts from it


class PredictionLog:
    """A writer of scored frames to the prediction log, off the caller's thread.

    Once a ``flush`` or ``close`` returns, ``logged_rows == written_rows + dropped_rows
    + pending_rows``.
    ``close()`` (or interpreter exit, through ``atexit``) writes what is buffered.
    """

    def __init__(
        self,
        home: str | Path,
        *,
        pipeline: str,
        spec: PredictionLogSpec,
        on_drop: Callable[[int, str], None] | None = None,
        clock: Clock = _now,
        prepare: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    ) -> None:
        """``prepare``: applied on the writer thread to each batch of logged frames (one
        frame, ``logged_at`` added) before it is written (:func:`scored_rows`)."""
        self.spec = spec
        self._prepare = prepare
        self.location = log_location(home, pipeline, spec)
        """The dataset's root: a local path or a URI (what ``read_log`` takes)."""
        self._on_drop = on_drop
        self._clock = clock
        # Resolved on the writer thread: reaching an object store may be slow, or fail.
        self._fs: Any = None
        self._root = ""

        self._cond = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._queued_rows = 0  # in the queue
        self._pending_rows = 0  # in the queue or being written: what the bound bounds
        self._accepted = 0  # rows ever queued
        self._taken = 0  # of those, rows the writer took
        self._handled = 0  # of those, rows written or dropped
        self._flush_upto = 0  # write at once every row up to this count
        self._closed = False
        self._close_failures: int | None = None

        self._logged = 0
        self._written = 0
        self._dropped: dict[str, int] = {}
        self._failed = 0  # rows accepted, then dropped by the writer
        self._last_warned: dict[str, float] = {}
        self._unwarned: dict[str, int] = {}

        self._thread: threading.Thread | None = None
        if spec.enabled:
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    # -- the caller's side -----------------------------------------------------------

    def log(self, frame: pd.DataFrame) -> None:
        """Queue the rows of one scored frame; returns at once and never raises for the
        sink. The frame is written as it is (any columns; list columns too), with a
        ``logged_at`` column added if it has none. Do not change it afterwards."""
        n = len(frame)
        if not self.spec.enabled or n == 0:
            return
        at = self._clock()
        at = at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc)
        reason = None
        with self._cond:
            self._logged += n
            if self._closed:
                reason = CLOSED
            elif self._pending_rows + n > self.spec.max_buffered_rows:
                reason = FULL
            else:
                # A shallow copy is O(columns); copy-on-write keeps it as it is now.
                self._queue.append(_Queued(frame.copy(deep=False), at, time.monotonic()))
                self._queued_rows += n
                self._pending_rows += n
                self._accepted += n
                # Wake the writer only when it has something new to time or to write.
                if len(self._queue) == 1 or self._queued_rows >= self.spec.flush_rows:
                    self._cond.notify_all()
        if reason is not None:
            self._drop(n, reason)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Write every row queued so far now. True if all of them were written within
        ``timeout_s`` (default ``close_timeout_s``); False on a timeout or a failed write."""
        timeout = self.spec.close_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            target, failed = self._accepted, self._failed
            self._flush_upto = max(self._flush_upto, target)
            self._cond.notify_all()
            done = self._cond.wait_for(
                lambda: self._handled >= target or not self._writer_alive(), timeout
            )
            return done and self._handled >= target and self._failed == failed

    def close(self, timeout_s: float | None = None) -> bool:
        """Write what is buffered and stop the writer; waits at most ``timeout_s``
        (default ``close_timeout_s``). True if everything buffered was written.
        Idempotent; rows logged afterwards are dropped as ``closed``."""
        timeout = self.spec.close_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            if self._close_failures is None:
                self._close_failures = self._failed
            self._closed = True
            self._cond.notify_all()
        atexit.unregister(self.close)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        with self._cond:
            ok = not self._thread.is_alive() and self._failed == self._close_failures
            left = self._pending_rows
        if left:
            log.warning(
                "prediction log: %d rows were not written to %s within %.1f s of close; "
                "they are lost if the process exits now (raise logging.close_timeout_s)",
                left,
                self.location,
                timeout,
            )
        return ok

    # -- counters ----------------------------------------------------------------------

    @property
    def logged_rows(self) -> int:
        """Rows passed to ``log`` (written, dropped or pending)."""
        with self._cond:
            return self._logged

    @property
    def written_rows(self) -> int:
        """Rows in files of the dataset."""
        with self._cond:
            return self._written

    @property
    def pending_rows(self) -> int:
        """Rows in memory: queued or being written."""
        with self._cond:
            return self._pending_rows

    @property
    def dropped_rows(self) -> int:
        """Rows never written, for any reason."""
        with self._cond:
            return sum(self._dropped.values())

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        """Dropped rows by reason (``full``, ``write_failed``, ``unencodable``, ``closed``)."""
        with self._cond:
            return dict(self._dropped)

    # -- dropping ----------------------------------------------------------------------

    def _drop(self, n: int, reason: str, error: BaseException | None = None) -> None:
        now = time.monotonic()
        with self._cond:
            self._dropped[reason] = self._dropped.get(reason, 0) + n
            self._unwarned[reason] = self._unwarned.get(reason, 0) + n
            last = self._last_warned.get(reason)
            warn = last is None or now - last >= _WARN_EVERY_S
            if warn:
                count, total = self._unwarned.pop(reason), self._dropped[reason]
                self._last_warned[reason] = now
        if warn:
            cause = f": {type(error).__name__}: {error}" if error is not None else ""
            log.warning(
                "prediction log: dropped %d rows (%s)%s; %d dropped so far for this reason. %s",
                count,
                reason,
                cause,
                total,
                _ADVICE[reason],
            )
        if self._on_drop is not None:
            try:
                self._on_drop(n, reason)
            except Exception:
                log.exception("prediction log: the on_drop callback failed")

    # -- the writer thread -------------------------------------------------------------

    def _writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _due(self) -> bool:
        if not self._queue:
            return False
        return (
            self._closed
            or self._queued_rows >= self.spec.flush_rows
            or self._flush_upto > self._taken
            or time.monotonic() - self._queue[0].queued >= self.spec.flush_interval_s
        )

    def _wait_s(self) -> float | None:
        if not self._queue:
            return None
        return max(0.0, self._queue[0].queued + self.spec.flush_interval_s - time.monotonic())

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._due() and not (self._closed and not self._queue):
                    self._cond.wait(self._wait_s())
                if not self._queue:
                    return  # closed, and everything written
                batch = list(self._queue)
                rows = self._queued_rows
                self._queue.clear()
                self._queued_rows = 0
                self._taken += rows
            accounted = 0
            try:
                accounted = self._write_batch(batch)
            except Exception as error:  # never let the writer die: the next flush tries again
                log.exception("prediction log: writing a batch failed unexpectedly")
                self._drop(rows - accounted, WRITE_FAILED, error)
                with self._cond:
                    self._failed += rows - accounted
            finally:
                with self._cond:
                    self._pending_rows -= rows
                    self._handled += rows
                    self._cond.notify_all()

    def _write_batch(self, batch: list[_Queued]) -> int:
        """Write the batch, one file per day; returns the rows written or dropped."""
        try:
            parts = _by_day(self._batch_frame(batch))
        except Exception:
            if len(batch) == 1:
                error = _encode_error(self, batch[0])
                self._count_failed(len(batch[0].frame), UNENCODABLE, error)
                return len(batch[0].frame)
            # One frame parquet cannot hold must not cost the others: write each alone.
            return sum(self._write_batch([item]) for item in batch)
        accounted = 0
        for day, table in parts:
            try:
                self._write_file(day, table)
            except Exception as error:
                self._count_failed(table.num_rows, WRITE_FAILED, error)
            else:
                with self._cond:
                    self._written += table.num_rows
            accounted += table.num_rows
        return accounted

    def _batch_frame(self, batch: list[_Queued]) -> pd.DataFrame:
        """The batch's frames as one, each row stamped with when it was logged (unless its
        frame has its own ``logged_at``), then ``prepare`` d. One concat, one column: per
        frame, a copy would cost more than the rest of the write."""
        frames = [item.frame for item in batch]
        frame = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
        stamps = pd.DatetimeIndex(
            np.repeat(
                np.array([item.at.replace(tzinfo=None) for item in batch], dtype="datetime64[us]"),
                [len(f) for f in frames],
            ),
            tz="UTC",
        )
        if TIME_COLUMN in frame.columns:
            given = pd.to_datetime(frame[TIME_COLUMN], utc=True)
            times = given.where(given.notna(), pd.Series(stamps, index=frame.index))
        else:
            times = pd.Series(stamps, index=frame.index)
        frame = frame.assign(**{TIME_COLUMN: times})
        return self._prepare(frame) if self._prepare is not None else frame

    def _count_failed(self, n: int, reason: str, error: BaseException | None) -> None:
        with self._cond:
            self._failed += n
        self._drop(n, reason, error)

    def _write_file(self, day: str, table: pa.Table) -> None:
        if self._fs is None:
            self._fs, self._root = log_filesystem(self.location)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = f"{self._root}/{PARTITION}={day}/part-{stamp}-{uuid.uuid4().hex}.parquet"
        write_parquet(self._fs, path, table)


def write_parquet(fs: Any, path: str, table: pa.Table) -> None:
    """Write one parquet file so that a reader sees all of it or nothing."""
    if not isinstance(fs, pafs.LocalFileSystem):
        # An object store publishes a whole PUT or nothing; its "move" is a copy.
        pq.write_table(table, path, filesystem=fs)
        return
    parent, name = path.rsplit("/", 1)
    fs.create_dir(parent, recursive=True)
    # Hidden (a leading dot): dataset readers skip it while it is being written.
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp"
    try:
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # it may never have been created
            fs.delete_file(tmp)
        raise


def log_filesystem(location: str) -> tuple[Any, str]:
    """The filesystem and root folder of a log location (a local path or a URI)."""
    if "://" in location:
        fs, root = pafs.FileSystem.from_uri(location)
        return fs, root.rstrip("/")
    return pafs.LocalFileSystem(), Path(location).resolve().as_posix()


def _by_day(frame: pd.DataFrame) -> list[tuple[str, pa.Table]]:
    days = frame[TIME_COLUMN].dt.strftime("%Y-%m-%d")
    return [
        (day, pa.Table.from_pandas(frame[(days == day).to_numpy()], preserve_index=False))
        for day in sorted(days.unique())
    ]


def _encode_error(log: PredictionLog, item: _Queued) -> BaseException | None:
    try:
        _by_day(log._batch_frame([item]))
    except Exception as error:
        return error
    return None


def read_log(location: str | Path, since: datetime | None = None) -> pd.DataFrame:
    """The prediction log at ``location`` (``PredictionLog.location``) as one frame.

    With ``since``, only the days from ``since``'s (UTC) date are read, then only rows
    logged at or after it are kept. Rows come in the order their files were written;
    list columns come back as Python lists. A log never written to reads as empty.
    """
    fs, root = log_filesystem(str(location))
    since_utc = None
    if since is not None:
        since_utc = (
            since.replace(tzinfo=timezone.utc)
            if since.tzinfo is None
            else since.astimezone(timezone.utc)
        )
    first_day = since_utc.date().isoformat() if since_utc is not None else ""
    days = [
        info.path
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        if info.type == pafs.FileType.Directory
        and info.base_name.startswith(f"{PARTITION}=")
        and info.base_name.split("=", 1)[1] >= first_day
    ]
    files = sorted(
        info.path
        for day in days
        for info in fs.get_file_info(pafs.FileSelector(day))
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and not info.base_name.startswith((".", "_"))
    )
    if not files:
        return pd.DataFrame({TIME_COLUMN: pd.Series(dtype="datetime64[us, UTC]")})
    tables = [pq.read_table(path, filesystem=fs, partitioning=None) for path in files]
    table = pa.concat_tables(tables, promote_options="permissive")
    frame: pd.DataFrame = table.to_pandas()
    for field in table.schema:
        if pa.types.is_list(field.type) or pa.types.is_large_list(field.type):
            frame[field.name] = pd.Series(
                table.column(field.name).to_pylist(), index=frame.index, dtype=object
            )
    if since_utc is not None:
        frame = frame[frame[TIME_COLUMN] >= pd.Timestamp(since_utc)].reset_index(drop=True)
    return frame
