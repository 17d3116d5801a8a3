"""Versioned XGBoost models on local disk, with aliases, verified on every load."""

# Re-exported (`name as name`): the registry's public names, from where they live.
from stageline.registry.local import LoadedModel as LoadedModel
from stageline.registry.local import LocalRegistry as LocalRegistry
from stageline.registry.local import ModelIntegrityError as ModelIntegrityError
from stageline.registry.local import ModelMetadata as ModelMetadata
from stageline.registry.local import ModelNotFoundError as ModelNotFoundError
from stageline.registry.local import RegistryError as RegistryError
from stageline.registry.local import Task as Task
from stageline.registry.local import parse_model_ref as parse_model_ref
