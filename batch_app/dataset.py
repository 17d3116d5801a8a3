"""Build the Ray Data pipeline of a spec: read, validate, one ``map_batches`` per segment.

The very stage classes the in-process :class:`~stageline.pipeline.Pipeline` and
Ray Serve run: each segment of ``spec.batch_segments()`` (by default the whole
chain) becomes a :class:`~stageline.pipeline.StageChain` actor pool, validation
riding with the first, so no stage code is written twice.

Memory stays flat however large the input: reads produce blocks of about
``batch.block_mb``, the pools take ``batch_size`` rows at a time, and Ray Data's
streaming executor holds back reads while the pools are busy.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import ray
import ray.data

from batch_app.ray_internals import READ_ENV, read_parquet, workers_have_read_env
from stageline.features import StoreUnavailableError
from stageline.pipeline import StageChain
from stageline.spec import PipelineSpec
from stageline.stage import ERROR_COLUMN
from stageline.stages.validate import RAW_COLUMN

log = logging.getLogger(__name__)
T = TypeVar("T")

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

CSV_SUFFIXES = (".csv", ".csv.gz")


def build_dataset(
    spec: PipelineSpec,
    source: Source,
    home: str | os.PathLike[str] | None = None,
    columns: Sequence[str] | None = None,
    *,
    as_of: bool = False,
) -> ray.data.Dataset:
    """A lazy dataset of every stage's columns for every input row (``_error`` marks bad rows).

    ``source``: a parquet or CSV file, a directory, a glob, or a list of files;
    URIs such as ``s3://bucket/prefix`` are passed to Ray unchanged. ``columns``: keep
    only these (those present) of the last stage's output: what is not kept is never
    converted, stored or sent to the caller. ``as_of``: every actor's stages take
    features as of each row's event time (see :class:`~stageline.pipeline.Pipeline`).
    """
    paths = _paths(source)
    if not paths:
        raise ValueError("no input files to read")
    home_arg = str(Path(home).resolve()) if home is not None else None
    segments = spec.batch_segments()
    # Reads are cheap next to scoring: as many read tasks at a time as the first pool
    # has actors keeps it fed, and bounds the workers (and memory) reads take.
    readers = spec.stage(segments[0].stages[0]).batch.actors[1]
    block_bytes = int(spec.batch.block_mb * 1024 * 1024)
    with _block_size(block_bytes):
        ds = _read(paths, readers, block_bytes)
        for i, segment in enumerate(segments):
            conf = spec.stage(segment.stages[0]).batch
            lo, hi = conf.actors
            ds = ds.map_batches(
                ArrowBatchChain,
                fn_constructor_kwargs={
                    "spec": spec,
                    "stages": list(segment.stages),
                    "home": home_arg,
                    "validate": i == 0,
                    "as_of": as_of,
                    "keep": list(columns) if columns and i == len(segments) - 1 else None,
                },
                batch_format="pandas",
                batch_size=conf.batch_size,
                compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                num_cpus=conf.num_cpus,
            )
    return ds


@contextmanager
def _block_size(size: int) -> Iterator[None]:
    """Datasets created inside make blocks of about ``size`` bytes (each keeps a copy
    of the context it was created with); the process-wide context is restored after."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    ctx.target_max_block_size = size
    try:
        yield
    finally:
        ctx.target_max_block_size = saved


class BatchChain(StageChain):
    """A :class:`StageChain` that first gives Ray's batches the dtypes pandas reads.

    Ray Data hands pandas batches whose columns are Arrow-backed (``ArrowDtype``,
    ``pd.NA`` for nulls); ``pd.read_parquet`` and JSON records give numpy and
    string dtypes. Converting once here means every stage sees the frames it
    sees in the in-process pipeline and online, so scores match exactly.

    An online store that does not answer (when the stages load, or for a batch)
    is waited for, ``batch.store_retries`` times, before the run fails.
    """

    def __init__(
        self, spec: PipelineSpec, *args: Any, keep: Sequence[str] | None = None, **kwargs: Any
    ) -> None:
        self.retries = spec.batch.store_retries
        self.keep = keep
        # Stages connect to their stores here: the same patience as for a batch.
        _with_retries(self.retries, lambda: StageChain.__init__(self, spec, *args, **kwargs))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        frame = plain_dtypes(batch)
        out = _with_retries(self.retries, lambda: StageChain.__call__(self, frame))
        if self.keep is not None:
            out = out[[c for c in self.keep if c in out.columns]]
        # Text or None (never NaN), so Ray stores these as Arrow strings, not pickles.
        for col in (ERROR_COLUMN, RAW_COLUMN):
            if col in out.columns:
                out[col] = out[col].astype(object).where(out[col].notna(), None)
        # Lists that came in from Arrow are numpy arrays; Ray would try to store them
        # as tensors, fail on text, and fall back to pickles. Plain lists are Arrow lists.
        for col in out.columns:
            if out[col].dtype == object:
                first = out[col].dropna().head(1).tolist()
                if first and isinstance(first[0], np.ndarray):
                    out[col] = [v.tolist() if isinstance(v, np.ndarray) else v for v in out[col]]
        return out


