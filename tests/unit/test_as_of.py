"""Point-in-time scoring (``as_of``): each row's features are those valid at its event
time, from the offline store's history, as training joins them; in process and from
``stageline predict --as-of``. Ray-free: tests/integration/test_batch_as_of.py runs batch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from stageline import Pipeline
from stageline.demo.train import DemoResult
from stageline.features import OfflineStore, materialize
from stageline.spec import PipelineSpec, SpecError, load_spec
from stageline_cli import main
from tests.conftest import FRAUD_SPEC

VIEW = "customer_stats"
FOUND = f"{VIEW}_found"
FEATURES = ["avg_amount_30d", "txn_count_7d", "account_age_days", "home_country"]
DEFAULTS = (50.0, 0, 0, "??")  # the fraud spec's defaults for the view
AS_OF_NOTE = "features as of each row's event time"
NO_EVENT_TIME = "set request.event_time"

# One customer whose habits change on Jan 10: a small spender at home, then a big one abroad.
JAN_1 = ("c-1", "2026-01-01T00:00:00Z", 20.0, 2, 100, "US")
JAN_10 = ("c-1", "2026-01-10T00:00:00Z", 900.0, 30, 109, "FR")
HISTORY = pd.DataFrame(
    [JAN_10, JAN_1],  # not in time order in the file
    columns=["customer_id", "event_time", *FEATURES],
).assign(event_time=lambda f: pd.to_datetime(f["event_time"], utc=True))

# (transaction, customer, time, the features valid then; None: none yet)
ROWS = [
    ("t-before", "c-1", "2025-12-31T23:59:00Z", None),  # before c-1's first value
    ("t-jan-5", "c-1", "2026-01-05T12:00:00Z", JAN_1[2:]),
    ("t-jan-10", "c-1", "2026-01-10T00:00:00Z", JAN_10[2:]),  # exactly at the event time
    ("t-feb", "c-1", "2026-02-01T08:00:00Z", JAN_10[2:]),
    ("t-stranger", "c-9", "2026-01-05T12:00:00Z", None),  # never in the store
]


def request_rows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "transaction_id": [t for t, _, _, _ in ROWS],
            "customer_id": [c for _, c, _, _ in ROWS],
            "amount": 300.0,
            "merchant_category": "electronics",
            "ts": [at for _, _, at, _ in ROWS],
            "country": "US",
        }
    )


@pytest.fixture
def home(demo: DemoResult, fraud_spec: PipelineSpec, tmp_path: Path) -> Path:
    """The demo's model, with HISTORY as the whole feature store (online: its latest)."""
    home = tmp_path / "home"
    shutil.copytree(demo.home / "models", home / "models")
    OfflineStore(home, fraud_spec.features.views).write(VIEW, HISTORY)
    materialize(fraud_spec, home, [VIEW])
    return home


def without_event_time(spec: PipelineSpec) -> PipelineSpec:
    data = spec.model_dump()
    del data["request"]["event_time"]
    return PipelineSpec.model_validate(data)


def test_each_row_gets_the_features_valid_at_its_event_time(
    fraud_spec: PipelineSpec, home: Path
) -> None:
    rows = request_rows()

    frame = Pipeline(fraud_spec, home, as_of=True)(rows)

    expected = pd.DataFrame(
        [(*(values or DEFAULTS), values is not None) for _, _, _, values in ROWS],
        columns=[*FEATURES, FOUND],
    ).astype({"avg_amount_30d": "float64", "txn_count_7d": "int64", "account_age_days": "int64"})
    assert frame["_error"].isna().all()
    pd.testing.assert_frame_equal(
        frame[[*FEATURES, FOUND]].astype({"home_country": object}),
        expected.astype({"home_country": object}),
    )
    assert frame["transaction_id"].tolist() == rows["transaction_id"].tolist()


def test_scores_differ_from_online_exactly_where_the_features_did(
    fraud_spec: PipelineSpec, home: Path
) -> None:
    rows = request_rows()

    as_of = scores(Pipeline(fraud_spec, home, as_of=True).predict(rows))
    online = scores(Pipeline(fraud_spec, home).predict(rows))

    # Online, c-1 always has its Jan 10 values: only rows as of another time may differ.
    for same in ("t-jan-10", "t-feb", "t-stranger"):
        assert as_of[same] == online[same], same
    for changed in ("t-before", "t-jan-5"):
        assert as_of[changed] != online[changed], changed
    # A 300 spend by a 20-a-month customer is far more suspicious than by a 900 one.
    assert as_of["t-jan-5"] > online["t-jan-5"]


