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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickletools
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pydantic
import pydantic_core
import xgboost
from pydantic import ConfigDict, Field

ModelFormat = Literal["ubj", "json"]

DEFAULT_ALIAS = "champion"
"""The alias a bare model name (``"fraud"``) and ``ref=None`` resolve to."""

METADATA_FILE = "metadata.json"
ALIASES_FILE = "aliases.json"
_LOCK_FILE = ".aliases.lock"
_TMP_PREFIX = ".tmp-"
_FORMATS: tuple[ModelFormat, ...] = ("ubj", "json")

MAX_MODEL_BYTES_ENV = "STAGELINE_MAX_MODEL_BYTES"
DEFAULT_MAX_MODEL_BYTES = 512 * 2**20
"""Largest model file loaded or registered (``$STAGELINE_MAX_MODEL_BYTES`` overrides it).
A file is loaded into memory whole; one past this is refused before a byte is read."""

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# Starting with a letter keeps aliases apart from version numbers ("3").
_ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_VERSION_RE = re.compile(r"[0-9]+")


class RegistryError(Exception):
    """Any registry failure. The message names the file or model and what to do next."""


class ModelNotFoundError(RegistryError):
    """No such model name, version or alias."""


class ModelIntegrityError(RegistryError):
    """A stored file is missing, altered, a pickle, or not an XGBoost model."""


class ModelMetadata(pydantic.BaseModel):
    """What the registry records about one model version (``metadata.json``)."""

    model_config = ConfigDict(
        frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True
    )

    name: str = Field(pattern=_NAME_RE.pattern)
    """Model name, the directory under the registry root."""
    version: int = Field(ge=1)
    """Version number, assigned by the registry on register."""
    format: ModelFormat
    """XGBoost serialization of the model file: ``ubj`` (UBJSON) or ``json``."""
    file: str
    """Model file name inside the version directory, e.g. ``model.ubj``."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex sha256 of the model file, checked on every load."""
    size_bytes: int = Field(ge=0)
    """Size of the model file, checked before it is read."""
    features: tuple[str, ...] = Field(min_length=1)
    """Feature names in the column order the model expects."""
    encoders: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Category encoders fitted at training time; opaque to the registry."""
    threshold: float = 0.5
    """Decision threshold applied to the model's score."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Evaluation metrics recorded at training time."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Training parameters, free-form."""
    description: str = ""
    """Free text for humans."""
    created_at: datetime
    """When the version was registered (timezone-aware, UTC)."""

    @pydantic.field_validator("file")
    @classmethod
    def _bare_file_name(cls, value: str) -> str:
        # The name is joined onto the version dir; a path here could escape it.
        if not value or value.startswith(".") or Path(value).name != value or "\\" in value:
            raise ValueError(f"file must be a plain file name like 'model.ubj', got {value!r}")
        return value

    @pydantic.field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("created_at must be timezone-aware")
        return value.astimezone(timezone.utc)


@dataclass(frozen=True)
class LoadedModel:
    """A booster loaded and verified against its metadata."""

    booster: xgboost.Booster
    metadata: ModelMetadata
    path: Path
    """The model file the booster was loaded from."""


