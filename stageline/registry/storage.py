"""The registry's file operations: durable writes, directory fsync, a lock, versions."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from stageline.registry.metadata import VERSION_RE


def version_numbers(model_dir: Path, *, include_claims: bool = False) -> list[int]:
    """Sorted version numbers under ``model_dir``; empty claims only if asked."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if VERSION_RE.fullmatch(p.name) and p.is_dir() and (include_claims or any(p.iterdir()))
    )


def write_durably(path: Path, data: bytes) -> None:
    """Create ``path`` (never overwrite) and fsync it before returning."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    # Makes a rename durable; some filesystems refuse fsync on directories.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent alias updates do not lose each other's writes."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
