"""Versioned XGBoost models on local disk, with aliases, verified on every load."""

from stageline.registry.local import (
    LoadedModel,
    LocalRegistry,
    ModelIntegrityError,
    ModelMetadata,
    ModelNotFoundError,
    RegistryError,
    Task,
    parse_model_ref,
)

__all__ = [
    "LoadedModel",
    "LocalRegistry",
    "ModelIntegrityError",
    "ModelMetadata",
    "ModelNotFoundError",
    "RegistryError",
    "Task",
    "parse_model_ref",
]
