"""The output of one batch run: scored rows and quarantined rows, as parquet parts.

Each pipeline batch is split by its ``_error`` column: scored rows stay Arrow from
the pipeline to the file; rejected rows are written with their original fields as
text, the whole record as JSON, and the stage and reason that rejected them.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch_app.manifest import STAGED_DATA, STAGED_LOG, STAGED_QUARANTINE
from stageline.outputs import OutputContract
from stageline.spec import PipelineSpec
from stageline.stage import ERROR_COLUMN, split_error
from stageline.stages.validate import RAW_COLUMN

ROWS_PER_FILE = 1_000_000


class Writers:
    """Split each pipeline batch into scored rows and quarantined rows; write both."""

    def __init__(
        self, spec: PipelineSpec, staging: Path, run_id: str, log: str | None = None
    ) -> None:
        """``log``: the prediction log's location, where the scored rows (every column the
        stages gave) go once the run is committed; None: not logged."""
        self.spec = spec
        self.run_id = run_id
        self.log = log
        self.log_parts = 0
        self.log_folder = staging / STAGED_LOG
        self.logged_at = pa.scalar(datetime.now(timezone.utc), pa.timestamp("us", tz="UTC"))
        self.id_field = spec.request.id_field
        self.fields = list(spec.request.fields)
        self.contract = OutputContract(spec)
        self.data = PartWriter(staging / STAGED_DATA, self.data_schema())
        self.quarantine = PartWriter(staging / STAGED_QUARANTINE, self.quarantine_schema())
        self.rows_in = self.rows_out = self.rows_quarantined = 0
        self.models: set[str] = set()

    def data_schema(self) -> pa.Schema:
        """The id, every output of the pipeline's contract, and the run."""
        return self.contract.arrow_schema(("run_id", pa.string()))

    def quarantine_schema(self) -> pa.Schema:
        return pa.schema(
            [
                *((f, pa.string()) for f in self.fields),
                ("record", pa.string()),
                ("stage", pa.string()),
                ("reason", pa.string()),
                ("run_id", pa.string()),
            ]
        )

    def columns(self) -> list[str] | None:
        """What the writer reads of the pipeline's output: None, all of it, when the run's
        predictions are logged (the features the model received among them)."""
        if self.log is not None:
            return None
        wanted = [self.id_field, *self.fields, *self.contract.columns, ERROR_COLUMN, RAW_COLUMN]
        return list(dict.fromkeys(wanted))

    def write(self, batch: pa.Table) -> None:
        self.rows_in += batch.num_rows
        if ERROR_COLUMN in batch.column_names:
            bad = pc.is_valid(batch[ERROR_COLUMN])
            good = batch.filter(pc.invert(bad))
            if pc.any(bad).as_py():
                self._write_bad(batch.filter(bad).to_pandas())
        else:
            good = batch
        if good.num_rows:
            self._write_good(good)
            if self.log is not None:
                self._write_log(good)

    def _write_good(self, good: pa.Table) -> None:
        """Arrow to Arrow: scored rows never become Python objects on the driver."""
        n = good.num_rows
        columns = {
            self.id_field: good[self.id_field],
            # Model columns are null where no stage names the model.
            **{
                c: good[c] if c in good.column_names else pa.nulls(n) for c in self.contract.columns
            },
            "run_id": pa.repeat(pa.scalar(self.run_id, pa.string()), n),
        }
        table = pa.table(
            {c: columns[c].cast(self.data.schema.field(c).type) for c in self.data.schema.names},
            schema=self.data.schema,
        )
        self.data.write(table)
        self.rows_out += n
        # In this thread only: Ray Data's parquet reader resizes Arrow's process-wide CPU
        # pool (pa.set_cpu_count) as the run starts, and a threaded group-by could then
        # fail with "thread index N is out of range" (seen in a test run).
        served = table.select(["model_name", "model_version"]).group_by(
            ["model_name", "model_version"], use_threads=False
        )
        self.models.update(
            f"{r['model_name']} v{r['model_version']}"
            for r in served.aggregate([]).to_pylist()
            if r["model_name"] is not None
        )

    def _write_log(self, good: pa.Table) -> None:
        """The scored rows as the prediction log keeps them (every column but the internal
        ``_`` ones), the run as their request id, one staged file per batch."""
        n = good.num_rows
        table = good.select([c for c in good.column_names if not c.startswith("_")])
        table = table.append_column("request_id", pa.repeat(pa.scalar(self.run_id), n))
        table = table.append_column("logged_at", pa.repeat(self.logged_at, n))
        self.log_folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, self.log_folder / f"part-{self.log_parts:05d}.parquet")
        self.log_parts += 1

    def _write_bad(self, bad: pd.DataFrame) -> None:
        n = len(bad)
        raws = bad[RAW_COLUMN].tolist() if RAW_COLUMN in bad.columns else [None] * n
        records: list[dict[str, Any]] = []
        for i, raw in enumerate(raws):
            if isinstance(raw, str):
                records.append(json.loads(raw))
            else:  # rejected after validation: the (validated) request fields
                row = bad.iloc[i]
                records.append({f: _jsonable(row[f]) for f in self.fields if f in bad.columns})
        stages, reasons = zip(*(split_error(str(e)) for e in bad[ERROR_COLUMN]), strict=True)
        columns: dict[str, Any] = {
            f: pa.array([_text(r.get(f)) for r in records], pa.string()) for f in self.fields
        }
        columns["record"] = pa.array(
            [json.dumps(r, default=str, allow_nan=False) for r in map(_no_nan, records)],
            pa.string(),
        )
        columns["stage"] = pa.array(list(stages), pa.string())
        columns["reason"] = pa.array(list(reasons), pa.string())
        columns["run_id"] = pa.array([self.run_id] * n, pa.string())
        self.quarantine.write(pa.table(columns, schema=self.quarantine.schema))
        self.rows_quarantined += n

    def close(self) -> None:
        self.data.close(empty_ok=False)
        self.quarantine.close(empty_ok=True)


class PartWriter:
    """Parquet files of at most ``ROWS_PER_FILE`` rows under one folder."""

    def __init__(self, folder: Path, schema: pa.Schema) -> None:
        self.folder = folder
        self.schema = schema
        self.parts = 0
        self.rows = 0
        self.writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if self.writer is None or self.rows >= ROWS_PER_FILE:
            self._roll()
        assert self.writer is not None
        self.writer.write_table(table)
        self.rows += table.num_rows

    def _roll(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(self.folder / f"part-{self.parts:05d}.parquet", self.schema)
        self.parts += 1
        self.rows = 0

    def close(self, *, empty_ok: bool) -> None:
        if self.writer is None and not empty_ok:
            self._roll()  # an empty file with the schema: readers of the run still work
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NaT


def _text(v: Any) -> str | None:
    if _missing(v):
        return None
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if _missing(v) or (not isinstance(v, str) and pd.isna(v) is True):
        return None
    if isinstance(v, pd.Timestamp | datetime):
        return v.isoformat()
    return v


def _no_nan(record: dict[str, Any]) -> dict[str, Any]:
    return {k: None if _missing(v) else v for k, v in record.items()}