class ArrowBatchChain:
    """What each actor of a pool runs: a :class:`BatchChain` whose frames go back to
    Ray as Arrow tables. Ray stores blocks as Arrow either way, but its own conversion
    first looks through every object column for tensors; ``pyarrow`` converts the
    frame directly. A frame Arrow cannot hold (a stage returning arbitrary Python
    objects) goes back as it is, for Ray to store as it can."""

    def __init__(self, **kwargs: Any) -> None:
        self.chain = BatchChain(**kwargs)

    def __call__(self, batch: pd.DataFrame) -> pa.Table | pd.DataFrame:
        out = self.chain(batch)
        try:
            return pa.Table.from_pandas(out, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return out


def _with_retries(retries: int, work: Callable[[], T]) -> T:
    """``work()``; while the online store does not answer, wait (0.5 s, doubling, at most
    8 s) and try again, ``retries`` times, then fail saying how long it waited."""
    waited = 0.0
    for attempt in range(retries):
        try:
            return work()
        except StoreUnavailableError as e:
            delay = min(0.5 * 2**attempt, 8.0)
            log.warning("online store unavailable (%s); retrying in %.1f s", e, delay)
            time.sleep(delay)
            waited += delay
    try:
        return work()
    except StoreUnavailableError as e:
        raise StoreUnavailableError(
            f"the online feature store stayed unavailable through {retries + 1} "
            f"tries over {waited:.0f} s: {e}"
        ) from None


def plain_dtypes(batch: pd.DataFrame) -> pd.DataFrame:
    """``batch`` rebuilt as pandas reads the same data: Arrow-backed columns converted as
    ``Table.to_pandas`` does, Ray's own extension columns (Python objects) as objects."""
    arrow = [c for c in batch.columns if isinstance(batch[c].dtype, pd.ArrowDtype)]
    converted: dict[str, Any] = {}
    if arrow:
        table = pa.Table.from_pandas(batch[arrow], preserve_index=False)
        frame = table.to_pandas(ignore_metadata=True).set_axis(batch.index)
        converted = {c: frame[c] for c in arrow}
    for c in batch.columns:
        if c not in converted and not type(batch[c].dtype).__module__.startswith(
            ("numpy", "pandas")
        ):
            converted[c] = pd.Series(batch[c].to_numpy(dtype=object), index=batch.index)
    # A fresh frame: Ray's zero-copy batches carry blocks pandas cannot consolidate.
    return pd.DataFrame(
        {c: converted[c] if c in converted else batch[c].copy() for c in batch.columns},
        index=batch.index,
    )


def csv_convert_options() -> pacsv.ConvertOptions:
    """An empty CSV field is a missing value (as pandas writes ``None``), in every column;
    no other text is: ``NA`` is Namibia's country code, not a null."""
    return pacsv.ConvertOptions(null_values=[""], strings_can_be_null=True)


def _paths(source: Source) -> list[str]:
    if isinstance(source, str | os.PathLike):
        return [os.fspath(source)]
    return [os.fspath(p) for p in source]


def _read(paths: list[str], readers: int, unit_bytes: int) -> ray.data.Dataset:
    """Parquet unless every path names a CSV file; Ray expands directories and globs.
    A parquet read task reads about ``unit_bytes``: one block's worth."""
    csv = [p.lower().endswith(CSV_SUFFIXES) for p in paths]
    options: dict[str, Any] = {"concurrency": readers}
    if not workers_have_read_env():
        options["runtime_env"] = READ_ENV
    if all(csv):
        return ray.data.read_csv(
            paths,
            file_extensions=["csv", "gz"],
            convert_options=csv_convert_options(),
            **options,
        )
    if any(csv):
        raise ValueError("mixed CSV and parquet inputs: pass one format per run")
    return read_parquet(paths, unit_bytes, file_extensions=["parquet"], **options)
