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
from collections.abc import Callable
from pathlib import Path

from stageline.registry.base import ModelRegistry
from stageline.registry.integrity import (
    DEFAULT_MAX_MODEL_BYTES,
    MAX_MODEL_BYTES_ENV,
    load_verified,
)
from stageline.registry.metadata import (
    DEFAULT_ALIAS,
    METADATA_FILE,
    NAME_RE,
    LoadedModel,
    ModelFormat,
    ModelIntegrityError,
    ModelMetadata,
    ModelNotFoundError,
    RegistryError,
    Task,
    check_name,
    parse_aliases,
    parse_metadata,
    parse_model_ref,
)
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


class LocalRegistry(ModelRegistry):
    """Versioned XGBoost models with aliases, stored under one directory.

    Construction does no I/O; the root is created by the first register.
    ``max_model_bytes``: the largest model file it loads or registers (default
    ``$STAGELINE_MAX_MODEL_BYTES``, else :data:`DEFAULT_MAX_MODEL_BYTES`).
    """

    def __init__(self, root: str | os.PathLike[str], *, max_model_bytes: int | None = None) -> None:
        super().__init__(max_model_bytes=max_model_bytes)
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalRegistry({str(self.root)!r})"

    @property
    def location(self) -> str:
        return str(self.root)

    # -- reading -----------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the registered models, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)
        )

    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` of ``name``, sorted by alias."""
        return self._read_aliases(self._model_dir(name))

    # -- internals ---------------------------------------------------------

    def _known_versions(self, name: str) -> list[int]:
        return version_numbers(self._model_dir(name))

    def _load_verified(self, meta: ModelMetadata) -> LoadedModel:
        path = self.root / meta.name / str(meta.version) / meta.file
        booster = load_verified(path, meta, max_bytes=self.max_model_bytes)
        return LoadedModel(booster=booster, metadata=meta, path=path)

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
            data = meta_path.read_bytes()
        except FileNotFoundError as exc:
            raise ModelIntegrityError(
                f"{meta_path} is missing, so {name}@{version} cannot be verified; restore it "
                f"or register the model again"
            ) from exc
        return parse_metadata(data, str(meta_path), name, version)

    def _read_aliases(self, model_dir: Path) -> dict[str, int]:
        path = model_dir / ALIASES_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return {}
        return parse_aliases(data, str(path))

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
