"""The stage contract: a plain class, constructed once, called on DataFrames.

A stage receives a DataFrame of any length (one row online, thousands in
batch) and returns one with the same rows in the same order, with columns
added. Ray Serve and Ray Data both run stage classes unchanged; nothing in
this module knows about either.

Row-level failures never fail a whole batch: the stage writes a reason into
the ``_error`` column (``"<stage>: <reason>"``) and every later stage passes
that row through untouched. :class:`BaseStage` implements that convention so
a stage only writes its vectorized ``process``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict

from stageline.spec_outputs import OutputSpec

ERROR_COLUMN = "_error"
"""Column holding ``"<stage>: <reason>"`` for a row a stage rejected, else null."""


class StageError(Exception):
    """A stage cannot run at all (missing columns, a resource that failed to load)."""


class MissingColumnsError(StageError):
    """A batch lacks columns a stage declares it requires."""

    def __init__(self, stage: str, missing: Sequence[str], present: Iterable[str]) -> None:
        self.stage = stage
        self.missing = list(missing)
        super().__init__(
            f"stage {stage!r} needs column(s) {', '.join(map(repr, self.missing))} "
            f"that the batch does not have (it has: {', '.join(sorted(map(str, present)))}); "
            "check that an earlier stage in the spec provides them"
        )


@runtime_checkable
class Stage(Protocol):
    """What every stage is. ``__init__(**params)`` loads resources once."""

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Return ``batch`` with this stage's columns added; same rows, same order."""
        ...


@runtime_checkable
class Reloadable(Protocol):
    """A stage that can change what it serves in place (a model stage moving to another
    alias or version) without being rebuilt. Serve calls it on a ``user_config`` change,
    with the stage's section; a failed reload keeps serving what it had, and says so
    in its :class:`StageStatus`."""

    def reconfigure(self, params: Mapping[str, Any]) -> None: ...


class ServedModel(BaseModel):
    """The model a stage serves, as ``/models`` and ``/readyz`` show it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    """The registered model's name."""
    version: int
    """The version loaded."""
    ref: str | int
    """What the stage was asked for: an alias (``champion``) or a version."""
    sha256: str
    """The model file's digest, as the registry recorded and verified it."""
    threshold: float | None = None
    """The decision threshold stored with the version."""
    metrics: dict[str, Any] = {}
    """Held-out metrics recorded at training."""
    load_error: str | None = None
    """Why the last reload failed (the stage kept serving ``version``), else None."""
    challenger: dict[str, Any] | None = None
    """The challenger configured beside it (its mode, share, sticky key, the version
    loaded and any reload error), else None."""


class StageStatus(BaseModel):
    """What one stage reports about itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stage_class: str = ""
    """The stage's class name (filled in by the chain that runs it)."""
    model: ServedModel | None = None
    """The model it serves, for a stage that serves one."""
    details: dict[str, Any] = {}
    """Anything else the stage wants operators to see."""


@runtime_checkable
class Reporting(Protocol):
    """A stage that reports its status (a model stage: the model it serves)."""

    def status(self) -> StageStatus: ...


@dataclass(frozen=True)
class Reading:
    """One figure a stage reports for the metrics: the Serve adapter exports it as
    ``stageline_<name>`` after each batch (the core imports no metrics library)."""

    name: str
    """``feature_age_s`` or ``feature_cache_lookups`` (the adapter knows each)."""
    value: float
    """A gauge's value, or a counter's total so far (the adapter exports increases)."""
    tags: Mapping[str, str]


@runtime_checkable
class Measured(Protocol):
    """A stage with figures for the metrics (a feature lookup: its snapshot's age)."""

    def readings(self) -> list[Reading]: ...


@runtime_checkable
class DataVersioned(Protocol):
    """A stage whose answers depend on data that may change under it while it serves
    (a feature lookup: the snapshot it reads). ``data_version`` changes when the data
    does; a response cache drops its answers then. No I/O: it is asked per request."""

    def data_version(self) -> Hashable: ...


def check_columns(stage: str, batch: pd.DataFrame, required: Iterable[str]) -> None:
    """Raise :class:`MissingColumnsError` naming ``stage`` if ``batch`` lacks any column."""
    missing = [c for c in required if c not in batch.columns]
    if missing:
        raise MissingColumnsError(stage, missing, batch.columns)


