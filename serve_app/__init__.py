"""Ray Serve application: every stage an autoscaling deployment behind an HTTP ingress.

``serve run serve_app:build_app spec=pipelines/fraud.yaml`` or ``cluster/serve.yaml``.
"""

from serve_app.app import AppArgs, build_app

__all__ = ["AppArgs", "build_app"]
