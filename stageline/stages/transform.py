"""On-demand transforms and category encodings: one code path for training,
online serving and batch, so training/serving skew cannot arise.

A transform is a plain function ``DataFrame -> DataFrame of new columns``,
declared with :func:`on_demand` so stages can check columns. Training calls
the same function (through the same stage) that serving calls.

Category encodings are *fitted* at training and stored with the model
version; :func:`apply_encoders` is the one function that applies them, at
training and in :class:`~stageline.stages.model.XGBoostPredictor`. Encoders
travel with the model so a model can never be fed another version's codes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stageline.context import StageContext
from stageline.spec import SpecError
from stageline.spec_classes import resolve_object
from stageline.stage import BaseStage, mark_errors, with_columns

TransformFn = Callable[[pd.DataFrame], pd.DataFrame]


@dataclass(frozen=True)
class OnDemand:
    """A transform function with the columns it reads and writes."""

    fn: TransformFn
    requires: tuple[str, ...]
    provides: tuple[str, ...]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.fn(batch)


def on_demand(
    *, requires: Sequence[str], provides: Sequence[str]
) -> Callable[[TransformFn], OnDemand]:
    """Declare a transform: ``@on_demand(requires=[...], provides=[...])``."""

    def wrap(fn: TransformFn) -> OnDemand:
        return OnDemand(fn, tuple(requires), tuple(provides))

    return wrap


def load_transform(ref: str, base_dir: Path | None = None) -> OnDemand:
    """The :func:`on_demand` function named by ``package.module:function`` or by
    ``path/to/file.py:function``, a path relative to ``base_dir`` (the spec's folder)."""
    fn = resolve_object(ref, base_dir, kind="transform", attr="function")
    if not isinstance(fn, OnDemand):
        raise SpecError(
            f"{ref!r} is not a transform: decorate it with @on_demand(requires=[...], "
            "provides=[...]) from stageline.stages.transform"
        )
    return fn


class OnDemandTransform(BaseStage):
    """Computes request-time features with a declared transform function.

    ``function`` is ``package.module:function`` or ``path/to/file.py:function``
    (relative to the spec's folder), as ``uses:`` names a stage class.

    Rows whose numeric outputs are not finite (say, a ratio over a zero) are
    marked bad rather than fed to the model.
    """

    def __init__(self, *, function: str, context: StageContext) -> None:
        super().__init__(name=context.stage_name)
        try:
            self.transform = load_transform(function, context.spec.base_dir)
        except SpecError as e:
            raise SpecError(f"stage {self.name!r}: function: {e}") from None

    @classmethod
    def check_spec_params(cls, params: Mapping[str, Any], base_dir: Path | None) -> None:
        """``load_spec`` imports the transform, so a bad ``function:`` fails there."""
        ref = params.get("function")
        if not isinstance(ref, str):
            raise SpecError(
                "function: expected 'package.module:function' or 'path/to/file.py:function'"
            )
        module = ref.rpartition(":")[0]
        if base_dir is None and module.endswith(".py") and not Path(module).is_absolute():
            return  # relative to a folder we do not know: checked when the stage loads
        try:
            load_transform(ref, base_dir)
        except SpecError as e:
            raise SpecError(f"function: {e}") from None

    def required_columns(self) -> tuple[str, ...]:
        return self.transform.requires

    def provided_columns(self) -> tuple[str, ...]:
        return self.transform.provides

    def process(self, batch: pd.DataFrame) -> pd.DataFrame:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # marked below
            new = self.transform(batch)
        columns = {col: new[col].to_numpy() for col in new.columns}
        out = with_columns(batch, columns)
        # Checked on the arrays: a sub-frame of the new columns costs more than the
        # transform itself on one row.
        numeric = [c for c, v in columns.items() if v.dtype.kind in "fc"]
        if numeric:
            broken = ~np.isfinite(np.column_stack([columns[c] for c in numeric]))
            rows = broken.any(axis=1)
            if rows.any():
                names = np.array(numeric, dtype=object)
                reasons = np.full(len(out), "", dtype=object)
                for i in np.flatnonzero(rows):
                    reasons[i] = f"{', '.join(names[broken[i]])} is not a finite number"
                mark_errors(out, rows, self.name, reasons)
        return out


# --------------------------------------------------------------------------- encoders


def fit_encoders(frame: pd.DataFrame, columns: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Fit an ordinal encoder per categorical column (categories sorted, so stable)."""
    return {
        col: {
            "kind": "ordinal",
            "output": f"{col}_code",
            "categories": sorted(str(v) for v in frame[col].dropna().unique()),
        }
        for col in columns
    }


def encoder_inputs(encoders: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(encoders)


def encoder_outputs(encoders: Mapping[str, Mapping[str, Any]]) -> tuple[str, ...]:
    return tuple(str(e["output"]) for e in encoders.values())


def apply_encoders(frame: pd.DataFrame, encoders: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Add each encoder's output column; a category unseen at training becomes NaN
    (XGBoost's missing value), not an error."""
    return with_columns(frame, encoded(frame, encoders))


@functools.lru_cache(maxsize=256)
def _categories(categories: tuple[str, ...]) -> pd.Index[Any]:
    """An encoder's categories as an index, built (and hashed) once, not on every call."""
    return pd.Index(categories)


def encoded(
    frame: pd.DataFrame, encoders: Mapping[str, Mapping[str, Any]]
) -> dict[str, np.ndarray[Any, np.dtype[np.float64]]]:
    """Each encoder's output column (the codes, NaN for a category unseen at training)."""
    columns = {}
    for col, enc in encoders.items():
        if enc.get("kind") != "ordinal":
            raise ValueError(f"unknown encoder kind {enc.get('kind')!r} for column {col!r}")
        categories: Any = _categories(tuple(enc["categories"]))  # (stubs: an Index only)
        codes = categories.get_indexer(frame[col].astype(object).to_numpy()).astype("float64")
        codes[codes < 0] = np.nan
        columns[str(enc["output"])] = codes
    return columns
