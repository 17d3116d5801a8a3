"""Ray Serve application: every stage an autoscaling deployment behind an HTTP ingress.

``serve run serve_app:build_app spec=pipelines/fraud.yaml`` or ``cluster/serve.yaml``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from serve_app.app import AppArgs, build_app

__all__ = ["AppArgs", "build_app"]


def __getattr__(name: str) -> Any:
    # Imported on first use, so that Ray-free parts (serve_app.batching) import alone.
    if name in __all__:
        from serve_app import app

        return getattr(app, name)
    raise AttributeError(f"module 'serve_app' has no attribute {name!r}")
