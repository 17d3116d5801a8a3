"""The output folder of batch runs, its manifest, and how a crash is repaired.

Layout under ``output/``::

    run=<run_id>/part-*.parquet              scored rows (one per valid input row)
    _quarantine/run=<run_id>/part-*.parquet  rejected rows: original fields, stage, reason
    _manifest.json                           input files processed, the committed runs, and
                                             how they were scored (online or as-of)
    _staging/<run_id>/{data,quarantine,log}/ a run being written (never read)
    _lock                                    held by the run in progress

A run writes everything under ``_staging/<run_id>/``, then commits by replacing
the manifest (one atomic rename), then publishes by renaming its staging folders
into place, and its rows for the prediction log (``log/``) into the log's folder, each
file under a name of its own (``date=<day>/batch-<run_id>-part-*.parquet``), so that a
publish repeated after a crash replaces what it had moved and never adds a copy.
Before anything else, every run reconciles the folder with the manifest: a committed
run still in staging is published, an uncommitted one is deleted, and a published run
the manifest does not list (after ``--full``) is removed. So a crash at any point
leaves no partial or duplicated output (nor log rows), and the inputs of an uncommitted
run are simply processed again next time.

One output holds one scoring mode: the online store's latest features, or
features as of each row's event time (``--as-of``). An incremental run in the
other mode is refused (:meth:`Manifest.check_mode`), so a backfill never lands
next to online scores.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from batch_app.inputs import InputFile
from stageline._io import atomic_write_bytes
from stageline.context import AS_OF_FEATURES
from stageline.predlog import PARTITION, log_filesystem, write_parquet

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
LOCK = "_lock"
STAGING = "_staging"
QUARANTINE = "_quarantine"
STAGED_DATA = "data"
"""Under ``_staging/<run_id>/``: the scored rows, published as ``run=<run_id>``."""
STAGED_QUARANTINE = "quarantine"
"""Under ``_staging/<run_id>/``: the rejected rows, published under ``_quarantine``."""
STAGED_LOG = "log"
"""Under ``_staging/<run_id>/``: the scored rows with every column, published into the
prediction log the run's manifest entry names (``log``)."""
ONLINE = "online"
"""Scoring mode: features from the online store (latest values)."""
AS_OF = "as-of"
"""Scoring mode: features from the offline store as of each row's event time."""


def scoring_mode(as_of: bool) -> str:
    return AS_OF if as_of else ONLINE


_MODE_TEXT = {
    ONLINE: "the online store's latest features",
    AS_OF: f"{AS_OF_FEATURES} (--as-of)",
}


@dataclass
class Manifest:
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    mode: str | None = None
    """How the committed runs were scored (:data:`ONLINE` or :data:`AS_OF`); None before
    the first run."""

    @classmethod
    def load(cls, output: Path) -> Manifest:
        path = output / MANIFEST
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        runs = list(data.get("runs", []))
        # A manifest from before as-of scoring existed records online runs.
        mode = data.get("mode") or (ONLINE if runs else None)
        return cls(files=dict(data.get("files", {})), runs=runs, mode=mode)

    def save(self, output: Path) -> None:
        data = {"format": 1, "mode": self.mode, "files": self.files, "runs": self.runs}
        atomic_write_bytes(output / MANIFEST, json.dumps(data, indent=1).encode())

    def check_mode(self, mode: str, output: Path) -> None:
        """Refuse to add runs scored in ``mode`` to an output scored in the other one."""
        if self.mode is None or self.mode == mode:
            return
        flag = "without --as-of" if self.mode == ONLINE else "with --as-of"
        raise ValueError(
            f"{output} holds scores from {_MODE_TEXT[self.mode]}; this run would use "
            f"{_MODE_TEXT[mode]}, and one output never mixes the two: run {flag} to add "
            "to it, --full to rescore all of its input this way, or write to another --output"
        )

    def run_ids(self) -> set[str]:
        return {str(r["run_id"]) for r in self.runs}

    def is_done(self, f: InputFile) -> bool:
        seen = self.files.get(f.path)
        return (
            seen is not None and seen.get("size") == f.size and seen.get("mtime_ns") == f.mtime_ns
        )


def reconcile(output: Path, manifest: Manifest) -> None:
    """Make the published folders match the manifest (see the module docstring)."""
    committed = manifest.run_ids()
    logs = {str(r["run_id"]): r.get("log") for r in manifest.runs}
    staging_root = output / STAGING
    if staging_root.exists():
        for staged in sorted(staging_root.iterdir()):
            if staged.name in committed:
                _publish(output, staged)
                _publish_log(staged, logs.get(staged.name))
            else:
                log.warning("removing the output of an unfinished run: %s", staged)
            shutil.rmtree(staged, ignore_errors=True)
    for parent in (output, output / QUARANTINE):
        if not parent.exists():
            continue
        for published in parent.glob("run=*"):
            if published.name.removeprefix("run=") not in committed:
                shutil.rmtree(published, ignore_errors=True)


def _publish_log(staged: Path, location: str | None) -> None:
    """Move the run's staged log files into the prediction log at ``location``, under
    the run's day, one name per file: moved again after a crash, a file replaces itself."""
    source = staged / STAGED_LOG
    if location is None or not source.exists():
        return
    fs, root = log_filesystem(location)  # the log may be on another filesystem or a store
    day = f"{staged.name[:4]}-{staged.name[4:6]}-{staged.name[6:8]}"  # run ids start YYYYMMDD
    for part in sorted(source.glob("part-*.parquet")):
        target = f"{root}/{PARTITION}={day}/batch-{staged.name}-{part.name}"
        write_parquet(fs, target, pq.read_table(part))
        part.unlink()


def _publish(output: Path, staged: Path) -> None:
    for part, target in ((STAGED_DATA, output), (STAGED_QUARANTINE, output / QUARANTINE)):
        source = staged / part
        if source.exists():
            target.mkdir(parents=True, exist_ok=True)
            os.replace(source, target / f"run={staged.name}")
