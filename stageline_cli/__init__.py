"""The ``stageline`` command: the composition root.

It sits above the core (``stageline``) and the two Ray adapters (``serve_app``,
``batch_app``). Ray-backed commands (``serve``, ``batch``) import their adapter
lazily, so the other commands start fast and work without Ray.
"""

from __future__ import annotations

from stageline_cli.main import build_parser, main

__all__ = ["build_parser", "main"]
