"""A model registry in a local directory: XGBoost's own formats, checked on load.

Layout under ``root``::

    <root>/<name>/<version>/model.ubj        (or model.json)
    <root>/<name>/<version>/metadata.json
    <root>/<name>/aliases.json               {"champion": 1, "challenger": 2}

Versions are integers handed out by :meth:`LocalRegistry.register`. A new
version is claimed with ``os.mkdir`` (atomic, so two concurrent registers never
share a number), written into a hidden temp directory next to it, and renamed
over the still-empty claim, so readers never see a half-written version. An
empty version directory is a register in progress (or one that crashed) and is
skipped.

Only XGBoost's UBJSON/JSON model formats are stored. Nothing here unpickles:
:meth:`LocalRegistry.load` refuses pickle outright, checks the file's size and
sha256 against its metadata, and checks the feature names the booster carries.

This module is the registry's layout and its operations; ``metadata`` holds
what is recorded and the names accepted, ``integrity`` the checks on load,
``storage`` the durable file writes and the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import xgboost

from stageline.registry.integrity import (
    DEFAULT_MAX_MODEL_BYTES,
    MAX_MODEL_BYTES_ENV,
    load_verified,
)
from stageline.registry.metadata import (
    ALIAS_RE,
    DEFAULT_ALIAS,
    DEFAULT_THRESHOLD,
    METADATA_FILE,
    NAME_RE,
    VERSION_RE,
    LoadedModel,
    ModelFormat,
    ModelIntegrityError,
    ModelMetadata,
    ModelNotFoundError,
    RegistryError,
    Task,
    ThresholdDefault,
    check_alias,
    check_name,
    check_version,
    listing,
    parse_model_ref,
)
from stageline.registry.registering import check_register_args, check_task_args, new_metadata
from stageline.registry.storage import fsync_dir, locked, version_numbers, write_durably

__all__ = [
    "ALIASES_FILE",
    "DEFAULT_ALIAS",
    "DEFAULT_MAX_MODEL_BYTES",
    "MAX_MODEL_BYTES_ENV",
    "METADATA_FILE",
    "LoadedModel",
    "LocalRegistry",
    "ModelFormat",
    "ModelIntegrityError",
    "ModelMetadata",
    "ModelNotFoundError",
    "RegistryError",
    "Task",
    "parse_model_ref",
]

ALIASES_FILE = "aliases.json"
_LOCK_FILE = ".aliases.lock"
_TMP_PREFIX = ".tmp-"


class LocalRegistry:
    """Versioned XGBoost models with aliases, stored under one directory.

    Construction does no I/O; the root is created by the first register.
    ``max_model_bytes``: the largest model file it loads or registers (default
    ``$STAGELINE_MAX_MODEL_BYTES``, else :data:`DEFAULT_MAX_MODEL_BYTES`).
    """

    def __init__(self, root: str | os.PathLike[str], *, max_model_bytes: int | None = None) -> None:
        self.root = Path(root)
        if max_model_bytes is None:
            max_model_bytes = int(os.environ.get(MAX_MODEL_BYTES_ENV) or DEFAULT_MAX_MODEL_BYTES)
        self.max_model_bytes = max_model_bytes

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

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
                    f"(its aliases: {listing(current)}); see LocalRegistry.aliases({name!r})"
                )
            return {k: v for k, v in current.items() if k != alias}

        self._update_aliases(name, drop)

    # -- reading -----------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the registered models, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)
        )

    def versions(self, name: str) -> list[ModelMetadata]:
        """Metadata of every complete version of ``name``, by version number."""
        model_dir = self._model_dir(name)
        return [self._read_metadata(name, v) for v in version_numbers(model_dir)]

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` of ``name``, sorted by alias."""
        return self._read_aliases(self._model_dir(name))

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
            versions = version_numbers(self.root / name)
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
        meta = self.resolve(name, ref)
        path = self.root / name / str(meta.version) / meta.file
        booster = load_verified(path, meta, max_bytes=self.max_model_bytes)
        return LoadedModel(booster=booster, metadata=meta, path=path)

    # -- internals ---------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        check_name(name, what=f"model {name!r}")
        model_dir = self.root / name
        if not model_dir.is_dir():
            raise ModelNotFoundError(
                f"no model {name!r} in registry {self.root} (models: "
                f"{', '.join(self.models()) or 'none'}); check the name or register it first"
            )
        return model_dir

    def _read_metadata(self, name: str, version: int) -> ModelMetadata:
        version_dir = self._model_dir(name) / str(version)
        meta_path = version_dir / METADATA_FILE
        if not version_dir.is_dir() or not any(version_dir.iterdir()):
            known = ", ".join(map(str, version_numbers(self.root / name))) or "none"
            raise ModelNotFoundError(
                f"model {name!r} has no version {version} (versions: {known}); "
                f"pick one of those or see LocalRegistry.versions({name!r})"
            )
        try:
            meta = ModelMetadata.model_validate_json(meta_path.read_bytes())
        except FileNotFoundError as exc:
            raise ModelIntegrityError(
                f"{meta_path} is missing, so {name}@{version} cannot be verified; restore it "
                f"or register the model again"
            ) from exc
        except (pydantic.ValidationError, UnicodeDecodeError) as exc:
            raise ModelIntegrityError(
                f"{meta_path} is not valid metadata for {name}@{version}; restore it or "
                f"register the model again:\n{exc}"
            ) from exc
        if meta.name != name or meta.version != version:
            raise ModelIntegrityError(
                f"{meta_path} describes {meta.name}@{meta.version}, not {name}@{version}; "
                "it was copied or moved by hand - restore it or register the model again"
            )
        return meta

    def _read_aliases(self, model_dir: Path) -> dict[str, int]:
        path = model_dir / ALIASES_FILE
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelIntegrityError(
                f"{path} is not valid JSON ({exc}); fix it by hand or delete it and set "
                "the aliases again with set_alias()"
            ) from exc
        if not isinstance(data, dict) or not all(
            isinstance(k, str)
            and ALIAS_RE.fullmatch(k)
            and isinstance(v, int)
            and not isinstance(v, bool)
            and v >= 1
            for k, v in data.items()
        ):
            raise ModelIntegrityError(
                f"{path} must map alias names to version numbers, like "
                '{"champion": 1}; fix it by hand or delete it and set the aliases again'
            )
        return dict(sorted(data.items()))

    def _update_aliases(
        self, name: str, change: Callable[[dict[str, int]], dict[str, int]]
    ) -> None:
        model_dir = self._model_dir(name)
        with locked(model_dir / _LOCK_FILE):
            updated = change(self._read_aliases(model_dir))
            tmp = model_dir / f"{_TMP_PREFIX}{ALIASES_FILE}-{uuid.uuid4().hex}"
            try:
                write_durably(tmp, json.dumps(dict(sorted(updated.items())), indent=2).encode())
                os.replace(tmp, model_dir / ALIASES_FILE)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(model_dir)

    @staticmethod
    def _claim_version(model_dir: Path) -> tuple[int, Path]:
        version = max(version_numbers(model_dir, include_claims=True), default=0) + 1
        while True:
            version_dir = model_dir / str(version)
            try:
                os.mkdir(version_dir)
            except FileExistsError:
                version += 1  # a concurrent register got there first
                continue
            return version, version_dir

    def _store_new_version(self, meta: ModelMetadata, raw: bytes) -> ModelMetadata:
        """Write ``raw`` and ``meta`` as the next version; ``meta`` with that version."""
        model_dir = self.root / meta.name
        model_dir.mkdir(parents=True, exist_ok=True)
        version, version_dir = self._claim_version(model_dir)
        meta = meta.model_copy(update={"version": version})
        tmp_dir = model_dir / f"{_TMP_PREFIX}{version}-{uuid.uuid4().hex}"
        try:
            tmp_dir.mkdir()
            write_durably(tmp_dir / meta.file, raw)
            write_durably(tmp_dir / METADATA_FILE, meta.model_dump_json(indent=2).encode())
            fsync_dir(tmp_dir)
            # POSIX rename replaces the empty claimed directory atomically.
            os.rename(tmp_dir, version_dir)
            fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                version_dir.rmdir()  # only succeeds while still an empty claim
            raise
        return meta
