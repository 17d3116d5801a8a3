"""The request schema's rules as a vectorized stage.

Online, FastAPI validates each record with ``RequestSchema.record_model()``;
in batch and in-process, this stage applies the same rules to whole
DataFrames and marks each bad row with the field and the reason, so good rows
in the same batch are still scored.

Records the record model accepted need no second pass: :func:`records_frame` builds
the very frame this stage would give for them, column by column, at a fraction of
the cost (what the online ingress does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import TypeAdapter, ValidationError

from stageline.context import StageContext
from stageline.spec import (
    DATETIME_MAX,
    DATETIME_MIN,
    INT_LIMIT,
    FieldSpec,
    RequestSchema,
    datetime_in_range,
)
from stageline.stage import ERROR_COLUMN, BaseStage, error_mask, mark_errors, with_columns

RAW_COLUMN = "_raw"
"""For a row this stage rejects: the record as it arrived (JSON), for the quarantine."""

Mask = np.ndarray[Any, np.dtype[np.bool_]]

# Python values (an object column: JSON records, a CSV column with text in it) are
# parsed by the very parsers the online record model uses, so both accept the same.
_PARSE: dict[str, TypeAdapter[Any]] = {
    "bool": TypeAdapter(bool),
    "int": TypeAdapter(int),
    "float": TypeAdapter(float),
    "datetime": TypeAdapter(datetime),
}
_MS_WATERSHED = 2e10
"""Like pydantic: a number beyond this many seconds from 1970 is in milliseconds."""


class ValidateRequest(BaseStage):
    """Checks and coerces the request fields; the first stage of every pipeline."""

    def __init__(self, *, context: StageContext) -> None:
        super().__init__(name="validate")
        self.schema: RequestSchema = context.spec.request

    def provided_columns(self) -> tuple[str, ...]:
        return tuple(self.schema.fields)

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        return validate_frame(batch, self.schema, stage=self.name)


def validate_frame(
    batch: pd.DataFrame, schema: RequestSchema, stage: str = "validate"
) -> pd.DataFrame:
    """Coerce each field to its type; mark rows breaking a rule with ``"<field>: <why>"``."""
    n = len(batch)
    coerced: dict[str, Any] = {}
    reasons: np.ndarray[Any, np.dtype[np.object_]] = np.full(n, None, dtype=object)

    def flag(mask: Mask, why: str | Callable[[Any], str], raw: pd.Series[Any]) -> None:
        fresh = mask & pd.isna(reasons)
        if not fresh.any():
            return
        if isinstance(why, str):
            reasons[fresh] = why
        else:
            # Only the flagged rows become Python objects (a datetime column would make
            # a Timestamp of every row).
            reasons[fresh] = [why(v) for v in raw.iloc[np.flatnonzero(fresh)].to_numpy()]

    for name, field in schema.fields.items():
        if name in batch.columns:
            raw = batch[name]
        else:
            raw = pd.Series([None] * n, index=batch.index, dtype=object)
        null = np.asarray(raw.isna(), dtype=bool)
        if field.is_required:
            flag(null, f"{name}: required field is missing", raw)
        elif field.default is not None and null.any():
            raw = raw.astype(object).where(~null, field.default)
            null = np.zeros(n, dtype=bool)
        values, bad, why = _coerce(raw, field)
        flag(bad & ~null, _got(f"{name}: {why}"), raw)
        for bound, op, text in (
            ("ge", np.less, ">="),
            ("gt", np.less_equal, ">"),
            ("le", np.greater, "<="),
            ("lt", np.greater_equal, "<"),
        ):
            limit = getattr(field, bound)
            if limit is not None:
                with np.errstate(invalid="ignore"):
                    broken = np.asarray(
                        op(values.to_numpy(dtype="float64", na_value=np.nan), limit)
                    )
                flag(broken & ~bad & ~null, _got(f"{name}: must be {text} {_num(limit)}"), raw)
        coerced[name] = values

    bad_rows = ~pd.isna(reasons)
    if ERROR_COLUMN not in batch.columns:
        coerced[ERROR_COLUMN] = pd.Series([None] * n, index=batch.index, dtype=object)
    if not bad_rows.any():
        return with_columns(batch, coerced)
    raw_json = np.full(n, None, dtype=object)
    originals = batch.iloc[np.flatnonzero(bad_rows)]
    raw_json[bad_rows] = [
        json.dumps(rec, default=str) for rec in originals.to_dict(orient="records")
    ]
    coerced[RAW_COLUMN] = pd.Series(raw_json, index=batch.index, dtype=object)
    return mark_errors(with_columns(batch, coerced), bad_rows, stage, reasons)


def records_frame(records: Sequence[Mapping[str, Any]], schema: RequestSchema) -> pd.DataFrame:
    """The frame ``validate_frame(pd.DataFrame.from_records(records), schema)`` gives, for
    ``records`` the schema's record model accepted (its ``model_dump()``), built directly.

    Each field's column is made from its Python values with the dtype validation gives
    it; other keys (the prediction log's request id) are inferred as ``from_records``
    infers them. The rare record this cannot type as validation does (an int beyond
    float64's exact range, a default of another type) goes the validating way, so the
    frame is the same either way: ``tests/unit/test_validate.py`` checks it on generated
    records."""
    if not records:
        return validate_frame(pd.DataFrame.from_records(records), schema)
    columns: dict[str, Any] = {}
    n = len(records)
    for name in records[0]:
        values = [record[name] for record in records]
        field = schema.fields.get(name)
        typed = _typed(values, field) if field is not None else _inferred(values)
        if typed is None:
            return validate_frame(pd.DataFrame.from_records(records), schema)
        columns[name] = typed
    if len(columns) != len(records[0]) or any(name not in columns for name in schema.fields):
        return validate_frame(pd.DataFrame.from_records(records), schema)
    columns[ERROR_COLUMN] = np.full(n, None, dtype=object)
    return pd.DataFrame(columns, index=pd.RangeIndex(n), copy=False)


def _inferred(values: list[Any]) -> Any:
    """``values`` typed as a frame built from them would type them (text: ``str``)."""
    inferred = pd.Series(values)
    return inferred.to_numpy() if inferred.dtype == object else inferred.array


def _typed(values: list[Any], field: FieldSpec) -> Any:
    """``values`` (valid for ``field``) as validation types them, or None if this cannot
    say (the caller validates instead)."""
    nulls = [v is None for v in values]
    if any(nulls) and field.default is not None:
        values = [field.default if null else v for v, null in zip(values, nulls, strict=True)]
        nulls = [False] * len(values)
    kind = field.type
    expected = _PYTHON[kind]
    if not all(
        null or (isinstance(v, expected) and _exact(kind, v))
        for v, null in zip(values, nulls, strict=True)
    ):
        return None
    if kind in ("int", "float"):
        # Through float64, as validation reads numbers.
        numbers = np.array([np.nan if v is None else v for v in values], dtype="float64")
        if kind == "float" or (not field.is_required and field.default is None):
            return numbers  # a nullable int stays float64, NaN for null
        return numbers.astype("int64")
    if kind == "bool":
        if any(nulls):  # nullable: "boolean" where a value is missing, as validated
            return pd.array(values, dtype="boolean")
        return np.array(values, dtype=bool)
    if kind == "datetime":
        return pd.to_datetime(values, utc=True).astype("datetime64[ns, UTC]").array
    return _inferred(values)


_PYTHON: dict[str, type | tuple[type, ...]] = {
    "int": int,
    "float": float,
    "bool": bool,
    "datetime": datetime,
    "str": str,
    "category": str,
}


def _exact(kind: str, v: Any) -> bool:
    """``v`` is read by validation as it is: no bool for a number, an int float64 holds."""
    if kind == "int":
        return not isinstance(v, bool) and -_EXACT_INT <= v <= _EXACT_INT
    if kind == "float":
        return not isinstance(v, bool)
    return True


_EXACT_INT = 2**53
"""Ints up to this size go through float64 unchanged; larger ones are validated."""


Coerced = tuple["pd.Series[Any]", Mask, str]
"""(typed values, rows that could not be coerced, why)."""


def _coerce(raw: pd.Series[Any], field: FieldSpec) -> Coerced:
    """(typed values, rows that could not be coerced, why)."""
    # A nullable field keeps its nulls (a nullable dtype); one with a default or a
    # required one gets a plain dtype, its rejected rows holding a placeholder.
    nullable = not field.is_required and field.default is None
    if field.type in ("int", "float"):
        return _coerce_number(raw, field.type, nullable)
    if field.type == "bool":
        return _coerce_bool(raw, nullable)
    if field.type == "datetime":
        return _coerce_datetime(raw)
    return _coerce_text(raw, field)


def _coerce_number(raw: pd.Series[Any], kind: str, nullable: bool) -> Coerced:
    if raw.dtype.kind == "b":
        source: pd.Series[Any] = pd.Series(np.nan, index=raw.index)
    elif raw.dtype.kind in "iuf":
        source = raw
    else:
        source = raw.astype(object).map(lambda v: _parse(kind, v))
    num = pd.to_numeric(source, errors="coerce").astype("float64")
    bad = np.asarray(num.isna() | ~np.isfinite(num.fillna(0.0)), dtype=bool)
    if kind == "float":
        return num, bad, "must be a finite number"
    fractional = np.asarray((num % 1 != 0) & ~num.isna(), dtype=bool)
    bad = bad | fractional | np.asarray(num.abs() >= INT_LIMIT, dtype=bool)
    if nullable:
        return num.where(~pd.Series(bad, index=raw.index)), bad, "must be an integer"
    # Rejected rows hold 0, not whatever an out-of-range value wraps to.
    return num.where(~bad, 0).astype("int64"), bad, "must be an integer"


def _coerce_bool(raw: pd.Series[Any], nullable: bool) -> Coerced:
    if raw.dtype.kind == "b":
        return raw, np.zeros(len(raw), dtype=bool), ""
    if raw.dtype.kind in "iuf":
        truth = raw.map({1: True, 0: False})
    else:
        truth = raw.astype(object).map(lambda v: _parse("bool", v))
    bad = np.asarray(truth.isna(), dtype=bool)
    if nullable:  # a missing value stays missing
        return truth.astype("boolean"), bad, "must be true or false"
    return truth.astype(object).fillna(False).astype(bool), bad, "must be true or false"


def _coerce_datetime(raw: pd.Series[Any]) -> Coerced:
    if raw.dtype.kind in "iuf":
        seconds = raw.astype("float64")
        seconds = seconds.where(seconds.abs() <= _MS_WATERSHED, seconds / 1000)
        inside = (seconds >= DATETIME_MIN.timestamp()) & (seconds < DATETIME_MAX.timestamp())
        parsed = pd.to_datetime(seconds.where(inside), unit="s", utc=True)
    elif raw.dtype.kind == "M":
        parsed = pd.to_datetime(raw, utc=True)
        parsed = parsed.where((parsed >= DATETIME_MIN) & (parsed < DATETIME_MAX))
    else:
        values = raw.astype(object).map(lambda v: _parse("datetime", v))
        parsed = pd.to_datetime(values.where(values.notna(), None), utc=True)
    return (
        parsed.astype("datetime64[ns, UTC]"),
        np.asarray(parsed.isna(), dtype=bool),
        "must be an ISO 8601 date-time between "
        f"{DATETIME_MIN:%Y-%m-%d} and {DATETIME_MAX:%Y-%m-%d}",
    )


def _coerce_text(raw: pd.Series[Any], field: FieldSpec) -> Coerced:
    """A ``str`` or ``category`` field."""
    text, bad = _as_text(raw, field.type)
    if field.type == "category":
        allowed = list(field.values or ())
        outside = np.asarray(~text.isin(allowed), dtype=bool)
        return text, bad | outside, f"must be one of {allowed}"
    if field.max_length is not None:
        too_long = _longer_than(text, field.max_length)
        if too_long.any():
            return (
                text,
                bad | too_long,
                f"must be a string of at most {field.max_length} characters",
            )
    return text, bad, "must be a string"


def _as_text(raw: pd.Series[Any], kind: str) -> tuple[pd.Series[Any], Mask]:
    """(the values as text or None, rows that are not text)."""
    n = len(raw)
    if raw.dtype.kind == "b" or (kind == "category" and raw.dtype.kind in "iuf"):
        return raw.astype(object), np.ones(n, dtype=bool)
    if raw.dtype.kind in "iuf":
        return raw.astype(str).where(raw.notna(), None), np.zeros(n, dtype=bool)
    if isinstance(raw.dtype, pd.StringDtype):  # text or missing already, as parquet reads
        return raw, np.zeros(n, dtype=bool)
    # Numbers become their text, as online (coerce_numbers_to_str); a category is text.
    numbers = (int, float) if kind == "str" else ()
    text = raw.map(lambda v: str(v) if isinstance(v, numbers) and not isinstance(v, bool) else v)
    bad = np.asarray(~text.map(lambda v: isinstance(v, str) or v is None or v != v), dtype=bool)
    return text, bad


def _longer_than(text: pd.Series[Any], max_length: int) -> Mask:
    if isinstance(text.dtype, pd.StringDtype) and text.dtype.storage == "pyarrow":
        # Arrow's own kernel on the Arrow array: as fast as ``.str.len()`` on a batch,
        # a fifth of its cost on the one row of a request.
        longer = pc.greater(pc.utf8_length(pa.array(text.array)), max_length)
        return np.asarray(pc.fill_null(longer, False).to_numpy(zero_copy_only=False), dtype=bool)
    if isinstance(text.dtype, pd.StringDtype):
        return np.asarray(text.str.len().fillna(0) > max_length, dtype=bool)
    return np.asarray(
        text.astype(object).map(lambda v: isinstance(v, str) and len(v) > max_length),
        dtype=bool,
    )


def _parse(kind: str, v: Any) -> Any:
    """``v`` as the online record model reads it, or None if it cannot (a bool is no number)."""
    if v is None or (isinstance(v, bool) and kind != "bool"):
        return None
    try:
        parsed = _PARSE[kind].validate_python(v)
    except ValidationError:
        return None
    if isinstance(parsed, datetime) and not datetime_in_range(parsed):
        return None
    return parsed


def _got(reason: str) -> Callable[[Any], str]:
    """A reason that also shows the offending value, for the user to find the row."""
    return lambda value: f"{reason} (got {_show(value)})"


def _show(v: Any) -> str:
    if isinstance(v, np.generic):  # a user wants 12, not np.int64(12)
        v = v.item()
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


__all__ = ["RAW_COLUMN", "ValidateRequest", "error_mask", "records_frame", "validate_frame"]
