"""The model registry on object storage (``s3://bucket/prefix``), through ``pyarrow.fs``.

The layout is the local registry's, so a registry folder copied into a bucket
(``aws s3 sync .stageline/models s3://bucket/models``) is served as it is::

    <root>/<name>/<version>/model.ubj        (or model.json)
    <root>/<name>/<version>/metadata.json
    <root>/<name>/aliases.json

Object storage has no rename and no directories, so publishing is ordered instead:
the model file first, then ``metadata.json`` (each a single PUT, which S3 makes
visible whole or not at all), then the aliases. A version counts once its
metadata exists, so a reader never sees a half-written version, and an alias only
ever points at a complete one. Loading checks the size, the sha256 and the format
exactly as the local registry does.

Object storage offers no lock either: registers and alias changes to one registry
should come from one writer at a time (a training job, CI). A register that finds
its version taken by a concurrent one fails with a message instead of overwriting
it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pyarrow.fs as pafs

from stageline.registry.base import ModelRegistry
from stageline.registry.integrity import check_stored_size, verified_booster
from stageline.registry.local import ALIASES_FILE
from stageline.registry.metadata import (
    METADATA_FILE,
    NAME_RE,
    VERSION_RE,
    LoadedModel,
    ModelIntegrityError,
    ModelMetadata,
    ModelNotFoundError,
    RegistryError,
    check_name,
    parse_aliases,
    parse_metadata,
)
from stageline.storage import StorageError, check_bucket, join, open_location, storage_problem


class ObjectStoreRegistry(ModelRegistry):
    """Versioned XGBoost models with aliases under an object-storage URI.

    Construction does no I/O. An unreachable endpoint, missing credentials or a
    missing bucket raise :class:`RegistryError` naming the URI and what to check.
    """

    def __init__(self, uri: str, *, max_model_bytes: int | None = None) -> None:
        super().__init__(max_model_bytes=max_model_bytes)
        self.uri = uri.rstrip("/")
        try:
            self._fs, self._root = open_location(self.uri)
        except StorageError as exc:
            raise RegistryError(f"model registry {self.uri}: {exc}") from exc

    def __repr__(self) -> str:
        return f"ObjectStoreRegistry({self.uri!r})"

    @property
    def location(self) -> str:
        return self.uri

    # -- reading -----------------------------------------------------------

    def models(self) -> list[str]:
        return sorted(
            info.base_name
            for info in self._list(self._root)
            if info.type == pafs.FileType.Directory and NAME_RE.fullmatch(info.base_name)
        )

    def aliases(self, name: str) -> dict[str, int]:
        check_name(name, what=f"model {name!r}")
        location = self._uri(name, ALIASES_FILE)
        data = self._read(self._path(name, ALIASES_FILE))
        if data is None:
            self._known_versions(name)  # no aliases yet, or no such model: say which
            return {}
        return parse_aliases(data, location)

    # -- what the base class needs -------------------------------------------

    def _known_versions(self, name: str) -> list[int]:
        check_name(name, what=f"model {name!r}")
        files = self._list(self._path(name), recursive=True)
        if not files:
            raise ModelNotFoundError(
                f"no model {name!r} in registry {self.uri} (models: "
                f"{', '.join(self.models()) or 'none'}); check the name or register it first"
            )
        prefix = self._path(name) + "/"
        complete = set()
        for info in files:
            version, _, file = info.path.removeprefix(prefix).partition("/")
            if file == METADATA_FILE and VERSION_RE.fullmatch(version):
                complete.add(int(version))
        return sorted(complete)

    def _read_metadata(self, name: str, version: int) -> ModelMetadata:
        check_name(name, what=f"model {name!r}")
        location = self._uri(name, str(version), METADATA_FILE)
        data = self._read(self._path(name, str(version), METADATA_FILE))
        if data is None:
            known = ", ".join(map(str, self._known_versions(name))) or "none"
            raise ModelNotFoundError(
                f"model {name!r} has no version {version} in {self.uri} (versions: {known}); "
                f"pick one of those or see the registry's versions({name!r})"
            )
        return parse_metadata(data, location, name, version)

    def _update_aliases(
        self, name: str, change: Callable[[dict[str, int]], dict[str, int]]
    ) -> None:
        updated = change(self.aliases(name))
        data = json.dumps(dict(sorted(updated.items())), indent=2).encode()
        self._write(self._path(name, ALIASES_FILE), data)

    def _store_new_version(self, meta: ModelMetadata, raw: bytes) -> ModelMetadata:
        files = self._list(self._path(meta.name), recursive=True)
        prefix = self._path(meta.name) + "/"
        # Any object under a version's prefix claims it, complete or not: a register that
        # crashed half-way leaves its number unused rather than reused.
        taken = {
            int(version)
            for info in files
            if VERSION_RE.fullmatch(version := info.path.removeprefix(prefix).partition("/")[0])
        }
        version = max(taken, default=0) + 1
        meta = meta.model_copy(update={"version": version})
        body = meta.model_dump_json(indent=2).encode()
        # The model first, the metadata last: until the metadata exists the version is
        # invisible to readers (see the module docstring).
        self._write(self._path(meta.name, str(version), meta.file), raw)
        self._write(self._path(meta.name, str(version), METADATA_FILE), body)
        if self._read(self._path(meta.name, str(version), METADATA_FILE)) != body:
            raise RegistryError(
                f"register({meta.name!r}): another register took version {version} in "
                f"{self.uri} at the same time; register from one writer at a time and retry"
            )
        return meta

    def _load_verified(self, meta: ModelMetadata) -> LoadedModel:
        path = self._path(meta.name, str(meta.version), meta.file)
        location = self._uri(meta.name, str(meta.version), meta.file)
        where = f"{meta.name}@{meta.version}"
        try:
            info = self._fs.get_file_info(path)
            if info.type != pafs.FileType.File:
                raise ModelIntegrityError(
                    f"model file {location} ({where}) is missing; restore it or re-register "
                    f"{where} from its training run"
                )
            check_stored_size(location, meta, info.size, max_bytes=self.max_model_bytes)
            with self._fs.open_input_stream(path) as f:
                # One byte more than expected tells us if the object changed since.
                raw = f.read(meta.size_bytes + 1)
        except OSError as exc:
            raise self._problem(exc) from exc
        if len(raw) != meta.size_bytes:
            raise ModelIntegrityError(
                f"{location} ({where}) changed size while being read; retry, and if it "
                f"persists re-register {where}"
            )
        booster = verified_booster(location, meta, raw)
        return LoadedModel(booster=booster, metadata=meta, path=location)

    # -- storage -------------------------------------------------------------

    def _path(self, *parts: str) -> str:
        return "/".join([self._root, *parts])

    def _uri(self, *parts: str) -> str:
        return join(self.uri, *parts)

    def _problem(self, exc: OSError) -> RegistryError:
        return RegistryError(f"model registry: {storage_problem(self.uri, exc)}")

    def _list(self, path: str, *, recursive: bool = False) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
        try:
            found = list(self._fs.get_file_info(selector))
            if not found:
                check_bucket(self._fs, path, self.uri)
        except OSError as exc:
            raise self._problem(exc) from exc
        except StorageError as exc:
            raise RegistryError(f"model registry: {exc}") from exc
        return found

    def _read(self, path: str) -> bytes | None:
        """The object's bytes, or None if there is none."""
        try:
            with self._fs.open_input_stream(path) as f:
                return bytes(f.read())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._problem(exc) from exc

    def _write(self, path: str, data: bytes) -> None:
        """One object, written whole (a single PUT for the small files written here)."""
        try:
            with self._fs.open_output_stream(path) as f:
                f.write(data)
        except OSError as exc:
            raise self._problem(exc) from exc
