"""Build the Ray Data pipeline of a spec: read, validate, one ``map_batches`` per segment.

The very stage classes the in-process :class:`~stageline.pipeline.Pipeline` and
Ray Serve run: each segment of ``spec.segments()`` becomes a
:class:`~stageline.pipeline.StageChain` actor pool (validation rides with the
first segment), so no stage code is written twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import ray
import ray.data

from stageline.pipeline import StageChain
from stageline.spec import PipelineSpec
from stageline.stage import ERROR_COLUMN
from stageline.stages.validate import RAW_COLUMN

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]

CSV_SUFFIXES = (".csv", ".csv.gz")


def build_dataset(
    spec: PipelineSpec, source: Source, home: str | os.PathLike[str] | None = None
) -> ray.data.Dataset:
    """A lazy dataset of every stage's columns for every input row (``_error`` marks bad rows).

    ``source``: a parquet or CSV file, a directory, a glob, or a list of files;
    URIs such as ``s3://bucket/prefix`` are passed to Ray unchanged.
    """
    paths = _paths(source)
    if not paths:
        raise ValueError("no input files to read")
    ds = _read(paths)
    home_arg = str(Path(home).resolve()) if home is not None else None
    for i, segment in enumerate(spec.segments()):
        first = spec.stage(segment.stages[0])
        conf = first.batch
        lo, hi = conf.actors
        ds = ds.map_batches(
            BatchChain,
            fn_constructor_kwargs={
                "spec": spec,
                "stages": list(segment.stages),
                "home": home_arg,
                "validate": i == 0,
            },
            batch_format="pandas",
            batch_size=conf.batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=conf.num_cpus,
        )
    return ds


class BatchChain(StageChain):
    """A :class:`StageChain` that first gives Ray's batches the dtypes pandas reads.

    Ray Data hands pandas batches whose columns are Arrow-backed (``ArrowDtype``,
    ``pd.NA`` for nulls); ``pd.read_parquet`` and JSON records give numpy and
    string dtypes. Converting once here means every stage sees the frames it
    sees in the in-process pipeline and online, so scores match exactly.
    """

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = super().__call__(plain_dtypes(batch))
        # Text or None (never NaN), so Ray stores these as Arrow strings, not pickles.
        for col in (ERROR_COLUMN, RAW_COLUMN):
            if col in out.columns:
                out[col] = out[col].astype(object).where(out[col].notna(), None)
        return out


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


def _paths(source: Source) -> list[str]:
    if isinstance(source, str | os.PathLike):
        return [os.fspath(source)]
    return [os.fspath(p) for p in source]


def _read(paths: list[str]) -> ray.data.Dataset:
    """Parquet unless every path names a CSV file; Ray expands directories and globs."""
    csv = [p.lower().endswith(CSV_SUFFIXES) for p in paths]
    if all(csv):
        return ray.data.read_csv(paths, file_extensions=["csv", "gz"])
    if any(csv):
        raise ValueError("mixed CSV and parquet inputs: pass one format per run")
    return ray.data.read_parquet(paths, file_extensions=["parquet"])
