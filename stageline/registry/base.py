"""What every registry does the same way, whatever stores its files.

:class:`ModelRegistry` checks what a user hands it, builds the metadata, resolves
aliases and versions, and verifies a model before it is returned. A backend
(``LocalRegistry`` on a local folder, ``ObjectStoreRegistry`` on object storage)
supplies the few storage operations below, so the rules are written once.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import xgboost

from stageline.registry.integrity import DEFAULT_MAX_MODEL_BYTES, MAX_MODEL_BYTES_ENV
from stageline.registry.metadata import (
    DEFAULT_ALIAS,
    DEFAULT_THRESHOLD,
    VERSION_RE,
    LoadedModel,
    ModelFormat,
    ModelMetadata,
    ModelNotFoundError,
    RegistryError,
    Task,
    ThresholdDefault,
    check_alias,
    check_version,
    listing,
)
from stageline.registry.registering import check_register_args, check_task_args, new_metadata


class ModelRegistry(abc.ABC):
    """Versioned XGBoost models with aliases; every load verified against its metadata.

    ``max_model_bytes``: the largest model file it loads or registers (default
    ``$STAGELINE_MAX_MODEL_BYTES``, else :data:`DEFAULT_MAX_MODEL_BYTES`).
    """

    def __init__(self, *, max_model_bytes: int | None = None) -> None:
        if max_model_bytes is None:
            max_model_bytes = int(os.environ.get(MAX_MODEL_BYTES_ENV) or DEFAULT_MAX_MODEL_BYTES)
        self.max_model_bytes = max_model_bytes

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the registry is: a folder or a URI, for messages."""

    # -- writing -----------------------------------------------------------

    def register(
        self,
        name: str,
        booster: xgboost.Booster,
        *,
        features: Sequence[str],
        encoders: Mapping[str, Mapping[str, Any]] | None = None,
        task: Task | None = None,
        threshold: float | ThresholdDefault | None = DEFAULT_THRESHOLD,
        classes: Sequence[str] | None = None,
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        description: str = "",
        format: ModelFormat = "ubj",
        aliases: Sequence[str] = (),
        profile: Mapping[str, Any] | None = None,
    ) -> ModelMetadata:
        """Store ``booster`` as the next version of ``name`` and return its metadata.

        ``features`` become the booster's feature names (a booster that already
        has different names is refused). ``task`` defaults to the one the booster's
        objective implies (``binary:*`` binary, ``multi:*`` multiclass, ``reg:*`` and
        the like regression). ``threshold``: a binary model's, 0.5 if not given; the
        other tasks have none. ``classes``: a multiclass model's class names in label
        order (default ``"0"``, ``"1"``...). ``metrics``: any held-out metrics, the
        headline one first. ``aliases`` are pointed at the new version once it is
        in place. ``profile``: what it was trained on, for monitoring.
        """
        features = check_register_args(name, booster, features, format, aliases)
        task_args = check_task_args(name, booster, task, threshold, classes)
        booster.feature_names = list(features)
        raw = bytes(booster.save_raw(raw_format=format))
        if len(raw) > self.max_model_bytes:
            raise RegistryError(
                f"register({name!r}): the model is {len(raw)} bytes, over the "
                f"{self.max_model_bytes}-byte limit on model files; raise "
                f"${MAX_MODEL_BYTES_ENV} where it is registered and served"
            )
        meta = new_metadata(
            name,
            raw,
            format=format,
            features=features,
            encoders=encoders,
            task=task_args,
            metrics=metrics,
            params=params,
            description=description,
            profile=profile,
        )
        meta = self._store_new_version(meta, raw)
        if aliases:
            version = meta.version
            self._update_aliases(
                name, lambda current: {**current, **dict.fromkeys(aliases, version)}
            )
        return meta

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` of ``name`` at ``version``, which must exist."""
        check_alias(alias, what=f"set_alias({name!r})")
        version = check_version(version, what=f"set_alias({name!r}, {alias!r})")
        self._read_metadata(name, version)  # raises if the version does not exist
        self._update_aliases(name, lambda current: {**current, alias: version})

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` of ``name``; an unknown alias raises ModelNotFoundError."""
        check_alias(alias, what=f"delete_alias({name!r})")

        def drop(current: dict[str, int]) -> dict[str, int]:
            if alias not in current:
                raise ModelNotFoundError(
                    f"model {name!r} has no alias {alias!r} to delete "
                    f"(its aliases: {listing(current)}); see the registry's aliases({name!r})"
                )
            return {k: v for k, v in current.items() if k != alias}

        self._update_aliases(name, drop)

    # -- reading -----------------------------------------------------------

    @abc.abstractmethod
    def models(self) -> list[str]:
        """Names of the registered models, sorted."""

    def versions(self, name: str) -> list[ModelMetadata]:
        """Metadata of every complete version of ``name``, by version number."""
        return [self._read_metadata(name, v) for v in self._known_versions(name)]

    @abc.abstractmethod
    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` of ``name``, sorted by alias."""

    def resolve(self, name: str, ref: str | int | None = None) -> ModelMetadata:
        """Metadata for ``name`` at ``ref``: an alias, a version (int or digits), or champion."""
        if ref is None:
            ref = DEFAULT_ALIAS
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise RegistryError(
                f"{name}@{ref!r}: a model ref is an alias like 'champion' or a version "
                "number like 3"
            )
        if isinstance(ref, str) and VERSION_RE.fullmatch(ref):
            ref = int(ref)
        if isinstance(ref, int):
            return self._read_metadata(name, check_version(ref, what=f"{name}@{ref}"))
        check_alias(ref, what=f"{name}@{ref}")
        current = self.aliases(name)
        if ref not in current:
            versions = self._known_versions(name)
            raise ModelNotFoundError(
                f"model {name!r} has no alias {ref!r} (aliases: {listing(current)}; "
                f"versions: {', '.join(map(str, versions)) or 'none'}); load a version "
                f"number instead or point the alias with set_alias({name!r}, {ref!r}, <version>)"
            )
        version = current[ref]
        try:
            return self._read_metadata(name, version)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(
                f"alias {name}@{ref} points at version {version}, which does not exist; "
                f"repoint it with set_alias({name!r}, {ref!r}, <version>)"
            ) from exc

    def load(self, name: str, ref: str | int | None = None) -> LoadedModel:
        """Load ``name`` at ``ref`` (see :meth:`resolve`) after verifying its file.

        The file is read once: its size is checked against the metadata before
        reading, and the same bytes that are hashed are the bytes loaded.
        """
        return self._load_verified(self.resolve(name, ref))

    # -- what a backend supplies -------------------------------------------

    @abc.abstractmethod
    def _known_versions(self, name: str) -> list[int]:
        """The complete versions of ``name`` (raises ModelNotFoundError for no model)."""

    @abc.abstractmethod
    def _read_metadata(self, name: str, version: int) -> ModelMetadata:
        """One version's metadata, checked to describe that version."""

    @abc.abstractmethod
    def _update_aliases(
        self, name: str, change: Callable[[dict[str, int]], dict[str, int]]
    ) -> None:
        """Replace the aliases of ``name`` with ``change(current)``, in one write."""

    @abc.abstractmethod
    def _store_new_version(self, meta: ModelMetadata, raw: bytes) -> ModelMetadata:
        """Write ``raw`` and ``meta`` as the next version; ``meta`` with that version.
        A reader never sees the version before both are complete."""

    @abc.abstractmethod
    def _load_verified(self, meta: ModelMetadata) -> LoadedModel:
        """The model ``meta`` describes, read once and verified."""