def parse_model_ref(ref: str) -> tuple[str, str | int]:
    """Split a model reference into ``(name, alias or version)``.

    ``"fraud@champion"`` -> ``("fraud", "champion")``; ``"fraud@3"`` ->
    ``("fraud", 3)``; ``"fraud"`` -> ``("fraud", "champion")``. Anything else
    raises :class:`RegistryError`.
    """
    hint = "write it as '<name>', '<name>@<alias>' or '<name>@<version>', e.g. 'fraud@champion'"
    if not isinstance(ref, str) or ref.count("@") > 1:
        raise RegistryError(f"bad model reference {ref!r}: {hint}")
    name, at, tail = ref.partition("@")
    if not _NAME_RE.fullmatch(name):
        raise RegistryError(
            f"bad model reference {ref!r}: model names are lowercase letters, digits, "
            f"'_', '-' and '.'; {hint}"
        )
    if not at:
        return name, DEFAULT_ALIAS
    if _VERSION_RE.fullmatch(tail) and int(tail) >= 1:
        return name, int(tail)
    if _ALIAS_RE.fullmatch(tail):
        return name, tail
    raise RegistryError(
        f"bad model reference {ref!r}: {tail!r} is neither a version number from 1 nor an "
        f"alias (a lowercase letter, then letters, digits, '_' or '-'); {hint}"
    )


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
        threshold: float = 0.5,
        metrics: Mapping[str, float] | None = None,
        params: Mapping[str, Any] | None = None,
        description: str = "",
        format: ModelFormat = "ubj",
        aliases: Sequence[str] = (),
    ) -> ModelMetadata:
        """Store ``booster`` as the next version of ``name`` and return its metadata.

        ``features`` become the booster's feature names (a booster that already
        has different names is refused). ``aliases`` are pointed at the new
        version once it is in place.
        """
        _check_name(name, what="register()")
        features = _check_features(name, booster, features)
        if format not in _FORMATS:
            raise RegistryError(
                f"register({name!r}): format must be 'ubj' or 'json', got {format!r}"
            )
        if isinstance(aliases, str):
            raise RegistryError(
                f"register({name!r}): aliases must be a list of names, e.g. ['champion']"
            )
        for alias in aliases:
            _check_alias(alias, what=f"register({name!r})")

        booster.feature_names = list(features)
        raw = bytes(booster.save_raw(raw_format=format))
        if len(raw) > self.max_model_bytes:
            raise RegistryError(
                f"register({name!r}): the model is {len(raw)} bytes, over the "
                f"{self.max_model_bytes}-byte limit on model files; raise "
                f"${MAX_MODEL_BYTES_ENV} where it is registered and served"
            )
        try:
            # Validated and serialized before a version is claimed, so bad metadata
            # (e.g. a numpy array in params) leaves no trace in the registry.
            meta = ModelMetadata(
                name=name,
                version=1,
                format=format,
                file=f"model.{format}",
                sha256=hashlib.sha256(raw).hexdigest(),
                size_bytes=len(raw),
                features=features,
                encoders={k: dict(v) for k, v in (encoders or {}).items()},
                threshold=threshold,
                metrics=dict(metrics or {}),
                params=dict(params or {}),
                description=description,
                created_at=datetime.now(timezone.utc),
            )
            meta.model_dump_json()
        except (pydantic.ValidationError, pydantic_core.PydanticSerializationError) as exc:
            raise RegistryError(
                f"register({name!r}): metadata is invalid or not JSON-serializable; "
                f"pass plain str/int/float/list/dict values:\n{exc}"
            ) from exc

        model_dir = self.root / name
        model_dir.mkdir(parents=True, exist_ok=True)
        version, version_dir = self._claim_version(model_dir)
        meta = meta.model_copy(update={"version": version})
        tmp_dir = model_dir / f"{_TMP_PREFIX}{version}-{uuid.uuid4().hex}"
        try:
            tmp_dir.mkdir()
            _write_durably(tmp_dir / meta.file, raw)
            _write_durably(tmp_dir / METADATA_FILE, meta.model_dump_json(indent=2).encode())
            _fsync_dir(tmp_dir)
            # POSIX rename replaces the empty claimed directory atomically.
            os.rename(tmp_dir, version_dir)
            _fsync_dir(model_dir)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                version_dir.rmdir()  # only succeeds while still an empty claim
            raise

        if aliases:
            self._update_aliases(
                name, lambda current: {**current, **dict.fromkeys(aliases, version)}
            )
        return meta

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``alias`` of ``name`` at ``version``, which must exist."""
        _check_alias(alias, what=f"set_alias({name!r})")
        version = _check_version(version, what=f"set_alias({name!r}, {alias!r})")
        self._read_metadata(name, version)  # raises if the version does not exist
        self._update_aliases(name, lambda current: {**current, alias: version})

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove ``alias`` of ``name``; an unknown alias raises ModelNotFoundError."""
        _check_alias(alias, what=f"delete_alias({name!r})")

        def drop(current: dict[str, int]) -> dict[str, int]:
            if alias not in current:
                raise ModelNotFoundError(
                    f"model {name!r} has no alias {alias!r} to delete "
                    f"(its aliases: {_listing(current)}); see LocalRegistry.aliases({name!r})"
                )
            return {k: v for k, v in current.items() if k != alias}

        self._update_aliases(name, drop)

    # -- reading -----------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the registered models, sorted."""
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)
        )

    def versions(self, name: str) -> list[ModelMetadata]:
        """Metadata of every complete version of ``name``, by version number."""
        model_dir = self._model_dir(name)
        return [self._read_metadata(name, v) for v in _version_numbers(model_dir)]

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
        if isinstance(ref, str) and _VERSION_RE.fullmatch(ref):
            ref = int(ref)
        if isinstance(ref, int):
            return self._read_metadata(name, _check_version(ref, what=f"{name}@{ref}"))
        _check_alias(ref, what=f"{name}@{ref}")
        current = self.aliases(name)
        if ref not in current:
            versions = _version_numbers(self.root / name)
            raise ModelNotFoundError(
                f"model {name!r} has no alias {ref!r} (aliases: {_listing(current)}; "
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
        where = f"{name}@{meta.version}"
        path = self.root / name / str(meta.version) / meta.file
        reregister = f"re-register {where} from its training run with LocalRegistry.register()"
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size != meta.size_bytes:
                    raise ModelIntegrityError(
                        f"{path} ({where}) is {size} bytes but its {METADATA_FILE} records "
                        f"{meta.size_bytes}; the file was truncated or replaced - {reregister}"
                    )
                if size > self.max_model_bytes:
                    raise ModelIntegrityError(
                        f"{path} ({where}) is {size} bytes, over the {self.max_model_bytes}-byte "
                        f"limit on model files, and was not read; if the model is genuine, "
                        f"raise ${MAX_MODEL_BYTES_ENV}"
                    )
                # One byte more than expected tells us if the file grew since fstat.
                raw = f.read(meta.size_bytes + 1)
        except FileNotFoundError as exc:
            raise ModelIntegrityError(
                f"model file {path} ({where}) is missing; restore it or {reregister}"
            ) from exc
        except IsADirectoryError as exc:
            raise ModelIntegrityError(f"{path} ({where}) is a directory; {reregister}") from exc
        if len(raw) != meta.size_bytes:
            raise ModelIntegrityError(
                f"{path} ({where}) changed size while being read; retry, and if it persists "
                f"{reregister}"
            )
        if _looks_like_pickle(raw):
            raise ModelIntegrityError(
                f"{path} ({where}) is a Python pickle; stageline never loads pickle (unpickling "
                'runs arbitrary code). Re-save the model with booster.save_model("model.ubj") '
                "and register it again"
            )
        digest = hashlib.sha256(raw).hexdigest()
        if digest != meta.sha256:
            raise ModelIntegrityError(
                f"{path} ({where}) has sha256 {digest} but its {METADATA_FILE} records "
                f"{meta.sha256}; the file was modified after registration - {reregister}"
            )
        if raw[:1] != b"{":
            raise ModelIntegrityError(
                f"{path} ({where}) is not an XGBoost JSON/UBJSON model; save models with "
                'booster.save_model("model.ubj") and register them again'
            )
        booster = xgboost.Booster()
        try:
            booster.load_model(bytearray(raw))
        # XGBoost raises XGBoostError for most bad input, but also e.g.
        # UnicodeDecodeError while decoding its own error text.
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            raise ModelIntegrityError(
                f"XGBoost cannot load {path} ({where}): {first_line}; the file is not a valid "
                f"XGBoost model - {reregister}"
            ) from exc
        loaded_features = tuple(booster.feature_names or ())
        if loaded_features != meta.features:
            raise ModelIntegrityError(
                f"{path} ({where}) has feature names {list(loaded_features)} but its "
                f"{METADATA_FILE} records {list(meta.features)}; {reregister}"
            )
        return LoadedModel(booster=booster, metadata=meta, path=path)

    # -- internals ---------------------------------------------------------

    def _model_dir(self, name: str) -> Path:
        _check_name(name, what=f"model {name!r}")
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
            known = ", ".join(map(str, _version_numbers(self.root / name))) or "none"
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
            and _ALIAS_RE.fullmatch(k)
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
        with _locked(model_dir / _LOCK_FILE):
            updated = change(self._read_aliases(model_dir))
            tmp = model_dir / f"{_TMP_PREFIX}{ALIASES_FILE}-{uuid.uuid4().hex}"
            try:
                _write_durably(tmp, json.dumps(dict(sorted(updated.items())), indent=2).encode())
                os.replace(tmp, model_dir / ALIASES_FILE)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            _fsync_dir(model_dir)

    @staticmethod
    def _claim_version(model_dir: Path) -> tuple[int, Path]:
        version = max(_version_numbers(model_dir, include_claims=True), default=0) + 1
        while True:
            version_dir = model_dir / str(version)
            try:
                os.mkdir(version_dir)
            except FileExistsError:
                version += 1  # a concurrent register got there first
                continue
            return version, version_dir


def _version_numbers(model_dir: Path, *, include_claims: bool = False) -> list[int]:
    """Sorted version numbers under ``model_dir``; empty claims only if asked."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if _VERSION_RE.fullmatch(p.name) and p.is_dir() and (include_claims or any(p.iterdir()))
    )


def _check_name(name: object, *, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise RegistryError(
            f"{what}: bad model name {name!r}; use lowercase letters, digits, '_', '-' "
            "and '.', starting with a letter or digit (at most 64 characters), e.g. 'fraud'"
        )
    return name


def _check_alias(alias: object, *, what: str) -> str:
    if not isinstance(alias, str) or not _ALIAS_RE.fullmatch(alias):
        raise RegistryError(
            f"{what}: bad alias {alias!r}; an alias is a lowercase letter followed by "
            "letters, digits, '_' or '-' (never a number), e.g. 'champion'"
        )
    return alias


def _check_version(version: object, *, what: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"{what}: versions are whole numbers from 1, got {version!r}")
    return version


def _check_features(
    name: str, booster: xgboost.Booster, features: Sequence[str]
) -> tuple[str, ...]:
    what = f"register({name!r})"
    if isinstance(features, str):
        raise RegistryError(f"{what}: features must be a list of column names, not one string")
    result = tuple(features)
    if not result or not all(isinstance(f, str) and f for f in result):
        raise RegistryError(f"{what}: features must be a non-empty list of column names")
    duplicates = sorted({f for f in result if result.count(f) > 1})
    if duplicates:
        raise RegistryError(f"{what}: duplicate feature names {duplicates}; list each once")
    current = booster.feature_names
    if current is not None and tuple(current) != result:
        raise RegistryError(
            f"{what}: the booster was trained on features {list(current)} but features="
            f"{list(result)}; pass the booster's features in its training order"
        )
    if booster.num_features() != len(result):
        raise RegistryError(
            f"{what}: the booster expects {booster.num_features()} features but "
            f"{len(result)} were given; pass all of them in training order"
        )
    return result


def _looks_like_pickle(raw: bytes) -> bool:
    """True if ``raw`` is a pickle. Parses opcodes only; never unpickles."""
    if raw[:1] == b"\x80":  # PROTO, the first opcode of every protocol >= 2 pickle
        return True
    if raw[:1] in (b"", b"{"):  # '{' is not a pickle opcode
        return False
    # Protocols 0 and 1 have no header: it is a pickle if it parses up to STOP.
    try:
        for opcode, _arg, _pos in pickletools.genops(raw):
            if opcode.name == "STOP":
                return True
    except Exception:
        return False
    return False


def _listing(aliases: Mapping[str, int]) -> str:
    return ", ".join(f"{k}->{v}" for k, v in aliases.items()) or "none"


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable; some filesystems refuse fsync on directories.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock so concurrent alias updates do not lose each other's writes."""
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
