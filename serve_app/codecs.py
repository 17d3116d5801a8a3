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
from stageline.outputs import OutputContract, Record
from stageline.spec import PipelineSpec
from stageline.stage import split_error

OIP_TYPES = {
    "str": "BYTES",
    "category": "BYTES",
    "datetime": "BYTES",
    "int": "INT64",
    "float": "FP64",
    "bool": "BOOL",
}
"""The OIP datatype of each request field type."""


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

    def records(self, payload: Any, message: str = "the request is not valid") -> list[Record]:
        """The records of a ``/predict`` body, validated (else a 422 naming each field)."""
        try:
            parsed = self.body.model_validate(payload)
        except ValidationError as e:
            raise ApiError(422, "invalid_request", message, details=validation_details(e)) from None
        return [r.model_dump() for r in parsed.records]  # type: ignore[attr-defined]

    # -- /predict ----------------------------------------------------------------------

    def predict_answer(self, scored: list[Record], request_id: str) -> Record:
        """The ``/predict`` answer; a 422 when no record could be scored."""
        out, failed = [], []
        id_field = self.contract.id_field
        for i, row in enumerate(scored):
            if row["error"]:
                stage, reason = split_error(row["error"])
                out.append({"id": row[id_field], "error": {"stage": stage, "message": reason}})
                failed.append({"record": i, "stage": stage, "message": reason})
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
        body: Record = {
            "model_name": name,
            "model_version": str(int(scored[0]["model_version"])),
            "outputs": self.contract.oip_outputs(scored, wanted),
        }
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
                {"name": f, "datatype": OIP_TYPES[s.type], "shape": [-1]}
                for f, s in self.spec.request.fields.items()
            ],
            "outputs": self.contract.oip_metadata(),
        }


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
