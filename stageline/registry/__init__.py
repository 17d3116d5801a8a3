"""Versioned XGBoost models with aliases, verified on every load: in a local folder
(:class:`LocalRegistry`) or on object storage (:class:`ObjectStoreRegistry`)."""

from __future__ import annotations

import os
from pathlib import Path

# Re-exported (`name as name`): the registry's public names, from where they live.
from stageline.registry.base import ModelRegistry as ModelRegistry
from stageline.registry.local import LoadedModel as LoadedModel
from stageline.registry.local import LocalRegistry as LocalRegistry
from stageline.registry.local import ModelIntegrityError as ModelIntegrityError
from stageline.registry.local import ModelMetadata as ModelMetadata
from stageline.registry.local import ModelNotFoundError as ModelNotFoundError
from stageline.registry.local import RegistryError as RegistryError
from stageline.registry.local import Task as Task
from stageline.registry.local import parse_model_ref as parse_model_ref
from stageline.registry.mlflow_registry import is_mlflow
from stageline.registry.objectstore import ObjectStoreRegistry as ObjectStoreRegistry
from stageline.storage import is_remote, local_path


def open_registry(location: str | os.PathLike[str]) -> ModelRegistry:
    """The registry at ``location``: a local folder (a path or ``file://`` URI), object
    storage (``s3://bucket/prefix``), or MLflow (``mlflow:<registry URI>``, the
    ``mlflow`` extra). No I/O until it is used."""
    if is_mlflow(location):
        from stageline.registry.mlflow_registry import MlflowRegistry

        return MlflowRegistry(os.fspath(location))
    if is_remote(location):
        return ObjectStoreRegistry(os.fspath(location))
    return LocalRegistry(local_path(location, Path.cwd()))
