"""How ``stageline train`` trains the pipeline's model: the ``training:`` section."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator

from stageline.spec_base import SpecModel

OBJECTIVES = ("binary:", "reg:")
"""The XGBoost objective families ``stageline train`` evaluates (binary and regression)."""


class TrainingSpec(SpecModel):
    """Training the model stage's model from labelled events (``stageline train``)."""

    label: str
    """The events' column that holds the outcome: 1/0 or true/false for a binary
    objective, a number for a regression one."""
    objective: str = "binary:logistic"
    """XGBoost's objective: a ``binary:`` one (a score and a threshold) or a ``reg:`` one."""
    params: dict[str, Any] = {}
    """Further XGBoost training parameters (``max_depth``, ``eta``, ``seed``...)."""
    rounds: int = Field(default=100, ge=1, le=100_000)
    """Boosting rounds."""
    holdout: float = Field(default=0.2, gt=0, lt=1)
    """The newest share of the events (by ``request.event_time``) held out to evaluate the
    model, as production meets it: on a future it has not seen."""
    categorical: tuple[str, ...] | None = None
    """Columns encoded as categories (the encoding is fitted on the training part, stored
    with the model and applied when it serves). Default: the request's ``category``
    fields."""
    features: tuple[str, ...] | None = None
    """The model's features, in order. Default: the numeric request fields (not the id),
    every numeric column the stages before the model add, then the encoded categories."""

    @field_validator("objective")
    @classmethod
    def _objective(cls, value: str) -> str:
        if not value.startswith(OBJECTIVES):
            raise ValueError(
                f"objective {value!r}: stageline train takes a binary: or reg: objective "
                "(a multiclass model is trained elsewhere and registered with "
                "stageline registry register)"
            )
        return value

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "objective" in value:
            raise ValueError("give the objective as training.objective, not in params")
        return value
