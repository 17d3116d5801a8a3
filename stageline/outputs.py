"""The output contract: what a pipeline answers for each record, declared once.

A pipeline's outputs are declared by its spec (``outputs:``) or, by default, by the last
of its stages whose class declares them (``outputs`` on a
:class:`~stageline.stage.BaseStage`, as the built-in ``Decision`` declares its own).
Every way out of a pipeline is generated from them: the frame
:meth:`OutputContract.frame` (what ``Pipeline.predict`` returns and every runtime
computes), JSON records, the ``/predict`` item, the Open Inference Protocol tensors and
metadata, the OpenAPI response, and the batch output's Arrow schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import pyarrow as pa

from stageline.spec import OutputSpec, OutputType, PipelineSpec, SpecError, resolve_class
from stageline.stage import ERROR_COLUMN, BaseStage, StageError

Record = dict[str, Any]
"""One JSON-ready row: column name to a plain Python value (None for missing)."""

ARROW_TYPES: dict[OutputType, pa.DataType] = {
    "float": pa.float64(),
    "bool": pa.bool_(),
    "int": pa.int64(),
    "str": pa.string(),
    "str_list": pa.list_(pa.string()),
}
OIP_TYPES: dict[OutputType, str] = {
    "float": "FP64",
    "bool": "BOOL",
    "int": "INT64",
    "str": "BYTES",
    "str_list": "BYTES",  # OIP has no list type: the strings joined by commas
}
PYTHON_TYPES: dict[OutputType, Any] = {
    "float": float,
    "bool": bool,
    "int": int,
    "str": str,
    "str_list": list[str],
}

MODEL: tuple[OutputSpec, ...] = (
    OutputSpec(name="model_name", type="str", description="The model that scored the record."),
    OutputSpec(name="model_version", type="int", description="Its version."),
)
"""Which model answered, where the pipeline's stages say (``Decision`` does): once per
``/predict`` response, on every batch output row; null where no stage says."""

ERROR = "error"
"""The output column naming why a record was not scored (``"<stage>: <reason>"``)."""


def declared_outputs(spec: PipelineSpec) -> tuple[OutputSpec, ...]:
    """``spec.outputs``, else what the last stage whose class declares outputs declares
    (stages after it, such as a logger or a check, pass its columns through)."""
    if spec.outputs is not None:
        return spec.outputs
    for stage in reversed(spec.stages):
        cls = resolve_class(stage.uses, spec.base_dir)
        if issubclass(cls, BaseStage) and cls.outputs:
            return cls.outputs
    raise SpecError(
        f"pipeline {spec.name!r}: declare what a prediction carries with `outputs:` in the "
        "spec (each a name and a type), or include a stage that declares its `outputs` "
        "(as stageline.stages.postprocess:Decision does); no stage of this one does"
    )


@runtime_checkable
class ProvidesColumns(Protocol):
    """A stage that says which columns it adds (every :class:`~stageline.stage.BaseStage`
    does; a plain class may)."""

    def provided_columns(self) -> Sequence[str]: ...


def check_outputs_provided(spec: PipelineSpec, stages: Iterable[tuple[str, object]]) -> None:
    """Refuse, when a chain of stages is built, a spec whose declared outputs its stages
    do not give: a :class:`SpecError` naming the missing outputs, what the stages do
    provide, and what to change. Otherwise a pipeline would load, then fail every request.

    ``stages``: ``(name, stage)`` pairs, as a :class:`~stageline.pipeline.StageChain`
    holds them. The check judges only what it can know:

    - only a chain holding every stage of the spec (the in-process ``Pipeline``, a batch
      run in one pool, a deployment fusing every stage): one holding some of them (a
      stage of the ``graph`` placement, a batch segment) cannot know what the others add;
    - only when every stage declares its columns (:class:`ProvidesColumns`): a plain
      class that does not may add any column, so no output can be called missing. The
      request's fields count as provided (an output may echo one). Such a pipeline
      still fails a request naming the missing outputs
      (:meth:`OutputContract.frame`), as before;
    - only a spec that has outputs: one with none is refused by its
      :class:`OutputContract`, wherever one is built.
    """
    built = list(stages)
    declaring = [(name, s) for name, s in built if isinstance(s, ProvidesColumns)]
    names = {name for name, _ in built}
    if len(declaring) < len(built) or any(s.name not in names for s in spec.stages):
        return
    try:
        outputs = declared_outputs(spec)
    except SpecError:
        return
    provided = {name: tuple(map(str, stage.provided_columns())) for name, stage in declaring}
    request = tuple(spec.request.fields)
    have = {c for columns in provided.values() for c in columns} | set(request)
    missing = [o.name for o in outputs if o.name not in have]
    if not missing:
        return
    given = "; ".join(
        f"stage {name!r}: {', '.join(columns)}"
        for name, columns in provided.items()
        if columns and columns != request  # validation gives the request's fields
    )
    raise SpecError(
        f"pipeline {spec.name!r} declares output(s) {missing} that no stage provides "
        f"({given or 'its stages add no columns'}; the request: {', '.join(request)}); "
        "declare what the stages give under `outputs:` in the spec, or change the params "
        "that name a stage's columns (a model stage's `task` and `output`)"
    )


class OutputContract:
    """The outputs of one pipeline: its id field, then its declared outputs, then
    :data:`MODEL`; and the codecs built from them."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.id_field = spec.request.id_field
        self.outputs = declared_outputs(spec)
        self.fields: tuple[OutputSpec, ...] = (*self.outputs, *MODEL)

    @property
    def columns(self) -> tuple[str, ...]:
        """The output columns of a scored frame, besides the id and ``error``."""
        return tuple(f.name for f in self.fields)

    # -- frames and records ------------------------------------------------------------

    def frame(self, scored: pd.DataFrame) -> pd.DataFrame:
        """The caller-facing columns of a pipeline's output: the id, every output
        field, and ``error``; the same in every runtime."""
        # One constructor call, not a column at a time: on the one-row frames of online
        # requests, pandas' per-call overhead is most of the cost.
        return pd.DataFrame(self._columns(scored), index=scored.index)

    def _columns(self, scored: pd.DataFrame) -> dict[str, pd.Series[Any] | None]:
        """:meth:`frame`'s columns, by name."""
        columns: dict[str, Any] = {}
        if self.id_field in scored:
            columns[self.id_field] = scored[self.id_field]
        missing = [f.name for f in self.outputs if f.name not in scored]
        if missing and len(scored):
            raise StageError(
                f"the pipeline declares output(s) {missing} that no stage provides (its "
                f"columns: {sorted(map(str, scored.columns))}); fix `outputs:` or the stages"
            )
        for field in self.fields:
            column = scored.get(field.name)
            if field.type == "int" and column is not None and column.dtype.kind == "f":
                column = _whole_numbers(column)
            columns[field.name] = column
        error = scored.get(ERROR_COLUMN)
        if error is None:
            columns[ERROR] = pd.Series(None, index=scored.index, dtype=object)
        else:
            columns[ERROR] = error.astype(object).where(error.notna(), None)
        return columns

    def records(self, scored: pd.DataFrame) -> list[Record]:
        """:meth:`frame` as JSON-ready dicts (made from its columns, without the frame)."""
        return _records(self._columns(scored), len(scored))

    # -- /predict ----------------------------------------------------------------------

    def prediction(self, row: Mapping[str, Any]) -> Record:
        """One item of a ``/predict`` answer: the id (under the id field's own name, as
        in the request, ``stageline predict`` and batch) and every declared output."""
        item: Record = {self.id_field: row[self.id_field]}
        for field in self.outputs:
            value = row[field.name]
            item[field.name] = [] if value is None and field.type == "str_list" else value
        return item

    @staticmethod
    def model(row: Mapping[str, Any]) -> Record | None:
        """``{"name", "version"}`` of the model that scored ``row``, if a stage says."""
        if row.get("model_name") is None:
            return None
        return {"name": row["model_name"], "version": int(row["model_version"])}

    # -- Open Inference Protocol (V2) --------------------------------------------------

    def oip_outputs(self, rows: Sequence[Mapping[str, Any]], wanted: set[str]) -> list[Record]:
        """The output tensors of an OIP answer (all, or those named in ``wanted``)."""
        tensors = [
            {
                "name": self.id_field,
                "datatype": "BYTES",
                "data": [str(r[self.id_field]) for r in rows],
            }
        ]
        for field in self.outputs:
            tensors.append(
                {
                    "name": field.name,
                    "datatype": OIP_TYPES[field.type],
                    "data": [_oip_value(field.type, r[field.name]) for r in rows],
                }
            )
        return [{**t, "shape": [len(rows)]} for t in tensors if not wanted or t["name"] in wanted]

    def oip_metadata(self) -> list[Record]:
        """The ``outputs`` of OIP model metadata."""
        names = [(self.id_field, "BYTES"), *((f.name, OIP_TYPES[f.type]) for f in self.outputs)]
        return [{"name": n, "datatype": d, "shape": [-1]} for n, d in names]

    # -- batch -------------------------------------------------------------------------

    def arrow_schema(self, *extra: tuple[str, pa.DataType]) -> pa.Schema:
        """The batch output's schema: the id, every output field, then ``extra``."""
        fields = [(f.name, ARROW_TYPES[f.type]) for f in self.fields]
        return pa.schema([(self.id_field, pa.string()), *fields, *extra])


