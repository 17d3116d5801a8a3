"""The request schema of a pipeline spec: the fields a prediction request carries.

The same rules run twice, by design: ``RequestSchema.record_model()`` is what
FastAPI validates online requests with, and ``stageline.stages.validate``
applies them to whole DataFrames in batch. The bounds below keep both
runtimes accepting exactly the same records.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    create_model,
    model_validator,
)

from stageline.spec_base import LocatedError, SpecModel

FieldType = Literal["str", "int", "float", "bool", "category", "datetime"]


class FieldSpec(SpecModel):
    """One field of the request schema."""

    type: FieldType
    """The field's type; ``category`` takes one of ``values``."""
    required: bool | None = None
    """Whether a record must carry the field. Defaults to True unless ``default`` is set."""
    default: Any = None
    """Value used when the field is missing or null (makes the field optional)."""
    ge: float | None = None
    """Numeric lower bound, inclusive."""
    gt: float | None = None
    """Numeric lower bound, exclusive."""
    le: float | None = None
    """Numeric upper bound, inclusive."""
    lt: float | None = None
    """Numeric upper bound, exclusive."""
    values: tuple[str, ...] | None = None
    """Allowed values of a ``category`` field."""
    max_length: int | None = Field(default=None, gt=0)
    """Longest allowed ``str`` value."""
    description: str = ""
    """Shown on the OpenAPI page."""

    @model_validator(mode="after")
    def _consistent(self) -> FieldSpec:
        numeric = self.type in ("int", "float")
        bounds = [b for b in ("ge", "gt", "le", "lt") if getattr(self, b) is not None]
        if bounds and not numeric:
            raise ValueError(f"bounds {bounds} only apply to int and float fields, not {self.type}")
        fractional = [b for b in bounds if not float(getattr(self, b)).is_integer()]
        if self.type == "int" and fractional:
            raise ValueError(
                f"bounds of an int field are whole numbers: {fractional[0]} is "
                f"{getattr(self, fractional[0])}"
            )
        if self.type == "category" and not self.values:
            raise ValueError("a category field needs 'values': the list of allowed categories")
        if self.type != "category" and self.values is not None:
            raise ValueError("'values' only applies to category fields")
        if self.max_length is not None and self.type != "str":
            raise ValueError("'max_length' only applies to str fields")
        if self.required and self.default is not None:
            raise ValueError("a field with a default is optional: drop 'required: true'")
        return self

    @property
    def is_required(self) -> bool:
        return self.required if self.required is not None else self.default is None


class RequestSchema(SpecModel):
    """The fields a prediction request carries, and which one identifies a record."""

    id_field: str
    """Field echoed back with every prediction (and the key of batch output)."""
    fields: dict[str, FieldSpec]
    """The fields by name, as records carry them."""
    event_time: str | None = None
    """The ``datetime`` field that says when a record happened (required in every
    record). Scoring ``--as-of`` (backfills, backtests) takes each record's features
    from the offline store as of this time, as training does; without it, scoring
    uses the online store's latest values only."""

    @model_validator(mode="after")
    def _id_present(self) -> RequestSchema:
        if self.id_field not in self.fields:
            raise ValueError(f"id_field {self.id_field!r} is not one of the fields")
        return self

    @model_validator(mode="after")
    def _event_time_is_a_datetime(self) -> RequestSchema:
        name = self.event_time
        if name is None:
            return self
        field = self.fields.get(name)
        if field is None:
            raise LocatedError(
                ("event_time",),
                f"event_time {name!r} is not one of the fields; name the datetime field "
                "that says when a record happened",
            )
        if field.type != "datetime":
            raise LocatedError(
                ("event_time",),
                f"event_time {name!r} is a {field.type} field; it must name a datetime field",
            )
        if not field.is_required and field.default is None:
            # A record without its time could not be scored as of it.
            raise LocatedError(
                ("event_time",),
                f"event_time {name!r} must be a required field (drop its 'required: false')",
            )
        return self

    def record_model(self, name: str = "Record") -> type[BaseModel]:
        """The pydantic model of one record: FastAPI validates requests with it."""
        definitions: dict[str, Any] = {
            fname: _pydantic_field(fname, f) for fname, f in self.fields.items()
        }
        model: type[BaseModel] = create_model(
            name,
            __config__=ConfigDict(
                extra="forbid", coerce_numbers_to_str=True, allow_inf_nan=False, frozen=True
            ),
            **definitions,
        )
        return model


DATETIME_MIN = datetime(1678, 1, 1, tzinfo=timezone.utc)
DATETIME_MAX = datetime(2262, 1, 1, tzinfo=timezone.utc)
"""Datetime fields take values in ``[DATETIME_MIN, DATETIME_MAX)``: what a pandas
nanosecond timestamp can hold, so every runtime accepts the same records."""

INT_LIMIT = 2**63
"""Int fields take values in ``(-INT_LIMIT, INT_LIMIT)``: what an int64 column can hold."""


def datetime_in_range(value: datetime) -> bool:
    """Whether ``value`` (naive means UTC) lies in ``[DATETIME_MIN, DATETIME_MAX)``."""
    aware = value if value.utcoffset() is not None else value.replace(tzinfo=timezone.utc)
    return DATETIME_MIN <= aware < DATETIME_MAX


def _nan_is_missing(value: Any) -> Any:
    # NaN is pandas' null: batch cannot tell it from a missing value, so neither may we.
    return None if isinstance(value, float) and math.isnan(value) else value


def _no_bool(value: Any) -> Any:
    # True is an int to Python; a bool where a number belongs is a client bug.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true or false")
    return value


def _datetime_range(value: datetime) -> datetime:
    if not datetime_in_range(value):
        raise ValueError(
            f"must be between {DATETIME_MIN:%Y-%m-%d} and {DATETIME_MAX:%Y-%m-%d} (exclusive)"
        )
    return value


def _pydantic_field(name: str, spec: FieldSpec) -> tuple[Any, Any]:
    """Annotation and default of one record field: the rules ``validate_frame`` applies too."""
    constraints: dict[str, Any] = {
        k: getattr(spec, k)
        for k in ("ge", "gt", "le", "lt", "max_length")
        if getattr(spec, k) is not None
    }
    if spec.type == "int":  # an int's bounds as ints: pydantic refuses 1e20 as a float
        constraints = {k: int(v) for k, v in constraints.items()}
    annotation: Any
    if spec.type == "category":
        annotation = Literal[tuple(spec.values or ())]
    elif spec.type == "datetime":
        annotation = Annotated[datetime, AfterValidator(_datetime_range)]
    elif spec.type == "int":
        # Constraints before validators, or the JSON schema loses minimum/maximum.
        annotation = Annotated[
            int, Field(gt=-INT_LIMIT, lt=INT_LIMIT), Field(**constraints), BeforeValidator(_no_bool)
        ]
    elif spec.type == "float":
        annotation = Annotated[float, Field(**constraints), BeforeValidator(_no_bool)]
    else:
        annotation = Annotated[{"str": str, "bool": bool}[spec.type], Field(**constraints)]
    if not spec.is_required:
        annotation = annotation | None
    default = ... if spec.is_required else spec.default
    return Annotated[annotation, BeforeValidator(_nan_is_missing)], Field(
        default=default, description=spec.description or None
    )