def scores(predictions: pd.DataFrame) -> dict[str, float]:
    return dict(
        zip(predictions["transaction_id"], predictions["score"].to_numpy(float), strict=True)
    )


def test_a_row_without_a_valid_event_time_is_rejected_not_scored(
    fraud_spec: PipelineSpec, home: Path
) -> None:
    rows = request_rows().astype({"ts": object})
    rows.loc[1, "ts"] = None
    rows.loc[2, "ts"] = "yesterday"

    result = Pipeline(fraud_spec, home, as_of=True).predict(rows)

    assert result["error"][1] == "validate: ts: required field is missing"
    assert str(result["error"][2]).startswith("validate: ts: must be an ISO 8601 date-time")
    assert result["error"].drop([1, 2]).isna().all()
    assert result["score"].drop([1, 2]).notna().all()


def test_a_spec_without_event_time_refuses_as_of_in_one_line(
    fraud_spec: PipelineSpec, home: Path
) -> None:
    spec = without_event_time(fraud_spec)

    with pytest.raises(SpecError, match=NO_EVENT_TIME) as caught:
        Pipeline(spec, home, as_of=True)

    assert "\n" not in str(caught.value)
    assert Pipeline(spec, home).predict(request_rows())["error"].isna().all()  # online: fine


def run_cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_stageline_predict_as_of(
    capsys: pytest.CaptureFixture[str], fraud_spec: PipelineSpec, home: Path, tmp_path: Path
) -> None:
    source = tmp_path / "rows.parquet"
    request_rows().to_parquet(source)
    common = ("predict", "--spec", FRAUD_SPEC, "--home", home, "--input", source)

    code, out, err = run_cli(capsys, *common, "--as-of")
    _, online_out, online_err = run_cli(capsys, *common)

    assert code == 0, err
    printed = {r["transaction_id"]: r["score"] for r in map(json.loads, out.splitlines())}
    assert printed == scores(Pipeline(fraud_spec, home, as_of=True).predict(request_rows()))
    online = {r["transaction_id"]: r["score"] for r in map(json.loads, online_out.splitlines())}
    assert printed["t-jan-5"] != online["t-jan-5"]
    assert f"scored 5 of 5 rows (0 rejected, see 'error') with fraud v1, {AS_OF_NOTE} in " in err
    assert AS_OF_NOTE not in online_err


def test_stageline_predict_as_of_without_event_time_says_what_to_set(
    capsys: pytest.CaptureFixture[str], home: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "fraud.yaml"
    spec.write_text(FRAUD_SPEC.read_text().replace("  event_time: ts\n", ""))
    source = tmp_path / "rows.parquet"
    request_rows().to_parquet(source)

    code, out, err = run_cli(
        capsys, "predict", "--spec", spec, "--home", home, "--input", source, "--as-of"
    )

    assert (code, out) == (1, "")
    assert err.startswith("stageline: error: ")
    assert NO_EVENT_TIME in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("event_time: when", "event_time 'when' is not one of the fields"),
        ("event_time: amount", "event_time 'amount' is a float field; it must name a datetime"),
        ("event_time: country", "event_time 'country' is a str field"),
    ],
    ids=["unknown-field", "float-field", "str-field"],
)
def test_event_time_must_name_a_datetime_field(tmp_path: Path, change: str, message: str) -> None:
    spec = tmp_path / "fraud.yaml"
    spec.write_text(FRAUD_SPEC.read_text().replace("event_time: ts", change, 1))

    with pytest.raises(SpecError) as caught:
        load_spec(spec)

    assert f"request.event_time (line 10): {message}" in str(caught.value)


def test_event_time_must_be_a_required_field(tmp_path: Path) -> None:
    text = FRAUD_SPEC.read_text()
    ts_line = next(line for line in text.splitlines() if line.strip().startswith("ts:"))
    spec = tmp_path / "fraud.yaml"
    spec.write_text(text.replace(ts_line, "    ts: {type: datetime, required: false}"))

    with pytest.raises(SpecError, match="event_time 'ts' must be a required field"):
        load_spec(spec)
