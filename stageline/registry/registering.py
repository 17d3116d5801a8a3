"""What ``LocalRegistry.register`` checks before it claims a version, and the metadata
it writes: the arguments a user hands it, the booster's task, its features."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pydantic
import pydantic_core
import xgboost

from stageline.registry.metadata import (
    DEFAULT_THRESHOLD,
    FORMATS,
    TASKS,
    ModelFormat,
    ModelMetadata,
    RegistryError,
    Task,
    ThresholdDefault,
    check_alias,
    check_name,
    objective,
    task_problem,
    tasks_of,
)


@dataclass(frozen=True)
class TaskArgs:
    """``register``'s task, threshold and classes, checked against the booster."""

    task: Task
    threshold: float | None
    classes: tuple[str, ...] | None


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


def check_task_args(
    name: str,
    booster: xgboost.Booster,
    task: Task | None,
    threshold: float | ThresholdDefault | None,
    classes: Sequence[str] | None,
) -> TaskArgs:
    """``register``'s task (``None``: the one the booster's objective implies), threshold
    and classes, checked against each other and the booster."""
    what = f"register({name!r})"
    trained, num_class, num_target = objective(booster)
    fits = tasks_of(trained)
    if task is None:
        if len(fits) > 1:
            raise RegistryError(
                f"{what}: a {trained} model can serve {' or '.join(fits)}; say which with "
                f"task={fits[0]!r} or task={fits[1]!r}"
            )
        task = fits[0]
    elif task not in TASKS:
        raise RegistryError(f"{what}: task must be one of {list(TASKS)}, got {task!r}")
    elif task not in fits:
        raise RegistryError(
            f"{what}: task={task!r} but the booster was trained with objective {trained!r}, "
            f"a {' or '.join(fits)} objective; pass task={fits[0]!r} or retrain it"
        )
    if threshold is DEFAULT_THRESHOLD:
        threshold = 0.5 if task == "binary" else None
    elif threshold is None and task == "binary":
        raise RegistryError(
            f"{what}: a binary model needs a threshold (label is true at or over it); pass "
            "threshold=0.5, or the one chosen on held-out data"
        )
    elif threshold is not None and task != "binary":
        raise RegistryError(
            f"{what}: a {task} model has no threshold (only binary models do); "
            f"drop threshold={threshold!r}"
        )
    if num_target > 1:
        raise RegistryError(
            f"{what}: the booster predicts {num_target} targets (several quantiles or a "
            "multi-output model); stageline serves one prediction per row: train one model "
            "per target"
        )
    if task == "multiclass":
        if classes is None:
            classes = [str(i) for i in range(num_class)]
        elif isinstance(classes, str):
            raise RegistryError(f"{what}: classes must be a list of names, e.g. ['low', 'high']")
        elif num_class and len(classes) != num_class:
            raise RegistryError(
                f"{what}: the booster has {num_class} classes but {len(classes)} class names "
                f"were given ({list(classes)}); name each class, in the order of its labels"
            )
    problem = task_problem(task, threshold, classes)
    if problem:
        raise RegistryError(f"{what}: {problem}")
    return TaskArgs(task, threshold, tuple(classes) if classes is not None else None)


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
    task: TaskArgs,
    metrics: Mapping[str, float] | None,
    params: Mapping[str, Any] | None,
    description: str,
    profile: Mapping[str, Any] | None = None,
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
            task=task.task,
            threshold=task.threshold,
            classes=task.classes,
            metrics=dict(metrics or {}),
            params=dict(params or {}),
            profile=dict(profile or {}),
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
