"""RAY INTERNALS: the Ray Data settings batch_app needs that Ray has no supported API for.

Ray Data 2.60 reads these two knobs from environment variables inside its private
``ray.data._internal.datasource_v2`` modules; no :class:`ray.data.DataContext` field
and no ``read_parquet`` argument sets them:

- ``RAY_DATA_PARQUET_BIN_PACKING_BYTES``: ``ParquetDatasourceV2.get_file_partitioner``
  (``formats/parquet/parquet_datasource_v2.py``) reads it on the driver, inside
  ``read_parquet``, and packs parquet row groups into read tasks of up to that many
  bytes (128 MiB by default). Its ``OnlineBinPacker`` ignores
  ``DataContext.target_max_block_size`` and ``override_num_blocks``, so without this
  one task reads millions of rows and its worker's memory grows with the input.
- ``RAY_DATA_ARROW_SCANNER_BATCH_READAHEAD``: read once, when
  ``common/file_reader.py`` is imported, in each process that reads: how many batches
  the Arrow scanner decodes ahead of the reader (8 by default).

``ARROW_DEFAULT_MEMORY_POOL`` is Arrow's own, documented setting, read when pyarrow
loads. ``test_ray_data_still_reads_the_settings_batch_app_gives_it`` (in
``tests/integration/test_batch.py``) fails, naming the variable, when a Ray upgrade
stops reading one of them. Nothing here leaves ``os.environ`` changed once it returns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import ray
import ray.data

PARQUET_READ_UNIT_ENV = "RAY_DATA_PARQUET_BIN_PACKING_BYTES"
SCANNER_READAHEAD_ENV = "RAY_DATA_ARROW_SCANNER_BATCH_READAHEAD"

READ_ENV: dict[str, Any] = {
    "env_vars": {
        "ARROW_DEFAULT_MEMORY_POOL": "system",
        SCANNER_READAHEAD_ENV: "1",
    }
}
"""The ``runtime_env`` of the processes that read: Arrow's default allocator (jemalloc)
keeps what a read freed, and the scanner would decode batches ahead that nobody has
asked for yet. With these, a read worker holds about one block beyond its own code,
however much it has read."""

_read_env_cluster: str | None = None
"""The GCS address of the local Ray :func:`init_local_ray` started, if any."""


def init_local_ray(**options: Any) -> None:
    """``ray.init(**options)`` for a local Ray whose every worker has ``READ_ENV``.

    The Ray processes ``ray.init`` starts copy this process's environment, and the
    workers they start copy theirs: reads then run in the workers Ray starts up front,
    not in workers started for a ``runtime_env`` of their own (each such start costs
    a new interpreter and its imports). ``os.environ`` is restored once Ray is up.
    """
    global _read_env_cluster
    with _environ(READ_ENV["env_vars"]):
        ray.init(**options)
    _read_env_cluster = ray.get_runtime_context().gcs_address


def workers_have_read_env() -> bool:
    """Whether this process is connected to the Ray :func:`init_local_ray` started (its
    workers have ``READ_ENV`` already); on any other Ray, reads must carry it."""
    return (
        _read_env_cluster is not None
        and ray.is_initialized()
        and ray.get_runtime_context().gcs_address == _read_env_cluster
    )


def read_parquet(paths: Sequence[str], unit_bytes: int, **options: Any) -> ray.data.Dataset:
    """``ray.data.read_parquet(paths, **options)`` with read tasks of about
    ``unit_bytes`` bytes each (``PARQUET_READ_UNIT_ENV``, read while the dataset is
    created)."""
    with _environ({PARQUET_READ_UNIT_ENV: str(unit_bytes)}):
        return ray.data.read_parquet(list(paths), **options)


@contextmanager
def _environ(updates: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``updates`` inside the block, as it was after."""
    saved = {name: os.environ.get(name) for name in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
