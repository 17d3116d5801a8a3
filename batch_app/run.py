"""One batch run: score the new input files, quarantine bad rows, publish atomically.

Layout under ``output/``::

    run=<run_id>/part-*.parquet              scored rows (one per valid input row)
    _quarantine/run=<run_id>/part-*.parquet  rejected rows: original fields, stage, reason
    _manifest.json                           input files processed, and the committed runs
    _staging/<run_id>/                       a run being written (never read)
    _lock                                    held by the run in progress

A run writes everything under ``_staging/<run_id>/``, then commits by replacing
the manifest (one atomic rename), then publishes by renaming its staging folders
into place. Before anything else, every run reconciles the folder with the
manifest: a committed run still in staging is published, an uncommitted one is
deleted, and a published run the manifest does not list (after ``--full``) is
removed. So a crash at any point leaves no partial or duplicated output, and the
inputs of an uncommitted run are simply processed again next time.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batch_app.dataset import CSV_SUFFIXES, build_dataset, inherit_read_env
from stageline._io import atomic_write_bytes
from stageline.context import resolve_home
from stageline.features import StoreUnavailableError
from stageline.localray import local_ray_options
from stageline.spec import PipelineSpec, load_spec
from stageline.stage import ERROR_COLUMN, split_error
from stageline.stages.postprocess import OUTPUT_COLUMNS
from stageline.stages.validate import RAW_COLUMN

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
LOCK = "_lock"
STAGING = "_staging"
QUARANTINE = "_quarantine"
ROWS_PER_FILE = 1_000_000
INPUT_SUFFIXES = (".parquet", *CSV_SUFFIXES)


@dataclass(frozen=True)
class InputFile:
    path: str
    """As Ray reads it: an absolute local path or a URI."""
    size: int
    mtime_ns: int

    def key(self) -> dict[str, Any]:
        return {"size": self.size, "mtime_ns": self.mtime_ns}


@dataclass(frozen=True)
class Summary:
    run_id: str | None
    rows_in: int
    rows_out: int
    rows_quarantined: int
    seconds: float
    files: int
    output: str
    models: tuple[str, ...] = ()
    skipped_files: int = 0

    @property
    def rows_per_second(self) -> float:
        return self.rows_in / self.seconds if self.seconds > 0 else 0.0

    @property
    def model(self) -> str:
        return ", ".join(self.models) or "no model"

    def line(self) -> str:
        if self.run_id is None:
            return (
                f"no new input: all {self.skipped_files} file(s) already processed "
                f"(see {self.output}/{MANIFEST}; --full reprocesses everything)"
            )
        return (
            f"run {self.run_id}: {self.rows_in} rows in from {self.files} file(s) -> "
            f"{self.rows_out} scored, {self.rows_quarantined} quarantined in "
            f"{self.seconds:.1f} s ({self.rows_per_second:,.0f} rows/s) with {self.model}; "
            f"output {self.output}/run={self.run_id}"
        )


@dataclass
class Manifest:
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, output: Path) -> Manifest:
        path = output / MANIFEST
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(files=dict(data.get("files", {})), runs=list(data.get("runs", [])))

    def save(self, output: Path) -> None:
        data = {"format": 1, "files": self.files, "runs": self.runs}
        atomic_write_bytes(output / MANIFEST, json.dumps(data, indent=1).encode())

    def run_ids(self) -> set[str]:
        return {str(r["run_id"]) for r in self.runs}

    def is_done(self, f: InputFile) -> bool:
        seen = self.files.get(f.path)
        return (
            seen is not None and seen.get("size") == f.size and seen.get("mtime_ns") == f.mtime_ns
        )


# --------------------------------------------------------------------------- the run


def run(
    spec_path: str | os.PathLike[str] | PipelineSpec,
    input: str | os.PathLike[str] | list[str],
    output: str | os.PathLike[str],
    home: str | os.PathLike[str] | None = None,
    full: bool = False,
) -> Summary:
    """Score the input files not processed yet (all of them with ``full``) into ``output``.

    Ray must already be initialized (``ray.init(...)``): the caller picks the cluster.
    """
    spec = spec_path if isinstance(spec_path, PipelineSpec) else load_spec(Path(spec_path))
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run(spec, input, out, home, full)


@contextmanager
def _exclusive(output: Path) -> Iterator[None]:
    """One run per output folder at a time (the lock goes with the process if it dies)."""
    with (output / LOCK).open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"another batch run is writing to {output}; wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(
    spec: PipelineSpec,
    input: str | os.PathLike[str] | list[str],
    out: Path,
    home: str | os.PathLike[str] | None,
    full: bool,
) -> Summary:
    started = time.perf_counter()

    manifest = Manifest.load(out)
    reconcile(out, manifest)
    files = list_inputs(input)
    if not files:
        raise ValueError(f"no parquet or CSV files found at {input}")
    new = files if full else [f for f in files if not manifest.is_done(f)]
    if not new:
        return Summary(None, 0, 0, 0, 0.0, 0, str(out), skipped_files=len(files))

    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    staging = out / STAGING / run_id
    writer = _Writers(spec, staging, run_id)
    dataset = build_dataset(spec, [f.path for f in new], resolve_home(home), writer.columns())
    try:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            assert isinstance(batch, pa.Table)
            writer.write(batch)
    except Exception as e:
        cause = _store_unavailable(e)
        if cause is None:
            raise
        raise StoreUnavailableError(
            f"batch run {run_id} failed, nothing was published: {cause}"
        ) from None
    finally:
        writer.close()
    _fault("staged")

    seconds = time.perf_counter() - started
    record = {
        "run_id": run_id,
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "rows_in": writer.rows_in,
        "rows_out": writer.rows_out,
        "rows_quarantined": writer.rows_quarantined,
        "files": [f.path for f in new],
        "models": sorted(writer.models),
    }
    committed = Manifest() if full else manifest
    committed.files.update({f.path: {**f.key(), "run_id": run_id} for f in new})
    committed.runs.append(record)
    committed.save(out)  # the commit point
    _fault("committed")
    reconcile(out, committed)
    return Summary(
        run_id,
        writer.rows_in,
        writer.rows_out,
        writer.rows_quarantined,
        seconds,
        len(new),
        str(out),
        tuple(sorted(writer.models)),
    )


def _store_unavailable(error: BaseException) -> str | None:
    """Why the online store failed a run, if it did. Ray wraps what a task or an actor's
    constructor raised, and the original may only survive as text."""
    seen: set[int] = set()
    todo: list[BaseException] = [error]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, StoreUnavailableError):
            return str(e)
        todo += [
            c
            for c in (getattr(e, "cause", None), e.__cause__, e.__context__)
            if isinstance(c, BaseException)
        ]
    marker = f"{StoreUnavailableError.__name__}: "
    lines = [line for line in str(error).splitlines() if marker in line]
    return lines[-1].split(marker, 1)[1].strip() if lines else None


def reconcile(output: Path, manifest: Manifest) -> None:
    """Make the published folders match the manifest (see the module docstring)."""
    committed = manifest.run_ids()
    staging_root = output / STAGING
    if staging_root.exists():
        for staged in sorted(staging_root.iterdir()):
            if staged.name in committed:
                _publish(output, staged)
            else:
                log.warning("removing the output of an unfinished run: %s", staged)
            shutil.rmtree(staged, ignore_errors=True)
    for parent in (output, output / QUARANTINE):
        if not parent.exists():
            continue
        for published in parent.glob("run=*"):
            if published.name.removeprefix("run=") not in committed:
                shutil.rmtree(published, ignore_errors=True)


def _publish(output: Path, staged: Path) -> None:
    for part, target in (("data", output), ("quarantine", output / QUARANTINE)):
        source = staged / part
        if source.exists():
            target.mkdir(parents=True, exist_ok=True)
            os.replace(source, target / f"run={staged.name}")


_FAULT_ENV = "STAGELINE_BATCH_FAULT"


def _fault(point: str) -> None:
    """Crash here when tests ask to (``STAGELINE_BATCH_FAULT=staged|committed``)."""
    if os.environ.get(_FAULT_ENV) == point:
        raise SystemExit(f"simulated crash after the run was {point}")


def connect(address: str | None = None, *, num_cpus: float | None = None) -> bool:
    """Join the Ray at ``address`` (or ``$RAY_ADDRESS``, as inside ``ray job submit``),
    else start a local Ray on loopback sized for this machine. False when this process
    was connected already (the caller must then not shut it down)."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, namespace="stageline", logging_level=logging.WARNING)
    else:
        inherit_read_env()
        ray.init(**local_ray_options(num_cpus=num_cpus), logging_level=logging.WARNING)
    return True


