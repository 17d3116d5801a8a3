"""What the registry records about a model version, and the names it accepts.

Every argument a user hands the registry (a model name, an alias, a version, a
reference like ``fraud@champion``) is checked here, and a bad one raises a
:class:`RegistryError` that shows the expected form.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pydantic
import pydantic_core
import xgboost
from pydantic import ConfigDict, Field

ModelFormat = Literal["ubj", "json"]
FORMATS: tuple[ModelFormat, ...] = ("ubj", "json")

DEFAULT_ALIAS = "champion"
"""The alias a bare model name (``"fraud"``) and ``ref=None`` resolve to."""

METADATA_FILE = "metadata.json"

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# Starting with a letter keeps aliases apart from version numbers ("3").
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
VERSION_RE = re.compile(r"[0-9]+")


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

    name: str = Field(pattern=NAME_RE.pattern)
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
    if not NAME_RE.fullmatch(name):
        raise RegistryError(
            f"bad model reference {ref!r}: model names are lowercase letters, digits, "
            f"'_', '-' and '.'; {hint}"
        )
    if not at:
        return name, DEFAULT_ALIAS
    if VERSION_RE.fullmatch(tail) and int(tail) >= 1:
        return name, int(tail)
    if ALIAS_RE.fullmatch(tail):
        return name, tail
    raise RegistryError(
        f"bad model reference {ref!r}: {tail!r} is neither a version number from 1 nor an "
        f"alias (a lowercase letter, then letters, digits, '_' or '-'); {hint}"
    )


def check_name(name: object, *, what: str) -> str:
    return _matching(
        name, NAME_RE, f"{what}: bad model name {name!r}; use lowercase letters, digits, "
        "'_', '-' and '.', starting with a letter or digit (at most 64 characters), e.g. 'fraud'",
    )  # fmt: skip


def check_alias(alias: object, *, what: str) -> str:
    return _matching(
        alias, ALIAS_RE, f"{what}: bad alias {alias!r}; an alias is a lowercase letter "
        "followed by letters, digits, '_' or '-' (never a number), e.g. 'champion'",
    )  # fmt: skip


def _matching(value: object, pattern: re.Pattern[str], error: str) -> str:
    """``value`` if it is a string that ``pattern`` matches whole, else a RegistryError."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise RegistryError(error)
    return value


def check_version(version: object, *, what: str) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RegistryError(f"{what}: versions are whole numbers from 1, got {version!r}")
    return version


def check_register_args(
    name: str,
    booster: xgboost.Booster,
    features: Sequence[str],
    format: ModelFormat,
    aliases: Sequence[str],
) -> tuple[str, ...]:
    """Everything ``register`` is given that it can check up front; the features as a tuple."""
    check_name(name, what="register()")
    checked = _check_features(name, booster, features)
    if format not in FORMATS:
        raise RegistryError(f"register({name!r}): format must be 'ubj' or 'json', got {format!r}")
    if isinstance(aliases, str):
        raise RegistryError(
            f"register({name!r}): aliases must be a list of names, e.g. ['champion']"
        )
    for alias in aliases:
        check_alias(alias, what=f"register({name!r})")
    return checked


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


def new_metadata(
    name: str,
    raw: bytes,
    *,
    format: ModelFormat,
    features: tuple[str, ...],
    encoders: Mapping[str, Mapping[str, Any]] | None,
    threshold: float,
    metrics: Mapping[str, float] | None,
    params: Mapping[str, Any] | None,
    description: str,
) -> ModelMetadata:
    """Metadata of a model about to be registered (version 1 until one is claimed).

    Validated and serialized before a version is claimed, so bad metadata (e.g. a
    numpy array in params) leaves no trace in the registry.
    """
    try:
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
    return meta


def listing(aliases: Mapping[str, int]) -> str:
    """``champion->1, challenger->2``, or ``none``: for error messages."""
    return ", ".join(f"{k}->{v}" for k, v in aliases.items()) or "none"
