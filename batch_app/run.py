"""One batch run: score the new input files, quarantine bad rows, publish atomically.

The output folder's layout, and how a run commits and repairs what a crashed run
left, are described in :mod:`batch_app.manifest`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import ray.data

from batch_app.dataset import build_dataset
from batch_app.inputs import InputFile, list_inputs
from batch_app.manifest import (
    LOCK,
    MANIFEST,
    QUARANTINE,
    STAGING,
    Manifest,
    reconcile,
    scoring_mode,
)
from batch_app.ray_internals import init_local_ray
from batch_app.write import Writers
from stageline.context import AS_OF_FEATURES, as_of_field, resolve_home
from stageline.features import StoreUnavailableError
from stageline.localray import local_ray_options
from stageline.predlog import log_location
from stageline.spec import PipelineSpec, load_spec

__all__ = [
    "LOCK",
    "MANIFEST",
    "QUARANTINE",
    "STAGING",
    "InputFile",
    "Manifest",
    "Summary",
    "connect",
    "list_inputs",
    "reconcile",
    "run",
]


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
    as_of: bool = False
    """Features were those as of each row's event time, not the online store's latest."""

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
            f"{self.seconds:.1f} s ({self.rows_per_second:,.0f} rows/s) with {self.model}"
            f"{', ' + AS_OF_FEATURES if self.as_of else ''}; output {self.output}/run={self.run_id}"
        )


# --------------------------------------------------------------------------- the run


def run(
    spec_path: str | os.PathLike[str] | PipelineSpec,
    input: str | os.PathLike[str] | list[str],
    output: str | os.PathLike[str],
    home: str | os.PathLike[str] | None = None,
    full: bool = False,
    as_of: bool = False,
) -> Summary:
    """Score the input files not processed yet (all of them with ``full``) into ``output``.

    With ``as_of``, features are those as of each row's event time (the offline store's
    history), not the online store's latest: a backfill. One output holds one mode; an
    incremental run in the other mode is refused (``full`` replaces the output).

    Ray must already be initialized (``ray.init(...)``): the caller picks the cluster.
    """
    spec = spec_path if isinstance(spec_path, PipelineSpec) else load_spec(Path(spec_path))
    if as_of:
        as_of_field(spec)  # here, not as an actor's failure inside Ray
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        return _run(spec, input, out, home, full, as_of)


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
    as_of: bool,
) -> Summary:
    started = time.perf_counter()
    mode = scoring_mode(as_of)
    manifest = Manifest.load(out)
    if not full:
        manifest.check_mode(mode, out)
    reconcile(out, manifest)
    files = list_inputs(input)
    if not files:
        raise ValueError(f"no parquet or CSV files found at {input}")
    new = files if full else [f for f in files if not manifest.is_done(f)]
    if not new:
        return Summary(None, 0, 0, 0, 0.0, 0, str(out), skipped_files=len(files), as_of=as_of)

    run_id = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    log = (
        log_location(resolve_home(home), spec.name, spec.prediction_log)
        if spec.prediction_log.enabled
        else None
    )
    writer = Writers(spec, out / STAGING / run_id, run_id, log)
    dataset = build_dataset(
        spec, [f.path for f in new], resolve_home(home), writer.columns(), as_of=as_of
    )
    _stage(dataset, writer)
    seconds = time.perf_counter() - started

    committed = Manifest() if full else manifest
    committed.mode = mode
    _commit(out, committed, writer, new)
    reconcile(out, committed)  # publishes this run
    return Summary(
        run_id,
        writer.rows_in,
        writer.rows_out,
        writer.rows_quarantined,
        seconds,
        len(new),
        str(out),
        tuple(sorted(writer.models)),
        as_of=as_of,
    )


def _stage(dataset: ray.data.Dataset, writer: Writers) -> None:
    """Run the pipeline, writing its output to the run's staging folder."""
    try:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            assert isinstance(batch, pa.Table)
            writer.write(batch)
    except Exception as e:
        cause = _store_unavailable(e)
        if cause is None:
            raise
        raise StoreUnavailableError(
            f"batch run {writer.run_id} failed, nothing was published: {cause}"
        ) from None
    finally:
        writer.close()


def _commit(out: Path, manifest: Manifest, writer: Writers, files: list[InputFile]) -> None:
    """Record the staged run and its input files in the manifest: the commit point."""
    manifest.files.update({f.path: {**f.key(), "run_id": writer.run_id} for f in files})
    manifest.runs.append(
        {
            "run_id": writer.run_id,
            "finished_at": datetime.now(timezone.utc).isoformat(),
            "rows_in": writer.rows_in,
            "rows_out": writer.rows_out,
            "rows_quarantined": writer.rows_quarantined,
            "files": [f.path for f in files],
            "models": sorted(writer.models),
            "log": writer.log,
        }
    )
    manifest.save(out)


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
        init_local_ray(**local_ray_options(num_cpus=num_cpus), logging_level=logging.WARNING)
    return True