# --------------------------------------------------------------------------- inputs


def list_inputs(source: str | os.PathLike[str] | list[str]) -> list[InputFile]:
    """Every parquet/CSV file of a file, directory, glob or list (URIs included), sorted."""
    items = [source] if isinstance(source, str | os.PathLike) else list(source)
    found: dict[str, InputFile] = {}
    for item in items:
        for f in _expand(os.fspath(item)):
            found[f.path] = f
    return [found[p] for p in sorted(found)]


def _expand(item: str) -> Iterator[InputFile]:
    if "://" in item:
        fs, path = pafs.FileSystem.from_uri(item)
        scheme = item.split("://", 1)[0]
        prefix = f"{scheme}://"
    else:
        fs, prefix = pafs.LocalFileSystem(), ""
        if glob.has_magic(item):
            for match in sorted(glob.glob(item, recursive=True)):
                yield from _expand(match)
            return
        path = str(Path(item).resolve())
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such input: {item}")
    if info.type == pafs.FileType.File:
        yield InputFile(prefix + info.path, int(info.size or 0), int(info.mtime_ns or 0))
        return
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        relative = entry.path[len(path) :]
        if entry.type != pafs.FileType.File or any(
            part.startswith(("_", ".")) for part in relative.split("/") if part
        ):
            continue
        if entry.path.lower().endswith(INPUT_SUFFIXES):
            yield InputFile(prefix + entry.path, int(entry.size or 0), int(entry.mtime_ns or 0))


