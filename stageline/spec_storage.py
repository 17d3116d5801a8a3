"""Where the model registry and the feature tables live when not under the home.

Plain data: ``stageline.storage.StorageLocations`` resolves it.
"""

from __future__ import annotations

from stageline.spec_base import SpecModel


class StorageSpec(SpecModel):
    """Where the model registry and the feature store keep their files. Each is a local
    path (a relative one is taken from the home), a ``file://`` URI, or an object-storage
    URI such as ``s3://bucket/prefix``: every node of a cluster then reads the same
    models and tables without a shared mount. S3 credentials, region and endpoint come
    from the standard AWS environment variables (``AWS_ENDPOINT_URL`` for an
    S3-compatible server). An environment variable overrides each field."""

    models: str | None = None
    """The model registry's root (``<name>/<version>/`` beneath it), or an MLflow model
    registry: ``mlflow:<registry URI>`` (e.g. ``mlflow:http://mlflow:5000``; a bare
    ``mlflow:`` uses ``$MLFLOW_TRACKING_URI``; needs the ``mlflow`` extra). ``null``:
    ``<home>/models``. ``$STAGELINE_MODELS_URI`` overrides it."""
    features: str | None = None
    """The folder of offline feature tables (``<view>.parquet``; a view's own ``source``
    wins). ``null``: ``<home>/features``. ``$STAGELINE_FEATURES_URI`` overrides it."""
    online: str | None = None
    """The folder of the memory online store's snapshots, written by ``stageline
    materialize`` and read by each replica at start. ``null``: ``<home>/online``.
    ``$STAGELINE_ONLINE_URI`` overrides it."""
