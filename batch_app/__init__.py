"""Batch inference with Ray Data: the spec's very stages mapped over large datasets.

``build_dataset`` builds the lazy pipeline; ``batch_app.run.run`` scores new input
files into a parquet output with a quarantine and a manifest.

Importing this package does not import Ray (the names below load on first use):
``python -m batch_app`` must keep a local Ray on loopback before Ray is imported.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batch_app.dataset import BatchChain, build_dataset
    from batch_app.run import Summary

__all__ = ["BatchChain", "Summary", "build_dataset"]

_HOMES = {"BatchChain": "batch_app.dataset", "build_dataset": "batch_app.dataset"}
_HOMES["Summary"] = "batch_app.run"


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'batch_app' has no attribute {name!r}")
    return getattr(import_module(_HOMES[name]), name)
