"""Batch inference with Ray Data: the spec's very stages mapped over large datasets.

``build_dataset`` builds the lazy pipeline; ``batch_app.run.run`` scores new input
files into a parquet output with a quarantine and a manifest.
"""

from batch_app.dataset import BatchChain, build_dataset
from batch_app.run import Summary

__all__ = ["BatchChain", "Summary", "build_dataset"]
