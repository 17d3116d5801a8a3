"""Batch validation: every request-schema rule marks only the row that breaks it, with the
field and the reason, keeps the record as it arrived, and the good rows still get scored."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from stageline import Pipeline
from stageline.spec import RequestSchema, load_spec
from stageline.stages.validate import RAW_COLUMN, validate_frame

# One field of each kind, with every bound: the rules fraud.yaml does not exercise.
TINY_SPEC = """\
name: tiny
request:
  id_field: id
  fields:
    id: {type: str, max_length: 8}
    n: {type: int, gt: 0, lt: 100}
    x: {type: float, ge: -1, le: 1}
    flag: {type: bool}
    color: {type: category, values: [red, green]}
    when: {type: datetime}
    note: {type: str, default: none-given}
stages:
  - name: postprocess
    uses: stageline.stages.postprocess:Decision
"""

TINY_GOOD = {
    "id": "r-1",
    "n": 5,
    "x": 0.5,
    "flag": True,
    "color": "red",
    "when": "2026-01-20T10:15:00Z",
    "note": "hi",
}
_MISSING = object()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> RequestSchema:
    path = tmp_path_factory.mktemp("tiny") / "tiny.yaml"
    path.write_text(TINY_SPEC)
    return load_spec(path).request


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        pytest.param("n", _MISSING, "required field is missing", id="required-missing"),
        pytest.param("x", None, "required field is missing", id="null-in-required"),
        pytest.param("id", ["r", 1], "must be a string", id="str-wrong-type"),
        pytest.param("id", True, "must be a string", id="str-given-bool"),
        pytest.param("id", "r" * 9, "at most 8 characters", id="str-too-long"),
        pytest.param("n", 1.5, "must be an integer", id="int-non-integral"),
        pytest.param("n", "many", "must be an integer", id="int-not-a-number"),
        pytest.param("n", 2**64, "must be an integer", id="int-beyond-int64"),
        pytest.param("x", "abc", "must be a finite number", id="float-not-a-number"),
        pytest.param("x", False, "must be a finite number", id="float-given-bool"),
        pytest.param("x", math.nan, "required field is missing", id="float-nan"),
        pytest.param("x", math.inf, "must be a finite number", id="float-inf"),
        pytest.param("flag", "maybe", "must be true or false", id="bool-garbage"),
        pytest.param("color", "blue", "must be one of ['red', 'green']", id="category-outside"),
        pytest.param("when", "yesterday", "ISO 8601", id="datetime-unparseable"),
        pytest.param("when", "2026-02-30T10:00:00", "ISO 8601", id="datetime-no-such-day"),
        pytest.param("when", "3000-01-01T00:00:00Z", "between 1678-01-01", id="datetime-far"),
        pytest.param("n", 0, "must be > 0", id="gt"),
        pytest.param("n", 100, "must be < 100", id="lt"),
        pytest.param("x", -1.5, "must be >= -1", id="ge"),
        pytest.param("x", 1.5, "must be <= 1", id="le"),
        pytest.param("note", "hello", None, id="control-optional-given"),
    ],
)
def test_each_rule_marks_only_the_row_that_breaks_it(
    tiny: RequestSchema, field: str, value: Any, reason: str | None
) -> None:
    bad = dict(TINY_GOOD)
    if value is _MISSING:
        del bad[field]
    else:
        bad[field] = value
    batch = pd.DataFrame([TINY_GOOD, bad, TINY_GOOD])
    sent = batch.iloc[1].to_dict()  # the bad record as the batch holds it

    out = validate_frame(batch, tiny)

    assert out.loc[[0, 2], "_error"].isna().all()
    # The good rows come out typed for the stages after validation.
    assert out.loc[0, "n"] == 5
    assert out.loc[0, "flag"] == True  # noqa: E712 - numpy bool
    assert out.loc[0, "when"] == pd.Timestamp("2026-01-20T10:15:00Z")
    if reason is None:
        assert out["_error"].isna().all()
        return
    error = str(out.loc[1, "_error"])
    assert error.startswith(f"validate: {field}: "), error
    assert reason in error
    raw = json.loads(str(out.loc[1, RAW_COLUMN]))
    assert raw.keys() == sent.keys()
    assert all(_same(raw[k], v) for k, v in sent.items()), raw
    assert out.loc[[0, 2], RAW_COLUMN].isna().all()


def test_optional_field_missing_gets_its_default(tiny: RequestSchema) -> None:
    record = {k: v for k, v in TINY_GOOD.items() if k != "note"}
    out = validate_frame(pd.DataFrame([record, {**record, "note": None}, TINY_GOOD]), tiny)
    assert out["_error"].isna().all()
    assert out["note"].tolist() == ["none-given", "none-given", "hi"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        *[("flag", v) for v in ("true", "no", "on", "OFF", 1, 0, 1.0, 2, " true ", "maybe")],
        *[("n", v) for v in ("7", " 7 ", "1e3", "1.0", 7.0, 2**63, 2**62, True)],
        *[("x", v) for v in ("0.5", ".5", "-0", "1_0", "0x1", True)],
        *[("id", v) for v in (12345, 1.5, -0.0, True, "")],
        *[("color", v) for v in ("red", "RED", 1)],
        *[
            ("when", v)
            for v in (
                1_700_000_000,
                1.7e12,
                "1700000000",
                "2026-01-20",
                "2026-01-20T10:15:00+05:00",
                "2026-01-20 10:15",
                "20260120",
                "today",
                "2026-01",
                -(10**10),
            )
        ],
    ],
)
def test_validation_reads_edge_values_as_the_record_model_does(
    tiny: RequestSchema, field: str, value: Any
) -> None:
    """Online (pydantic) and batch accept the same values, and read them the same."""
    record = {**TINY_GOOD, field: value}
    try:
        online: Any = tiny.record_model().model_validate(record).model_dump()[field]
    except ValidationError:
        online = None
    for frame in (pd.DataFrame([record]), pd.DataFrame([record, TINY_GOOD], dtype=object)):
        out = validate_frame(frame, tiny)
        accepted = bool(out["_error"].isna().iloc[0])
        assert accepted == (online is not None), out.loc[0, "_error"]
        if accepted:
            got: Any = out.loc[0, field]
            if isinstance(online, datetime):
                online = (
                    pd.Timestamp(online).tz_localize("UTC") if online.tzinfo is None else online
                )
            assert got == online


# --------------------------------------------------------------------------- fraud pipeline

# One bad row per rule the fraud request schema has: (field, value, words in the reason).
FRAUD_BAD_ROWS: list[tuple[str, Any, str]] = [
    ("customer_id", _MISSING, "required field is missing"),
    ("transaction_id", None, "required field is missing"),
    ("customer_id", ["c1"], "must be a string"),
    ("customer_id", "c" * 65, "at most 64 characters"),
    ("amount", "lots", "must be a finite number"),
    ("amount", math.nan, "required field is missing"),
    ("amount", math.inf, "must be a finite number"),
    ("amount", -3.0, "must be >= 0 (got -3.0)"),
    ("amount", 2_000_000, "must be <= 1000000"),
    ("merchant_category", "casino", "must be one of"),
    ("ts", "not-a-date", "ISO 8601"),
    ("country", "USA", "at most 2 characters"),
]


def test_bad_rows_are_reported_and_good_rows_in_the_batch_still_scored(
    fraud_pipeline: Pipeline, good_record: dict[str, object]
) -> None:
    records: list[dict[str, Any]] = []
    for i, (field, value, _) in enumerate(FRAUD_BAD_ROWS):
        records.append({**good_record, "transaction_id": f"good-{i}", "amount": 10.0 + i})
        bad = {**good_record, "transaction_id": f"bad-{i}"}
        if value is _MISSING:
            del bad[field]
        else:
            bad[field] = value
        records.append(bad)
    no_country = {k: v for k, v in good_record.items() if k != "country"}
    records.append({**no_country, "transaction_id": "good-default"})
    batch = pd.DataFrame(records)

    predicted = fraud_pipeline.predict(batch)

    assert len(predicted) == len(batch)
    is_bad = np.array([i % 2 == 1 and i < 2 * len(FRAUD_BAD_ROWS) for i in range(len(batch))])
    good, bad_rows = predicted[~is_bad], predicted[is_bad]
    assert good["error"].isna().all(), good["error"].tolist()
    assert good["score"].between(0, 1).all()
    assert good["label"].isin([True, False]).all()
    assert (good["model_name"] == "fraud").all()
    assert bad_rows["score"].isna().all()
    for (field, _, reason), error in zip(FRAUD_BAD_ROWS, bad_rows["error"], strict=True):
        assert error.startswith(f"validate: {field}: "), error
        assert reason in error, error

    # Bad neighbours change nothing: the good rows score as they would on their own.
    alone = fraud_pipeline.predict(batch[~is_bad])
    assert np.array_equal(good["score"].to_numpy(), alone["score"].to_numpy())
    assert good["transaction_id"].tolist() == alone["transaction_id"].tolist()


def test_optional_field_missing_is_defaulted_and_scored(
    fraud_pipeline: Pipeline, good_record: dict[str, object]
) -> None:
    without = {k: v for k, v in good_record.items() if k != "country"}
    frame = fraud_pipeline(pd.DataFrame([without, good_record]))
    assert frame["_error"].isna().all()
    assert frame["country"].tolist() == ["US", "US"]
    # country defaults to US, so both rows are the same transaction and score the same.
    assert frame["score"].notna().all()
    assert frame["score"].iloc[0] == frame["score"].iloc[1]


def test_quarantined_record_keeps_its_original_json(
    fraud_pipeline: Pipeline, good_record: dict[str, object]
) -> None:
    bad = {**good_record, "amount": -5.0, "ts": "2026-01-20T10:15:00+02:00"}
    frame = fraud_pipeline(pd.DataFrame([good_record, bad]))
    assert frame[RAW_COLUMN].isna().tolist() == [True, False]
    # The record as the client sent it, not as validation coerced it.
    assert json.loads(str(frame.loc[1, RAW_COLUMN])) == bad