def check_rows(stage: str, rows: int, out: pd.DataFrame) -> None:
    """Raise :class:`StageError` naming ``stage`` unless ``out`` has ``rows`` rows."""
    if len(out) != rows:
        raise StageError(
            f"stage {stage!r} returned {len(out)} rows for {rows}: "
            "a stage must return one row per input row, in order"
        )


def with_columns(batch: pd.DataFrame, columns: Mapping[str, Any] | pd.DataFrame) -> pd.DataFrame:
    """``batch`` with ``columns`` set, in one step: a new column goes at the end, one
    ``batch`` has keeps its place. Values are arrays, lists or scalars; a Series is
    taken by position, like an array. ``columns`` may be a frame of as many rows.

    One ``concat``, not a column insert each: pandas rebuilds the column index on every
    insert, and on a one-row frame five inserts cost about three times the concat."""
    index = batch.index
    if isinstance(columns, pd.DataFrame):
        if not any(name in batch.columns for name in columns.columns):
            return pd.concat([batch, columns.set_axis(index)], axis=1)
        columns = {name: columns[name] for name in columns.columns}
    values = {
        name: v.set_axis(index) if isinstance(v, pd.Series) and not v.index.equals(index) else v
        for name, v in columns.items()
    }
    if not any(name in batch.columns for name in values):
        return pd.concat([batch, pd.DataFrame(values, index=index)], axis=1)
    # Some replaced: one constructor over every column in order (replacing in place
    # costs an insert's worth per column too).
    ordered = {name: values[name] if name in values else batch[name] for name in batch.columns}
    return pd.DataFrame({**ordered, **values}, index=index)


