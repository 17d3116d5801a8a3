"""Batch validation: every request-schema rule marks only the row that breaks it, with the
field and the reason, keeps the record as it arrived, and the good rows still get scored."""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from stageline import Pipeline
from stageline.pipeline import StageChain
from stageline.spec import RequestSchema, load_spec
from stageline.stages.validate import RAW_COLUMN, records_frame, validate_frame

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


# --------------------------------------------------------------------------- typed records

# Every field type as required, nullable and defaulted: the ways a column gets its dtype.
WIDE_SPEC = """\
name: wide
request:
  id_field: id
  fields:
    id: {type: str, max_length: 12}
    i: {type: int}
    i_null: {type: int, required: false}
    i_def: {type: int, default: 7}
    f: {type: float}
    f_null: {type: float, required: false}
    f_def: {type: float, default: 0.5}
    b: {type: bool}
    b_null: {type: bool, required: false}
    b_def: {type: bool, default: true}
    c: {type: category, values: [red, green]}
    c_null: {type: category, values: [red, green], required: false}
    s_null: {type: str, required: false}
    s_def: {type: str, default: none-given}
    t: {type: datetime}
    t_null: {type: datetime, required: false}
stages:
  - name: postprocess
    uses: stageline.stages.postprocess:Decision
"""

_INTS = st.one_of(
    st.integers(-(2**63), 2**63),
    st.sampled_from([2**53, 2**53 + 1, -(2**53) - 1, 2**63 - 1, -(2**63) + 1]),
)
# Per type: (values of its own kind, values a client may send instead).
_RAW: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "int": (
        st.integers(-(10**6), 10**6),
        st.one_of(_INTS, _INTS.map(str), st.floats(-1e20, 1e20), st.booleans()),
    ),
    "float": (
        st.floats(allow_nan=False, allow_infinity=False),
        st.one_of(
            st.just(math.nan), st.integers(-(2**70), 2**70),
            st.sampled_from(["1.5", "-0", "1e3", "x"]),
        ),
    ),
    "bool": (st.booleans(), st.sampled_from([0, 1, "true", "no", "yes", 2])),
    "category": (st.sampled_from(["red", "green"]), st.sampled_from(["blue", 1])),
    "str": (st.text(max_size=12), st.one_of(
        st.text(min_size=13), st.integers(-999, 999), st.floats(-5, 5))),
    "datetime": (
        st.datetimes(datetime(1971, 1, 1), datetime(2100, 1, 1)),
        st.one_of(
            st.datetimes(datetime(1678, 1, 2), datetime(2261, 12, 30)),
            st.datetimes(
                datetime(1700, 1, 1), datetime(2200, 1, 1),
                timezones=st.sampled_from(
                    [timezone.utc, timezone(timedelta(hours=-7, minutes=-30))]
                ),
            ),
            st.datetimes(datetime(1971, 1, 1), datetime(2100, 1, 1)).map(datetime.isoformat),
            st.integers(0, 4_000_000_000_000),
        ),
    ),
}  # fmt: skip


@st.composite
def _raw_records(draw: st.DrawFn, schema: RequestSchema) -> list[dict[str, Any]]:
    """1 to 4 records as clients send them: values of each field's own kind, but in
    about half the records one field given another kind (a number as text, an epoch
    time, a huge int); optional fields null or left out; with the prediction log's
    extra keys or without."""
    extras = draw(st.booleans())
    out = []
    for _ in range(draw(st.integers(1, 4))):
        record: dict[str, Any] = {}
        odd = draw(st.sampled_from([*schema.fields, *[None] * len(schema.fields)]))
        for name, field in schema.fields.items():
            if not field.is_required and draw(st.booleans()):
                if draw(st.booleans()):
                    record[name] = None
                continue
            usual, other = _RAW[field.type]
            record[name] = draw(other if name == odd else usual)
        out.append(record)
    return (
        out if not extras else [{**r, "_rid": f"r{i}", "_at": 1.5 + i} for i, r in enumerate(out)]
    )


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> StageChain:
    """The validation stage alone, on ``WIDE_SPEC``."""
    home = tmp_path_factory.mktemp("wide")
    (home / "wide.yaml").write_text(WIDE_SPEC)
    return StageChain(load_spec(home / "wide.yaml"), [], home, validate=True)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_records_the_record_model_accepted_are_typed_as_validation_types_them(
    wide: StageChain, data: st.DataObject
) -> None:
    """Online, a record is validated once (by the record model) and its frame is built
    typed: the same frame, value for value and dtype for dtype, as validating it again."""
    schema = wide.spec.request
    model = schema.record_model()
    accepted: list[dict[str, Any]] = []
    for record in data.draw(_raw_records(schema)):
        extra: dict[str, Any] = {k: record.pop(k) for k in ("_rid", "_at") if k in record}
        try:
            accepted.append({**model.model_validate(record).model_dump(), **extra})
        except ValidationError:
            continue
    assume(accepted)
    validated = wide(pd.DataFrame.from_records(accepted))
    typed = records_frame(accepted, schema)
    pd.testing.assert_frame_equal(typed, validated, check_exact=True)
    assert list(typed.columns) == list(validated.columns)


def test_a_missing_optional_bool_stays_missing(wide: StageChain) -> None:
    """An optional bool without a default left out is unknown, not false, in batch and
    online alike (the model sees a missing value, as for any other optional field)."""
    record = {"id": "r", "i": 1, "f": 0.5, "b": True, "c": "red", "t": "2026-01-20T10:15:00Z"}
    online = wide.spec.request.record_model().model_validate(record).model_dump()
    for frame in (
        wide(pd.DataFrame([record, {**record, "b_null": True}])),
        records_frame([online, {**online, "b_null": True}], wide.spec.request),
    ):
        assert frame["b_null"].isna().tolist() == [True, False]
        assert frame["b_def"].tolist() == [True, True]  # a default fills in
        assert frame["_error"].isna().all()
