"""The wire formats of the HTTP API: request bodies in, answers out.

``/predict`` takes ``{"records": [...]}``; the Open Inference Protocol (V2) takes named
tensors. Both become the same validated records for the scoring service, and its
scored records become each format's answer through the pipeline's
:class:`~stageline.outputs.OutputContract`. No Ray, no routes: plain functions.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from serve_app.http import ApiError
from stageline.outputs import PYTHON_TYPES, OutputContract, Record
from stageline.spec import PipelineSpec
from stageline.stage import split_error

FIELD_OIP_TYPES = {
    "str": "BYTES",
    "category": "BYTES",
    "datetime": "BYTES",
    "int": "INT64",
    "float": "FP64",
    "bool": "BOOL",
}
"""The OIP datatype of each request field type (outputs: ``stageline.outputs.OIP_TYPES``)."""


class RequestCodec:
    """Validated records from a request body of ``spec``'s schema."""

    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.contract = OutputContract(spec)
        self.record = spec.request.record_model(f"{_title(spec.name)}Record")
        self.body: type[BaseModel] = create_model(
            f"{_title(spec.name)}PredictRequest",
            __config__=ConfigDict(extra="forbid"),
            records=(
                list[self.record],  # type: ignore[name-defined]
                Field(min_length=1, max_length=spec.serve.max_records),
            ),
        )
        self.answer = self._answer_model(spec)

    def _answer_model(self, spec: PipelineSpec) -> type[BaseModel]:
        """The ``/predict`` answer as a pydantic model, for the OpenAPI page: one item
        per record, with the declared outputs or the reason it was not scored."""
        fields: dict[str, Any] = {
            self.contract.id_field: (Any, Field(description="The record's id.")),
            "error": (_RecordError | None, None),
        }
        for f in self.contract.outputs:
            fields[f.name] = (PYTHON_TYPES[f.type] | None, Field(None, description=f.description))
        fields["model"] = (
            _ModelRef | None,
            Field(
                None,
                description="The model that scored this record, given only when the records "
                "of one answer were scored by different models (a canary challenger).",
            ),
        )
        item = create_model(f"{_title(spec.name)}Prediction", **fields)
        return create_model(
            f"{_title(spec.name)}PredictAnswer",
            predictions=(list[item], ...),  # type: ignore[valid-type]
            model=(_ModelRef | None, None),
            request_id=(str, ...),
        )

    def records(self, payload: Any, message: str = "the request is not valid") -> list[Record]:
        """The records of a ``/predict`` body, validated (else a 422 naming each field)."""
        try:
            parsed = self.body.model_validate(payload)
        except ValidationError as e:
            raise ApiError(422, "invalid_request", message, details=validation_details(e)) from None
        return [r.model_dump() for r in parsed.records]  # type: ignore[attr-defined]

    def each_record(self, payload: Any) -> tuple[list[Record], dict[int, Record]]:
        """``?partial=true``: the valid records of a ``/predict`` body, and for each
        invalid one (by its place) the reason, as a stage's rejection reads. The body's
        own shape (a ``records`` list of 1 to ``max_records``) must still be right."""
        if not isinstance(payload, dict) or set(payload) != {"records"}:
            return self.records(payload), {}  # the whole body is wrong: a 422 as usual
        raw = payload["records"]
        if not isinstance(raw, list) or not 1 <= len(raw) <= self.spec.serve.max_records:
            return self.records(payload), {}
        valid: list[Record] = []
        invalid: dict[int, Record] = {}
        for i, record in enumerate(raw):
            try:
                valid.append(self.record.model_validate(record).model_dump())
            except ValidationError as e:
                reasons = "; ".join(
                    f"{d['field']}: {d['message']}" if "field" in d else d["message"]
                    for d in validation_details(e)
                )
                rid = record.get(self.contract.id_field) if isinstance(record, dict) else None
                invalid[i] = {self.contract.id_field: rid, "error": f"request: {reasons}"}
        return valid, invalid

    # -- /predict ----------------------------------------------------------------------

    def predict_answer(
        self, scored: list[Record], request_id: str, invalid: dict[int, Record] | None = None
    ) -> Record:
        """The ``/predict`` answer; a 422 when no record could be scored. ``invalid``:
        records refused before scoring (``?partial=true``), put back in their places."""
        rows = iter(scored)
        total = len(scored) + len(invalid or {})
        scored = [(invalid or {}).get(i) or next(rows) for i in range(total)]
        out, failed = [], []
        id_field = self.contract.id_field
        # A canary challenger answers some entities: when the records of one answer were
        # scored by different models, each prediction names its own.
        models = {(r.get("model_name"), r.get("model_version")) for r in scored if not r["error"]}
        mixed = len(models) > 1
        for i, row in enumerate(scored):
            if row["error"]:
                stage, reason = split_error(row["error"])
                out.append({id_field: row[id_field], "error": {"stage": stage, "message": reason}})
                failed.append({"record": i, "stage": stage, "message": reason})
            elif mixed:
                out.append({**self.contract.prediction(row), "model": self.contract.model(row)})
            else:
                out.append(self.contract.prediction(row))
        if len(failed) == len(out):
            raise ApiError(422, "rejected", "no record could be scored", details=failed)
        good = next(row for row in scored if not row["error"])
        return {"predictions": out, "model": self.contract.model(good), "request_id": request_id}

    # -- Open Inference Protocol (V2) --------------------------------------------------

    def oip_records(self, payload: Any) -> tuple[list[Record], set[str]]:
        """The records of an OIP request, and the outputs it asks for (none: all)."""
        if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
            raise _invalid('expected {"inputs": [{name, shape, datatype, data}]}')
        columns: dict[str, list[Any]] = {}
        for tensor in payload["inputs"]:
            if not isinstance(tensor, dict) or not isinstance(tensor.get("data"), list):
                raise _invalid("each input needs a name and a data list")
            columns[str(tensor.get("name"))] = _flatten(tensor["data"])
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise _invalid(f"inputs differ in length: {sorted(lengths)}")
        n = lengths.pop()
        requested = payload.get("outputs") or []
        if not isinstance(requested, list) or not all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in requested
        ):
            raise _invalid('outputs must be a list of {"name": "<output name>"}')
        rows = [{k: v[i] for k, v in columns.items()} for i in range(n)]
        wanted = {str(o["name"]) for o in requested}
        return self.records({"records": rows}, "the inputs are not valid"), wanted

    def oip_answer(
        self, name: str, payload: dict[str, Any], scored: list[Record], wanted: set[str]
    ) -> Record:
        """The OIP inference answer; a 422 when any input could not be scored."""
        details = [
            {"record": i, "message": str(row["error"])}
            for i, row in enumerate(scored)
            if row["error"]
        ]
        if details:
            raise ApiError(422, "rejected", "some inputs could not be scored", details=details)
        body: Record = {"model_name": name}
        model = self.contract.model(scored[0])
        if model is not None:
            body["model_version"] = str(model["version"])
        body["outputs"] = self.contract.oip_outputs(scored, wanted)
        if "id" in payload:
            body["id"] = payload["id"]
        return body

    def oip_metadata(self, name: str, models: list[Record]) -> Record:
        """OIP model metadata: inputs from the request schema, outputs from the contract."""
        return {
            "name": name,
            "versions": sorted({str(m["version"]) for m in models}),
            "platform": "xgboost",
            "inputs": [
                {"name": f, "datatype": FIELD_OIP_TYPES[s.type], "shape": [-1]}
                for f, s in self.spec.request.fields.items()
            ],
            "outputs": self.contract.oip_metadata(),
        }


class _RecordError(BaseModel):
    stage: str
    """The stage that rejected the record."""
    message: str
    """Why."""


class _ModelRef(BaseModel):
    name: str
    version: int


def validation_details(error: ValidationError) -> list[dict[str, Any]]:
    """``[{"record": 3, "field": "amount", "message": ...}]`` from pydantic's errors."""
    details = []
    for err in error.errors(include_url=False, include_input=False):
        loc = list(err["loc"])
        detail: dict[str, Any] = {"message": err["msg"]}
        if len(loc) >= 2 and loc[0] == "records" and isinstance(loc[1], int):
            detail["record"] = loc[1]
            loc = loc[2:]
        if loc:
            detail["field"] = ".".join(str(p) for p in loc)
        details.append(detail)
    return details


def _invalid(message: str) -> ApiError:
    return ApiError(422, "invalid_request", message)


def _title(name: str) -> str:
    return "".join(p.capitalize() for p in name.replace("-", "_").split("_"))


def _flatten(data: list[Any]) -> list[Any]:
    """OIP data may be nested by shape ([[1], [2]]); records want one value per row."""
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out
