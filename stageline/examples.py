"""An example record for any pipeline, made from its request schema alone.

``stageline serve`` prints it as a ready-to-run ``curl``. The record passes the
spec's own checks (the record model online, ``validate_frame`` in batch), so the
first request a user copies gets a prediction, not a 422.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

from stageline.spec_request import FieldSpec, RequestSchema

EXAMPLE_ID = "example-1"
EXAMPLE_TEXT = "example"


def example_record(schema: RequestSchema) -> dict[str, Any]:
    """One valid record, JSON-ready: a value for every field, in the schema's order.

    A field with a default shows its default; a category its first value; a number
    ``1`` when its bounds allow it, else a value inside them; a datetime the current
    time (UTC, ISO 8601); the id field ``"example-1"`` when it is text.
    """
    return {
        name: example_value(field, is_id=name == schema.id_field)
        for name, field in schema.fields.items()
    }


def example_value(field: FieldSpec, *, is_id: bool = False) -> Any:
    """A value that ``field`` accepts (JSON-ready: a datetime is an ISO 8601 string)."""
    if field.default is not None:
        return field.default
    if field.type == "category":
        return (field.values or ("",))[0]
    if field.type == "bool":
        return True
    if field.type == "datetime":
        return datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    if field.type == "int":
        return _example_int(field)
    if field.type == "float":
        return _example_float(field)
    text = EXAMPLE_ID if is_id else EXAMPLE_TEXT
    return text[: field.max_length] if field.max_length else text


def _example_float(field: FieldSpec) -> float:
    low = field.ge if field.ge is not None else field.gt
    high = field.le if field.le is not None else field.lt
    if _allows(field, 1.0):
        return 1.0
    if low is not None and high is not None:
        return (low + high) / 2
    if low is not None:
        return low if field.ge is not None else low + 1.0
    assert high is not None  # else 1.0 was allowed
    return high if field.le is not None else high - 1.0


def _example_int(field: FieldSpec) -> int:
    # The smallest and largest whole numbers the bounds admit (None: unbounded).
    low = (
        math.ceil(field.ge)
        if field.ge is not None
        else (math.floor(field.gt) + 1 if field.gt is not None else None)
    )
    high = (
        math.floor(field.le)
        if field.le is not None
        else (math.ceil(field.lt) - 1 if field.lt is not None else None)
    )
    if _allows(field, 1):
        return 1
    if low is not None and high is not None:
        return (low + high) // 2
    if low is not None:
        return low
    assert high is not None  # else 1 was allowed
    return high


def _allows(field: FieldSpec, value: float) -> bool:
    return (
        (field.ge is None or value >= field.ge)
        and (field.gt is None or value > field.gt)
        and (field.le is None or value <= field.le)
        and (field.lt is None or value < field.lt)
    )
