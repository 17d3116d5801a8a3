"""The request schema's rules as a vectorized stage.

Online, FastAPI validates each record with ``RequestSchema.record_model()``;
in batch and in-process, this stage applies the same rules to whole
DataFrames and marks each bad row with the field and the reason, so good rows
in the same batch are still scored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from stageline.context import StageContext
from stageline.spec import FieldSpec, RequestSchema
from stageline.stage import ERROR_COLUMN, BaseStage, error_mask, mark_errors

RAW_COLUMN = "_raw"
"""For a row this stage rejects: the record as it arrived (JSON), for the quarantine."""

Mask = np.ndarray[Any, np.dtype[np.bool_]]
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


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
    out = batch.copy()
    n = len(out)
    reasons: np.ndarray[Any, np.dtype[np.object_]] = np.full(n, None, dtype=object)

    def flag(mask: Mask, why: str | Callable[[Any], str], raw: pd.Series[Any]) -> None:
        fresh = mask & pd.isna(reasons)
        if not fresh.any():
            return
        if isinstance(why, str):
            reasons[fresh] = why
        else:
            reasons[fresh] = [why(v) for v in raw.to_numpy()[fresh]]

    for name, field in schema.fields.items():
        if name in out.columns:
            raw = out[name]
        else:
            raw = pd.Series([None] * n, index=out.index, dtype=object)
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
        out[name] = values

    bad_rows = ~pd.isna(reasons)
    if bad_rows.any():
        mark_errors(out, bad_rows, stage, reasons)
        raw_json = np.full(n, None, dtype=object)
        originals = batch.iloc[np.flatnonzero(bad_rows)]
        raw_json[bad_rows] = [
            json.dumps(rec, default=str) for rec in originals.to_dict(orient="records")
        ]
        out[RAW_COLUMN] = raw_json
    elif ERROR_COLUMN not in out.columns:
        out[ERROR_COLUMN] = pd.Series([None] * n, index=out.index, dtype=object)
    return out


def _coerce(raw: pd.Series[Any], field: FieldSpec) -> tuple[pd.Series[Any], Mask, str]:
    """(typed values, rows that could not be coerced, why)."""
    kind = field.type
    n = len(raw)
    nullable = not field.is_required and field.default is None
    if kind in ("int", "float"):
        source = raw.astype(object).map(_no_bool) if raw.dtype == object else raw
        if raw.dtype.kind == "b":
            source = pd.Series(np.nan, index=raw.index)
        num = pd.to_numeric(source, errors="coerce").astype("float64")
        bad = np.asarray(num.isna() | ~np.isfinite(num.fillna(0.0)), dtype=bool)
        if kind == "float":
            return num, bad, "must be a finite number"
        fractional = np.asarray((num % 1 != 0) & ~num.isna(), dtype=bool)
        bad = bad | fractional
        if nullable:
            return num.where(~pd.Series(bad, index=raw.index)), bad, "must be an integer"
        return num.fillna(0).astype("int64"), bad, "must be an integer"
    if kind == "bool":
        if raw.dtype.kind == "b":
            return raw, np.zeros(n, dtype=bool), ""
        text = raw.astype(object).map(lambda v: str(v).strip().lower() if v is not None else v)
        truth = text.map(lambda t: True if t in _TRUE else (False if t in _FALSE else None))
        bad = np.asarray(truth.isna(), dtype=bool)
        return (
            truth.astype("boolean" if nullable else object)
            .fillna(False)
            .astype("boolean" if nullable else bool),
            bad,
            "must be true or false",
        )
    if kind == "datetime":
        if raw.dtype.kind in "iuf":
            parsed = pd.to_datetime(raw, unit="s", utc=True, errors="coerce")
        elif raw.dtype.kind == "M":
            parsed = pd.to_datetime(raw, utc=True)
        else:
            parsed = pd.to_datetime(raw.astype(object), utc=True, errors="coerce", format="ISO8601")
        return (
            parsed.astype("datetime64[ns, UTC]"),
            np.asarray(parsed.isna(), dtype=bool),
            "must be an ISO 8601 date-time",
        )
    # str and category
    if raw.dtype.kind in "iufb":
        text = raw.astype(str).where(raw.notna(), None)
        bad = np.zeros(n, dtype=bool)
    else:
        bad = np.asarray(~raw.map(lambda v: isinstance(v, str) or v is None or v != v), dtype=bool)
        text = raw
    if kind == "category":
        allowed = list(field.values or ())
        outside = np.asarray(~text.isin(allowed), dtype=bool)
        return text, bad | outside, f"must be one of {allowed}"
    if field.max_length is not None:
        too_long = np.asarray(
            text.astype(object).map(
                lambda v: isinstance(v, str) and len(v) > (field.max_length or 0)
            ),
            dtype=bool,
        )
        if too_long.any():
            return (
                text,
                bad | too_long,
                f"must be a string of at most {field.max_length} characters",
            )
    return text, bad, "must be a string"


def _no_bool(v: Any) -> Any:
    # True is an int to Python; a bool where a number belongs is a client bug.
    return None if isinstance(v, bool) else v


def _got(reason: str) -> Callable[[Any], str]:
    """A reason that also shows the offending value, for the user to find the row."""
    return lambda value: f"{reason} (got {_show(value)})"


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


__all__ = ["RAW_COLUMN", "ValidateRequest", "error_mask", "validate_frame"]
