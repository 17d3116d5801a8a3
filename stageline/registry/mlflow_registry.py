"""The model registry in MLflow (``pip install 'stageline[mlflow]'``).

Select it with a registry location ``mlflow:<registry URI>``: ``mlflow:http://mlflow:5000``
(a tracking server), ``mlflow:databricks``, ``mlflow:file:///path/mlruns``, or a bare
``mlflow:`` to take MLflow's own ``$MLFLOW_REGISTRY_URI`` / ``$MLFLOW_TRACKING_URI``.
Names, versions and aliases are MLflow's registered models, versions and aliases, so
``fraud@champion`` (or ``models:/fraud@champion``) is the version MLflow's
``champion`` alias points at.

What a version holds (its artifacts): the booster in XGBoost's own ``model.ubj`` or
``model.json`` and stageline's ``metadata.json`` (features in order, encoders fitted
at training, task, threshold or classes, metrics, sha256, size), exactly what the
local registry keeps. :meth:`MlflowRegistry.register` (and ``stageline registry
register --registry mlflow:...``) writes both as a run's artifacts and registers them,
tagging the version with the file's sha256. Loading downloads the artifacts and checks
them as the local registry does (size, sha256 against the metadata and against the
tag, XGBoost's format, features, task); a version without stageline's metadata, such
as one of a pickle-based flavor (``mlflow.sklearn``, ``python_function``), is refused
with a message saying how to register it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stageline.registry.base import ModelRegistry
from stageline.registry.integrity import load_verified
from stageline.registry.metadata import (
    METADATA_FILE,
    LoadedModel,
    ModelIntegrityError,
    ModelMetadata,
    ModelNotFoundError,
    RegistryError,
    check_name,
)

MLFLOW_SCHEME = "mlflow:"
"""A registry location starting with this is an MLflow registry."""
SHA256_TAG = "stageline.sha256"
"""The model version tag holding the model file's sha256, recorded at registration."""
ARTIFACT_PATH = "stageline-model"
"""Where in a run's artifacts :meth:`MlflowRegistry.register` puts a version's files."""

_HOW = (
    "register it with stageline (MlflowRegistry.register, or `stageline registry register "
    "NAME model.ubj --registry mlflow:...`), which stores XGBoost's own model file with "
    "the features, encoders and threshold stageline serves"
)


def is_mlflow(location: str | os.PathLike[str]) -> bool:
    """True for an MLflow registry location (``mlflow:...``)."""
    return os.fspath(location).startswith(MLFLOW_SCHEME)