def error_mask(batch: pd.DataFrame) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Boolean array: True where a row was marked bad by some stage."""
    if ERROR_COLUMN not in batch.columns:
        return np.zeros(len(batch), dtype=bool)
    # On the NumPy array, not the Series: a quarter of the cost on a one-row frame.
    return ~pd.isna(batch[ERROR_COLUMN].to_numpy())


def mark_errors(
    batch: pd.DataFrame,
    mask: np.ndarray[Any, np.dtype[np.bool_]] | pd.Series[bool],
    stage: str,
    reasons: str | Sequence[str] | np.ndarray[Any, Any] | pd.Series[str],
) -> pd.DataFrame:
    """Mark rows where ``mask`` is True with ``"<stage>: <reason>"``, in place.

    The first reason a row receives wins: a row already marked keeps its
    reason, so the quarantine shows the earliest failure.
    """
    mask = np.asarray(mask, dtype=bool)
    if ERROR_COLUMN not in batch.columns:
        batch[ERROR_COLUMN] = pd.Series([None] * len(batch), index=batch.index, dtype=object)
    if not mask.any():
        return batch
    fresh = mask & ~error_mask(batch)
    if isinstance(reasons, str):
        values: Any = f"{stage}: {reasons}"
    else:
        full = np.asarray(list(reasons), dtype=object)
        if len(full) != len(batch):
            raise ValueError("reasons must be one string or one per row of the batch")
        values = np.array([f"{stage}: {r}" for r in full[fresh]], dtype=object)
    column = batch[ERROR_COLUMN].astype(object).to_numpy(copy=True)
    column[fresh] = values
    batch[ERROR_COLUMN] = column
    return batch


def split_error(error: str) -> tuple[str, str]:
    """``"features: customer_id: required"`` -> ``("features", "customer_id: required")``."""
    stage, _, reason = error.partition(": ")
    return stage, reason


def rejections(batch: pd.DataFrame, rows: np.ndarray[Any, np.dtype[np.bool_]]) -> dict[str, int]:
    """How many of ``rows`` (a mask) each stage rejected: ``{stage: count}``."""
    errors = batch.loc[rows, ERROR_COLUMN].astype(str)
    stages = errors.str.partition(": ")[0]
    return {str(stage): int(n) for stage, n in stages.value_counts().items()}


class BaseStage:
    """Convenience base for stages: column checks and error pass-through.

    Subclasses set ``requires`` / ``provides`` (or override the properties)
    and implement :meth:`process`, which only ever sees rows no earlier stage
    marked bad. A user's stage need not subclass this: any class meeting
    :class:`Stage` works the same in every runtime.
    """

    requires: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    outputs: ClassVar[tuple[OutputSpec, ...]] = ()
    """What a pipeline ending in this stage answers for each record, unless its spec
    declares ``outputs:`` (see :mod:`stageline.outputs`)."""

    def __init__(self, *, name: str | None = None) -> None:
        self.name = name or type(self).__name__

    def required_columns(self) -> Sequence[str]:
        return self.requires

    def provided_columns(self) -> Sequence[str]:
        return self.provides

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        """Vectorized work on rows that are still good. May mark rows bad."""
        raise NotImplementedError

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        check_columns(self.name, batch, self.required_columns())
        bad = error_mask(batch)
        if not bad.any():
            # The stage sees its own frame (a change it makes in place stays its own)
            # indexed 0 .. n-1; as a chain hands it, a shallow copy does (copy on write).
            positional = _is_positional(batch.index)
            out = self.process(
                batch.copy(deep=False) if positional else batch.reset_index(drop=True)
            )
            check_rows(self.name, len(batch), out)
            if not (positional and _is_positional(out.index)):
                out.index = batch.index
        else:
            out = _process_good_rows(self, batch, bad)
        check_columns(self.name, out, self.provided_columns())
        check_rows(self.name, len(batch), out)
        return out


def _is_positional(index: pd.Index) -> bool:
    """``index`` is ``0 .. n-1``, what ``reset_index(drop=True)`` would give."""
    return isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1


def _process_good_rows(
    stage: BaseStage, batch: pd.DataFrame, bad: np.ndarray[Any, np.dtype[np.bool_]]
) -> pd.DataFrame:
    """Run ``stage.process`` on the good rows only and put the batch back together.

    Bad rows keep every value they had; columns the stage adds are null for them.
    """
    good_idx = np.flatnonzero(~bad)
    out = batch.copy()
    if len(good_idx) == 0:
        for col in stage.provided_columns():
            if col not in out.columns:
                out[col] = None
        return out
    processed = stage.process(batch.iloc[good_idx].reset_index(drop=True))
    check_rows(stage.name, len(good_idx), processed)
    for col in processed.columns:
        out[col] = _merge_column(col, batch, bad, good_idx, processed[col])
    return out


def _merge_column(
    col: str,
    batch: pd.DataFrame,
    bad: np.ndarray[Any, np.dtype[np.bool_]],
    good_idx: np.ndarray[Any, np.dtype[np.intp]],
    values: pd.Series,
) -> pd.Series:
    """Column ``col`` for the whole batch: ``values`` on the good rows, and on the bad rows
    what they had (null where the column is new). Vectorized for every dtype."""
    if col == ERROR_COLUMN:
        column = batch[col].to_numpy(dtype=object, copy=True)
        column[good_idx] = values.to_numpy(dtype=object)
        column[pd.isna(column)] = None  # no error is None, never NaN
        return pd.Series(column, index=batch.index, dtype=object)
    if col in batch.columns and values.dtype == batch[col].dtype:
        merged = batch[col].array.copy()
        merged[good_idx] = values.array
        return pd.Series(merged, index=batch.index)
    n, kind = len(batch), values.dtype.kind
    if kind in "fiu":
        numbers = np.full(n, np.nan)
        numbers[good_idx] = values.to_numpy(dtype="float64", na_value=np.nan)
        return pd.Series(numbers, index=batch.index)
    if kind == "b":
        flags = pd.array([pd.NA] * n, dtype="boolean")
        flags[good_idx] = values.to_numpy(dtype=bool)
        return pd.Series(flags, index=batch.index)
    if kind == "M":
        times = pd.Series(pd.NaT, index=batch.index, dtype="datetime64[ns, UTC]")
        times.iloc[good_idx] = pd.to_datetime(values, utc=True).to_numpy()
        return times
    objects = np.full(n, None, dtype=object)
    objects[good_idx] = values.to_numpy(dtype=object)
    return pd.Series(objects, index=batch.index, dtype=object)
