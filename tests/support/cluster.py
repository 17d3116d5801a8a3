"""A Ray cluster of several nodes on this machine (``ray start``), for the multi-node
tests and ``cluster/try_multinode.py``: ``bench/cluster.py`` is the one copy (a
benchmark runs on it too, and bench never imports tests)."""

from __future__ import annotations

from bench.cluster import LocalCluster, LocalNode, auth_token

__all__ = ["LocalCluster", "LocalNode", "auth_token"]
