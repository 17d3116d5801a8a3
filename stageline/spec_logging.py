"""The prediction log: where every prediction is recorded, and how much of it.

Plain data: ``stageline.predlog.PredictionLog`` reads it.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from stageline.spec_base import SpecModel


class PredictionLogSpec(SpecModel):
    """Every prediction written to a partitioned parquet dataset: online, off the request
    path (a slow or failing sink drops and counts rows, never a request); in batch, each
    committed run's scored rows, once."""

    enabled: bool = True
    """Log predictions at all (online and batch)."""
    uri: str | None = None
    """Where the dataset goes. ``null``: ``<home>/logs/<pipeline>``. Else a local path
    (a relative one is taken from the home) or a URI that ``pyarrow`` understands, such
    as ``s3://bucket/prefix``. Files land in ``date=YYYY-MM-DD/`` folders beneath it."""
    sample: float = Field(default=1.0, ge=0, le=1)
    """Share of online predictions logged, chosen by request id, so a request is either
    logged whole or not at all. Batch runs log every scored row."""
    max_buffered_rows: int = Field(default=100_000, ge=1)
    """Most rows held in memory, waiting for or being written. Past it the rows of a new
    prediction are dropped and counted: memory stays bounded however slow the sink."""
    flush_rows: int = Field(default=5_000, ge=1)
    """A file is written once this many rows wait, or ``flush_interval_s`` after the
    oldest of them arrived, whichever comes first."""
    flush_interval_s: float = Field(default=1.0, gt=0)
    """Longest a logged row waits before it is written."""
    close_timeout_s: float = Field(default=10.0, ge=0)
    """How long a stop waits for the rows still in memory to be written."""

    @model_validator(mode="after")
    def _flush_within_bound(self) -> PredictionLogSpec:
        if self.flush_rows > self.max_buffered_rows:
            raise ValueError(
                "flush_rows must not exceed max_buffered_rows: rows past the bound are "
                "dropped, so a flush that size would never be reached"
            )
        return self
