"""The output contract: what a pipeline answers for each record, written once.

Every way out of a pipeline is generated from :data:`PREDICTION` and :data:`MODEL`:
the frame :meth:`OutputContract.frame` (what ``Pipeline.predict`` returns and every
runtime computes), JSON records, the ``/predict`` item, the Open Inference Protocol
tensors and metadata, and the batch output's Arrow schema. A new output field is one
line here, and every codec carries it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from stageline.spec import PipelineSpec
from stageline.stage import ERROR_COLUMN

Kind = Literal["float", "bool", "int", "str", "str_list"]

Record = dict[str, Any]
"""One JSON-ready row: column name to a plain Python value (None for missing)."""


@dataclass(frozen=True)
class Output:
    """One field of every prediction."""

    name: str
    kind: Kind
    description: str

    @property
    def arrow_type(self) -> pa.DataType:
        return _ARROW[self.kind]

    @property
    def oip_datatype(self) -> str:
        return _OIP[self.kind]


_ARROW: dict[Kind, pa.DataType] = {
    "float": pa.float64(),
    "bool": pa.bool_(),
    "int": pa.int64(),
    "str": pa.string(),
    "str_list": pa.list_(pa.string()),
}
_OIP: dict[Kind, str] = {
    "float": "FP64",
    "bool": "BOOL",
    "int": "INT64",
    "str": "BYTES",
    "str_list": "BYTES",  # OIP has no list type: the strings joined by commas
}

PREDICTION: tuple[Output, ...] = (
    Output("score", "float", "The model's score for the record."),
    Output("label", "bool", "The decision: score at or over the model's threshold."),
    Output("reasons", "str_list", "Features that pushed the score up most, strongest first."),
)
"""What a caller gets for each record it sent."""

MODEL: tuple[Output, ...] = (
    Output("model_name", "str", "The registered model that scored the record."),
    Output("model_version", "int", "Its version."),
)
"""Which model answered: once per ``/predict`` response, on every batch output row."""

OUTPUT_COLUMNS: tuple[str, ...] = tuple(o.name for o in (*PREDICTION, *MODEL))
"""The columns a pipeline's last stage provides (see ``stages.postprocess.Decision``)."""

ERROR = "error"
"""The output column naming why a record was not scored (``"<stage>: <reason>"``)."""


class OutputContract:
    """The outputs of one pipeline: its id field, then :data:`PREDICTION` and
    :data:`MODEL`, and the codecs built from them."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.id_field = spec.request.id_field
        self.fields: tuple[Output, ...] = (*PREDICTION, *MODEL)

    # -- frames and records ------------------------------------------------------------

    def frame(self, scored: pd.DataFrame) -> pd.DataFrame:
        """The caller-facing columns of a pipeline's output: the id, every output
        field, and ``error``; the same in every runtime."""
        # One constructor call, not a column at a time: on the one-row frames of online
        # requests, pandas' per-call overhead is most of the cost.
        columns: dict[str, Any] = {}
        if self.id_field in scored:
            columns[self.id_field] = scored[self.id_field]
        for field in self.fields:
            columns[field.name] = scored.get(field.name)
        error = scored.get(ERROR_COLUMN)
        if error is None:
            columns[ERROR] = pd.Series(None, index=scored.index, dtype=object)
        else:
            columns[ERROR] = error.astype(object).where(error.notna(), None)
        return pd.DataFrame(columns, index=scored.index)

    def records(self, scored: pd.DataFrame) -> list[Record]:
        """:meth:`frame` as JSON-ready dicts."""
        return records(self.frame(scored))

    # -- /predict ----------------------------------------------------------------------

    def prediction(self, row: Mapping[str, Any]) -> Record:
        """One item of a ``/predict`` answer: the id and every :data:`PREDICTION` field."""
        item: Record = {"id": row[self.id_field]}
        for field in PREDICTION:
            value = row[field.name]
            item[field.name] = [] if value is None and field.kind == "str_list" else value
        return item

    @staticmethod
    def model(row: Mapping[str, Any]) -> Record:
        """``{"name", "version"}`` of the model that scored ``row``."""
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
        for field in PREDICTION:
            tensors.append(
                {
                    "name": field.name,
                    "datatype": field.oip_datatype,
                    "data": [_oip_value(field, r[field.name]) for r in rows],
                }
            )
        return [{**t, "shape": [len(rows)]} for t in tensors if not wanted or t["name"] in wanted]

    def oip_metadata(self) -> list[Record]:
        """The ``outputs`` of OIP model metadata."""
        names = [(self.id_field, "BYTES"), *((f.name, f.oip_datatype) for f in PREDICTION)]
        return [{"name": n, "datatype": d, "shape": [-1]} for n, d in names]

    # -- batch -------------------------------------------------------------------------

    def arrow_schema(self, *extra: tuple[str, pa.DataType]) -> pa.Schema:
        """The batch output's schema: the id, every output field, then ``extra``."""
        fields = [(f.name, f.arrow_type) for f in self.fields]
        return pa.schema([(self.id_field, pa.string()), *fields, *extra])


def _oip_value(field: Output, value: Any) -> Any:
    if field.kind == "str_list":
        return ",".join(value or [])
    if field.kind == "float":
        return float(value)
    if field.kind == "bool":
        return bool(value)
    if field.kind == "int":
        return int(value)
    return str(value)


def predictions(scored: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """:meth:`OutputContract.frame` of ``spec``'s contract."""
    return OutputContract(spec).frame(scored)


def records(frame: pd.DataFrame) -> list[Record]:
    """JSON-ready dicts: NaN becomes null, numpy scalars become Python ones."""
    columns = []
    for name in frame.columns:
        series = frame[name]
        missing = series.isna().to_numpy()
        values = series.to_numpy(dtype=object)
        columns.append(
            [None if gone else _plain(v) for v, gone in zip(values, missing, strict=True)]
        )
    names = [str(k) for k in frame.columns]
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
