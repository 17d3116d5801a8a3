"""What the registry records about a model version, and the names it accepts.

Every argument a user hands the registry (a model name, an alias, a version, a
reference like ``fraud@champion``) is checked here, and a bad one raises a
:class:`RegistryError` that shows the expected form.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pydantic
import xgboost
from pydantic import ConfigDict, Field

ModelFormat = Literal["ubj", "json"]
FORMATS: tuple[ModelFormat, ...] = ("ubj", "json")

Task = Literal["binary", "regression", "multiclass"]
"""What a model predicts: a score against a threshold, a number, or one of several classes."""
TASKS: tuple[Task, ...] = ("binary", "regression", "multiclass")


class ThresholdDefault(enum.Enum):
    """The type of :data:`DEFAULT_THRESHOLD`: "not given", apart from an explicit None."""

    THRESHOLD = "0.5 for a binary model, none for the others"


DEFAULT_THRESHOLD = ThresholdDefault.THRESHOLD
"""``register``'s threshold when none is given: 0.5 for a binary model, none otherwise."""

DEFAULT_ALIAS = "champion"
"""The alias a bare model name (``"fraud"``) and ``ref=None`` resolve to."""

METADATA_FILE = "metadata.json"
MLFLOW_REF_PREFIX = "models:/"
"""MLflow's model URIs (``models:/fraud@champion``, ``models:/fraud/3``) are model refs too."""

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# Starting with a letter keeps aliases apart from version numbers ("3").
ALIAS_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
VERSION_RE = re.compile(r"[0-9]+")
# A class name becomes part of a column name (``score_p_<class>``) and an output's name.
CLASS_RE = re.compile(r"[A-Za-z0-9_]{1,64}")


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
    task: Task = "binary"
    """What the model predicts: ``binary`` (a score and a threshold), ``regression`` (a
    number) or ``multiclass`` (a probability per class). Metadata written before tasks
    were recorded is binary."""
    threshold: float | None = None
    """Decision threshold applied to a binary model's score (0.5 if left out); none for
    the other tasks."""
    classes: tuple[str, ...] | None = None
    """A multiclass model's class names, in the order of its outputs (class ``i`` is
    ``classes[i]``); none for the other tasks."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Evaluation metrics recorded at training time, any names (``auc``, ``rmse``,
    ``mlogloss``...), in the order given: listings show the first ones."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Training parameters, free-form."""
    profile: dict[str, Any] = Field(default_factory=dict)
    """What the model was trained on, for monitoring: each feature's and the score's
    histogram (``stageline.training.profile``); empty for a model registered without."""
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

    @pydantic.model_validator(mode="before")
    @classmethod
    def _binary_default_threshold(cls, data: Any) -> Any:
        # Before tasks, a threshold left out meant 0.5: metadata of that time still does.
        if isinstance(data, dict) and data.get("task", "binary") == "binary":
            return {"threshold": 0.5, **data}
        return data

    @pydantic.model_validator(mode="after")
    def _fits_task(self) -> ModelMetadata:
        problem = task_problem(self.task, self.threshold, self.classes)
        if problem:
            raise ValueError(problem)
        return self

    def metrics_summary(self, limit: int = 3) -> str:
        """The first ``limit`` metrics as recorded, ``auc 0.912, logloss 0.301``, or ``-``."""
        shown = [f"{k} {v:.3g}" for k, v in list(self.metrics.items())[:limit]]
        more = len(self.metrics) - limit
        return ", ".join(shown) + (f" (+{more})" if more > 0 else "") if shown else "-"


def task_problem(task: Task, threshold: float | None, classes: Sequence[str] | None) -> str:
    """What is wrong with this threshold and these classes for ``task``, or ``""``."""
    if task == "binary" and threshold is None:
        return "a binary model needs a threshold (label is true at or over it)"
    if task != "binary" and threshold is not None:
        return f"a {task} model has no threshold (got {threshold}); only binary models do"
    if task == "multiclass":
        if classes is None or len(classes) < 2:
            return f"a multiclass model needs at least two class names, got {classes!r}"
        bad = [c for c in classes if not isinstance(c, str) or not CLASS_RE.fullmatch(c)]
        if bad:
            return (
                f"class names {bad} are not letters, digits and '_' (at most 64); they "
                "name columns like score_p_<class>"
            )
        duplicates = sorted({c for c in classes if list(classes).count(c) > 1})
        if duplicates:
            return f"duplicate class names {duplicates}; name each class once"
    elif classes is not None:
        return f"only a multiclass model has class names; a {task} model got {list(classes)}"
    return ""


