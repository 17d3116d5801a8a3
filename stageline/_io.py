"""Small file helpers shared by the registry, the feature store and the demo."""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import pandas as pd


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_parquet(
    path: Path, frame: pd.DataFrame, metadata: Mapping[str, str] | None = None
) -> Path:
    """``frame.to_parquet(path)``, published atomically; ``metadata`` goes into the
    file's key-value metadata, beside pandas' own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        if metadata:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            extra = {k.encode(): v.encode() for k, v in metadata.items()}
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **extra})
            pq.write_table(table, tmp)
        else:
            frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