# --------------------------------------------------------------------------- outputs


class _Writers:
    """Split each pipeline batch into scored rows and quarantined rows; write both."""

    def __init__(self, spec: PipelineSpec, staging: Path, run_id: str) -> None:
        self.spec = spec
        self.run_id = run_id
        self.id_field = spec.request.id_field
        self.fields = list(spec.request.fields)
        self.data = _PartWriter(staging / "data", self.data_schema())
        self.quarantine = _PartWriter(staging / "quarantine", self.quarantine_schema())
        self.rows_in = self.rows_out = self.rows_quarantined = 0
        self.models: set[str] = set()

    def data_schema(self) -> pa.Schema:
        return pa.schema(
            [
                (self.id_field, pa.string()),
                ("score", pa.float64()),
                ("label", pa.bool_()),
                ("reasons", pa.list_(pa.string())),
                ("model_name", pa.string()),
                ("model_version", pa.int64()),
                ("run_id", pa.string()),
            ]
        )

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

    def columns(self) -> list[str]:
        """What the writer reads of the pipeline's output."""
        wanted = [self.id_field, *self.fields, *OUTPUT_COLUMNS, ERROR_COLUMN, RAW_COLUMN]
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

    def _write_good(self, good: pa.Table) -> None:
        """Arrow to Arrow: scored rows never become Python objects on the driver."""
        n = good.num_rows
        columns = {
            self.id_field: good[self.id_field],
            **{c: good[c] for c in ("score", "label", "reasons", "model_name", "model_version")},
            "run_id": pa.repeat(pa.scalar(self.run_id, pa.string()), n),
        }
        table = pa.table(
            {c: columns[c].cast(self.data.schema.field(c).type) for c in self.data.schema.names},
            schema=self.data.schema,
        )
        self.data.write(table)
        self.rows_out += n
        served = table.select(["model_name", "model_version"]).group_by(
            ["model_name", "model_version"]
        )
        self.models.update(
            f"{r['model_name']} v{r['model_version']}" for r in served.aggregate([]).to_pylist()
        )

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


class _PartWriter:
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