def _oip_value(kind: OutputType, value: Any) -> Any:
    """A value as OIP carries it: a list of strings joined by commas; null stays null."""
    if value is None:
        return None
    if kind == "str_list":
        return ",".join(value)
    return PYTHON_TYPES[kind](value)


def _whole_numbers(column: pd.Series) -> pd.Series:
    """An ``int`` output that a rejected row's null made float (``_merge_column``), as
    whole numbers again, null where rejected: ``35``, not ``35.0``, in every answer."""
    try:
        return column.astype("Int64")
    except (TypeError, ValueError):  # not whole numbers after all: leave them as they are
        return column


def predictions(scored: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """:meth:`OutputContract.frame` of ``spec``'s contract."""
    return OutputContract(spec).frame(scored)


def records(frame: pd.DataFrame) -> list[Record]:
    """JSON-ready dicts: NaN becomes null, numpy scalars become Python ones."""
    return _records({name: frame[name] for name in frame.columns}, len(frame))


def _records(named: Mapping[Any, pd.Series[Any] | None], rows: int) -> list[Record]:
    """:func:`records` of a frame of ``rows`` rows with these columns (None: all null)."""
    columns = []
    for series in named.values():
        if series is None:
            columns.append([None] * rows)
            continue
        missing = series.isna().to_numpy()
        values = series.to_numpy(dtype=object)
        columns.append(
            [None if gone else _plain(v) for v, gone in zip(values, missing, strict=True)]
        )
    names = [str(k) for k in named]
    return [dict(zip(names, row, strict=True)) for row in zip(*columns, strict=True)]


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, pd.Timestamp):
        return v.isoformat()
    return v