def objective(booster: xgboost.Booster) -> tuple[str, int, int]:
    """The booster's objective (``binary:logistic``), its number of classes (0 unless
    multiclass) and of targets."""
    learner = json.loads(booster.save_config())["learner"]
    params = learner["learner_model_param"]
    return learner["objective"]["name"], int(params["num_class"]), int(params["num_target"])


def tasks_of(objective: str) -> tuple[Task, ...]:
    """The tasks a model trained with ``objective`` can serve; an unknown one, any."""
    if objective == "reg:logistic":  # a probability: a binary score or a regressed rate
        return ("binary", "regression")
    family = objective.partition(":")[0]
    one: dict[str, Task] = {
        "binary": "binary",
        "multi": "multiclass",
        "reg": "regression",
        "count": "regression",
        "survival": "regression",
        "rank": "regression",
    }
    return (one[family],) if family in one else TASKS


@dataclass(frozen=True)
class LoadedModel:
    """A booster loaded and verified against its metadata."""

    booster: xgboost.Booster
    metadata: ModelMetadata
    path: Path | str
    """The model file the booster was loaded from: a local path, or a URI on object
    storage."""


def parse_model_ref(ref: str) -> tuple[str, str | int]:
    """Split a model reference into ``(name, alias or version)``.

    ``"fraud@champion"`` -> ``("fraud", "champion")``; ``"fraud@3"`` ->
    ``("fraud", 3)``; ``"fraud"`` -> ``("fraud", "champion")``. MLflow's forms
    mean the same: ``"models:/fraud@champion"``, ``"models:/fraud/3"``. Anything
    else raises :class:`RegistryError`.
    """
    hint = "write it as '<name>', '<name>@<alias>' or '<name>@<version>', e.g. 'fraud@champion'"
    if not isinstance(ref, str) or ref.count("@") > 1:
        raise RegistryError(f"bad model reference {ref!r}: {hint}")
    if ref.startswith(MLFLOW_REF_PREFIX):
        body = ref.removeprefix(MLFLOW_REF_PREFIX)
        name, slash, version = body.partition("/")
        if slash and ("@" in name or not VERSION_RE.fullmatch(version)):
            raise RegistryError(
                f"bad model reference {ref!r}: MLflow's forms are 'models:/<name>@<alias>' "
                "and 'models:/<name>/<version>'"
            )
        ref = f"{name}@{version}" if slash else body
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


def listing(aliases: Mapping[str, int]) -> str:
    """``champion->1, challenger->2``, or ``none``: for error messages."""
    return ", ".join(f"{k}->{v}" for k, v in aliases.items()) or "none"


def parse_aliases(data: bytes, where: str) -> dict[str, int]:
    """A model's aliases file (``{"champion": 1}``) read from ``data``, sorted; what is
    wrong with it, naming ``where``, as a :class:`ModelIntegrityError`."""
    try:
        aliases = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelIntegrityError(
            f"{where} is not valid JSON ({exc}); fix it by hand, or delete it and set the "
            "aliases again with set_alias()"
        ) from exc
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str)
        and ALIAS_RE.fullmatch(k)
        and isinstance(v, int)
        and not isinstance(v, bool)
        and v >= 1
        for k, v in aliases.items()
    ):
        raise ModelIntegrityError(
            f"{where} must map alias names to version numbers, like "
            '{"champion": 1}; fix it by hand, or delete it and set the aliases again'
        )
    return dict(sorted(aliases.items()))


def parse_metadata(data: bytes, where: str, name: str, version: int) -> ModelMetadata:
    """``name@version``'s metadata read from ``data`` (the file at ``where``); what is
    wrong with it as a :class:`ModelIntegrityError`."""
    try:
        meta = ModelMetadata.model_validate_json(data)
    except (pydantic.ValidationError, UnicodeDecodeError) as exc:
        raise ModelIntegrityError(
            f"{where} is not valid metadata for {name}@{version}; restore it or "
            f"register the model again:\n{exc}"
        ) from exc
    if meta.name != name or meta.version != version:
        raise ModelIntegrityError(
            f"{where} describes {meta.name}@{meta.version}, not {name}@{version}; "
            "it was copied or moved by hand - restore it or register the model again"
        )
    return meta