class MlflowRegistry(ModelRegistry):
    """Versioned XGBoost models in an MLflow model registry, verified on every load.

    ``location``: ``mlflow:<registry URI>`` (a bare ``mlflow:`` uses MLflow's
    environment variables). Construction does no I/O.
    """

    def __init__(self, location: str, *, max_model_bytes: int | None = None) -> None:
        super().__init__(max_model_bytes=max_model_bytes)
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise RegistryError(
                f"{location}: the MLflow registry needs MLflow's client; "
                "pip install 'stageline[mlflow]'"
            ) from exc
        self._location = location
        self._uri = location.removeprefix(MLFLOW_SCHEME) or None
        self._client = MlflowClient(tracking_uri=self._uri, registry_uri=self._uri)

    def __repr__(self) -> str:
        return f"MlflowRegistry({self._location!r})"

    @property
    def location(self) -> str:
        return self._location

    # -- reading -----------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(m.name for m in self._call(self._client.search_registered_models))

    def aliases(self, name: str) -> dict[str, int]:
        model = self._registered(name)
        return dict(sorted((a, int(v)) for a, v in (model.aliases or {}).items()))

    # -- what the base class needs -------------------------------------------

    def _known_versions(self, name: str) -> list[int]:
        self._registered(name)
        found = self._call(self._client.search_model_versions, f"name='{name}'")
        # Versions registered some other way (another flavor) are not stageline's.
        return sorted(int(v.version) for v in found if SHA256_TAG in (v.tags or {}))

    def _read_metadata(self, name: str, version: int) -> ModelMetadata:
        meta, _ = self._download(name, version, files=(METADATA_FILE,))
        return meta

    def _update_aliases(
        self, name: str, change: Callable[[dict[str, int]], dict[str, int]]
    ) -> None:
        current = self.aliases(name)
        updated = change(dict(current))
        for alias in current.keys() - updated.keys():
            self._call(self._client.delete_registered_model_alias, name, alias)
        for alias, version in updated.items():
            if current.get(alias) != version:
                self._call(self._client.set_registered_model_alias, name, alias, str(version))

    def _store_new_version(self, meta: ModelMetadata, raw: bytes) -> ModelMetadata:
        from mlflow.exceptions import MlflowException

        check_name(meta.name, what="register()")
        try:
            self._client.get_registered_model(meta.name)
        except MlflowException:
            self._call(self._client.create_registered_model, meta.name)
        experiment = self._call(self._client.get_experiment_by_name, "stageline")
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self._call(self._client.create_experiment, "stageline")
        )
        run = self._call(self._client.create_run, experiment_id, run_name=f"register {meta.name}")
        run_id = run.info.run_id
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, meta.file).write_bytes(raw)
            # The version number is MLflow's, known only once registered: the stored
            # metadata says 1 and every read takes MLflow's number instead.
            Path(folder, METADATA_FILE).write_text(meta.model_dump_json(indent=2))
            self._call(self._client.log_artifacts, run_id, folder, ARTIFACT_PATH)
        self._call(self._client.set_terminated, run_id)
        version = self._call(
            self._client.create_model_version,
            meta.name,
            f"runs:/{run_id}/{ARTIFACT_PATH}",
            run_id=run_id,
            tags={SHA256_TAG: meta.sha256},
            description=meta.description or None,
        )
        return meta.model_copy(update={"version": int(version.version)})

    def _load_verified(self, meta: ModelMetadata) -> LoadedModel:
        with tempfile.TemporaryDirectory() as folder:
            checked, path = self._download(
                meta.name, meta.version, files=(METADATA_FILE, meta.file), into=folder
            )
            booster = load_verified(path, checked, max_bytes=self.max_model_bytes)
        where = f"models:/{meta.name}/{meta.version}"
        return LoadedModel(booster=booster, metadata=checked, path=f"{where}/{meta.file}")

    # -- MLflow ----------------------------------------------------------------

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return method(*args, **kwargs)
        except MlflowException as exc:
            raise RegistryError(f"MLflow registry {self._location}: {exc.message}") from exc

    def _registered(self, name: str) -> Any:
        from mlflow.exceptions import MlflowException

        check_name(name, what=f"model {name!r}")
        try:
            return self._client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"MLflow registry {self._location}: {exc.message}") from exc
            raise ModelNotFoundError(
                f"no model {name!r} in the MLflow registry {self._location} (models: "
                f"{', '.join(self.models()) or 'none'}); check the name or register it first"
            ) from None

    def _download(
        self, name: str, version: int, *, files: tuple[str, ...], into: str | None = None
    ) -> tuple[ModelMetadata, Path]:
        """The version's metadata, checked against MLflow's record of it, and the path of
        the last of ``files`` downloaded into ``into`` (a temporary folder if None)."""
        from mlflow.artifacts import download_artifacts
        from mlflow.exceptions import MlflowException

        where = f"models:/{name}/{version}"
        self._registered(name)
        try:
            record = self._client.get_model_version(name, str(version))
        except MlflowException:
            known = ", ".join(map(str, self._known_versions(name))) or "none"
            raise ModelNotFoundError(
                f"model {name!r} has no version {version} in {self._location} (versions: "
                f"{known}); pick one of those"
            ) from None
        tag = (record.tags or {}).get(SHA256_TAG)
        if tag is None:
            raise ModelIntegrityError(
                f"{where} was not registered through stageline (its version has no "
                f"{SHA256_TAG} tag): stageline serves only XGBoost's own model files with "
                f"their metadata, never a pickle-based flavor; {_HOW}"
            )
        source = self._call(self._client.get_model_version_download_uri, name, str(version))
        meta: ModelMetadata | None = None
        with tempfile.TemporaryDirectory() as scratch:
            target = into or scratch
            path = Path(target)
            for file in files:
                try:
                    path = Path(
                        download_artifacts(
                            artifact_uri=f"{source.rstrip('/')}/{file}",
                            dst_path=target,
                            tracking_uri=self._uri,
                        )
                    )
                except (MlflowException, OSError) as exc:
                    raise ModelIntegrityError(
                        f"{where} has no {file} among its artifacts ({source}); {_HOW}"
                    ) from exc
                if file == METADATA_FILE:
                    meta = self._metadata(where, name, version, path.read_bytes(), tag)
        assert meta is not None, "files start with the metadata"
        return meta, path

    @staticmethod
    def _metadata(where: str, name: str, version: int, data: bytes, tag: str) -> ModelMetadata:
        import pydantic

        try:
            meta = ModelMetadata.model_validate_json(data)
        except (pydantic.ValidationError, UnicodeDecodeError) as exc:
            raise ModelIntegrityError(
                f"{where}: its {METADATA_FILE} is not stageline's metadata; {_HOW}:\n{exc}"
            ) from exc
        if meta.name != name:
            raise ModelIntegrityError(
                f"{where}: its {METADATA_FILE} describes model {meta.name!r}; it was copied "
                f"from another model - {_HOW}"
            )
        if meta.sha256 != tag:
            raise ModelIntegrityError(
                f"{where}: its {METADATA_FILE} records sha256 {meta.sha256} but the version "
                f"was registered with {tag}; the artifacts were modified after registration "
                f"- {_HOW}"
            )
        return meta.model_copy(update={"version": version})
