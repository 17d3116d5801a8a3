"""Feature store: point-in-time joins offline, latest values online, unknown entities."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from stageline import Pipeline
from stageline.demo import data
from stageline.features import MemoryOnlineStore, OfflineStore, materialize, open_online_store
from stageline.spec import FeatureViewSpec, PipelineSpec

VIEW = "stats"
FOUND = f"{VIEW}_found"
FEATURES = ["spend", "visits", "tier", "vip"]
DEFAULTS = {"spend": -1.0, "visits": 0, "tier": "none", "vip": False}
DTYPES: dict[str, Any] = {
    "spend": "float64",
    "visits": "int64",
    "tier": object,
    "vip": "bool",
    FOUND: "bool",
}

# A small hand-made spec: one view with a feature of every type.
SPEC = PipelineSpec.model_validate(
    {
        "name": "toy",
        "request": {"id_field": "id", "fields": {"id": {"type": "str"}}},
        "features": {
            "views": {
                VIEW: {
                    "entity": "user",
                    "event_time": "event_time",
                    "features": {
                        "spend": {"type": "float", "default": DEFAULTS["spend"]},
                        "visits": {"type": "int", "default": DEFAULTS["visits"]},
                        "tier": {"type": "str", "default": DEFAULTS["tier"]},
                        "vip": {"type": "bool", "default": DEFAULTS["vip"]},
                    },
                }
            }
        },
        "stages": [{"name": "decide", "uses": "stageline.stages.postprocess:Decision"}],
    }
)


def ts(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


# History of two users, deliberately not in time order in the file.
HISTORY = pd.DataFrame(
    [
        ("a", ts("2026-01-01 00:00"), 10.0, 1, "bronze", False),
        ("a", ts("2026-01-03 00:00"), 30.0, 3, "gold", True),
        ("a", ts("2026-01-02 00:00"), 20.0, 2, "silver", False),
        ("b", ts("2026-01-02 12:00"), 5.0, 7, "gold", False),
    ],
    columns=["user", "event_time", *FEATURES],
)
LATEST = {"a": (30.0, 3, "gold", True), "b": (5.0, 7, "gold", False)}

# (user, row timestamp, the values that were true then; None = no value yet)
AS_OF = [
    ("a", "2026-01-02 23:59:59.999999", (20.0, 2, "silver", False)),
    ("a", "2026-01-01 00:00", (10.0, 1, "bronze", False)),  # exactly at the event time
    ("b", "2026-02-01 00:00", (5.0, 7, "gold", False)),
    ("a", "2025-12-31 23:00", None),  # before a's first value
    ("a", "2026-01-03 00:00", (30.0, 3, "gold", True)),  # exactly at the event time
    ("b", "2026-01-02 11:59", None),  # b's only value lies in the future
    ("zed", "2026-01-05 00:00", None),  # an entity the view has never seen
    ("a", "2026-01-02 08:00", (20.0, 2, "silver", False)),
]


@pytest.fixture
def store_home(tmp_path: Path) -> Path:
    """A home whose offline table holds HISTORY."""
    OfflineStore(tmp_path, SPEC.features.views).write(VIEW, HISTORY)
    return tmp_path


def offline(home: Path) -> OfflineStore:
    return OfflineStore(home, SPEC.features.views)


def memory_store(home: Path) -> MemoryOnlineStore:
    return MemoryOnlineStore(offline(home), home / "online")


def expected_features(values: list[tuple[object, ...] | None], index: pd.Index) -> pd.DataFrame:
    """The typed feature columns and the found flag a user should get."""
    rows = [(*(v if v is not None else DEFAULTS.values()), v is not None) for v in values]
    frame = pd.DataFrame(rows, columns=[*FEATURES, FOUND], index=index)
    return frame.astype(DTYPES)


# --------------------------------------------------------------------------- offline


@pytest.mark.parametrize(
    "index",
    [
        pd.RangeIndex(len(AS_OF)),
        pd.Index([70, 10, 60, 0, 30, 50, 20, 40]),
        pd.Index([f"row-{i}" for i in "hgfedcba"]),
        pd.Index([1, 1, 2, 2, 3, 3, 4, 4]),
    ],
    ids=["range", "shuffled-int", "str", "duplicates"],
)
def test_point_in_time_join_uses_values_as_of_each_row(store_home: Path, index: pd.Index) -> None:
    rows = pd.DataFrame(
        {
            "user": [u for u, _, _ in AS_OF],
            "ts": [ts(t) for _, t, _ in AS_OF],
            "note": [f"n{i}" for i in range(len(AS_OF))],
        },
        index=index,
    )
    joined = offline(store_home).point_in_time_join(rows, VIEW, timestamp="ts")

    pd.testing.assert_frame_equal(joined[rows.columns], rows)  # same rows, order, index
    pd.testing.assert_frame_equal(
        joined[[*FEATURES, FOUND]], expected_features([v for _, _, v in AS_OF], index)
    )


def test_point_in_time_join_reads_naive_timestamps_as_utc(store_home: Path) -> None:
    rows = pd.DataFrame({"user": ["a", "a"], "ts": ["2026-01-01T23:00:00", "2025-12-31T23:00:00"]})
    joined = offline(store_home).point_in_time_join(rows, VIEW, timestamp="ts")
    assert joined["spend"].tolist() == [10.0, DEFAULTS["spend"]]
    assert joined[FOUND].tolist() == [True, False]


def _world_training_rows(home: Path) -> pd.DataFrame:
    """The demo world's training transactions, regenerated from its recorded seed."""
    marker = json.loads((home / "demo" / "world.json").read_text())
    world = data.generate(
        customers=marker["customers"],
        transactions=marker["transactions"],
        days=marker["days"],
        seed=marker["seed"],
    )
    return world.transactions.iloc[: int(len(world.transactions) * 0.8)]


def test_point_in_time_join_never_sees_the_future_on_the_demo_world(
    fraud_spec: PipelineSpec, demo_home: Path, tmp_path: Path
) -> None:
    """Every joined value's event time is the newest one at or before the row's time."""
    view = fraud_spec.features.views["customer_stats"]
    table = pd.read_parquet(demo_home / "features" / "customer_stats.parquet")
    event_ns = table[view.event_time].dt.tz_convert(None).to_numpy().astype("datetime64[ns]")
    # The event time itself becomes a feature, so the join reports which snapshot it used.
    table["as_of_ns"] = event_ns.astype("int64")
    fields = view.model_dump()
    fields["features"]["as_of_ns"] = {"type": "int", "default": -1}
    traced = FeatureViewSpec.model_validate(fields)
    store = OfflineStore(tmp_path, {"traced": traced})
    store.write("traced", table)

    sample = _world_training_rows(demo_home).sample(400, random_state=1)
    joined = store.point_in_time_join(sample, "traced", timestamp="ts")

    row_ns = sample["ts"].dt.tz_convert(None).to_numpy().astype("datetime64[ns]").astype("int64")
    history = {c: g.sort_values("as_of_ns") for c, g in table.groupby(view.entity)}
    found = joined["traced_found"].to_numpy()
    assert 0 < (~found).sum() < len(sample) / 5, "the sample should hold a few unknown customers"
    assert (joined.loc[found, "as_of_ns"].to_numpy() <= row_ns[found]).all()
    for (_, row), at_ns, got in zip(sample.iterrows(), row_ns, joined.itertuples(), strict=True):
        past = history.get(row["customer_id"])
        past = past[past["as_of_ns"] <= at_ns] if past is not None else None
        if past is None or past.empty:
            assert not got.traced_found
            assert got.avg_amount_30d == view.features["avg_amount_30d"].default
            continue
        want = past.iloc[-1]
        assert got.as_of_ns == want["as_of_ns"]
        for name in view.features:
            assert getattr(got, name) == want[name], (row["transaction_id"], name)


# --------------------------------------------------------------------------- online


@pytest.mark.parametrize(
    "keys",
    [
        [],
        ["a"],
        ["zed"],
        ["a", "a", "zed", "b", "a", "zed"],
        list(np.random.default_rng(0).choice(["a", "b", "c", "d"], 5_000)),
    ],
    ids=["empty", "one", "unknown", "duplicates", "5000"],
)
def test_online_lookup_serves_latest_values_and_defaults_in_one_call(
    store_home: Path, keys: list[str]
) -> None:
    materialize(SPEC, store_home)
    batch = pd.Series(keys, index=np.arange(len(keys))[::-1] * 3, dtype=object)

    out = memory_store(store_home).lookup(VIEW, batch)

    pd.testing.assert_frame_equal(
        out[[*FEATURES, FOUND]], expected_features([LATEST.get(k) for k in keys], batch.index)
    )


def test_online_lookup_of_a_view_without_entities_serves_defaults(tmp_path: Path) -> None:
    offline(tmp_path).write(VIEW, HISTORY.iloc[:0])
    materialize(SPEC, tmp_path)
    out = memory_store(tmp_path).lookup(VIEW, pd.Series(["a", "b"]))
    pd.testing.assert_frame_equal(out, expected_features([None, None], pd.RangeIndex(2)))


def test_materialize_writes_a_snapshot_that_later_stores_serve(store_home: Path) -> None:
    assert materialize(SPEC, store_home) == {VIEW: 2}
    assert (store_home / "online" / f"{VIEW}.parquet").exists()
    assert open_online_store(SPEC, store_home).lookup(VIEW, pd.Series(["a"]))["spend"][0] == 30.0

    newer = pd.DataFrame(
        [
            ("a", ts("2026-01-04"), 99.0, 9, "platinum", True),
            ("c", ts("2026-01-04"), 1.0, 1, "x", False),
        ],
        columns=HISTORY.columns,
    )
    offline(store_home).write(VIEW, pd.concat([HISTORY, newer]))
    # The online store serves the materialized snapshot, not the offline table...
    before = memory_store(store_home).lookup(VIEW, pd.Series(["a", "c"]))
    assert before["spend"].tolist() == [30.0, DEFAULTS["spend"]]

    assert materialize(SPEC, store_home) == {VIEW: 3}
    after = memory_store(store_home).lookup(VIEW, pd.Series(["a", "c"]))
    pd.testing.assert_frame_equal(
        after, expected_features([(99.0, 9, "platinum", True), (1.0, 1, "x", False)], after.index)
    )


def test_a_view_never_materialized_is_served_from_the_offline_latest_values(
    store_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert not (store_home / "online").exists()
    with caplog.at_level(logging.WARNING, logger="stageline.features.online"):
        out = memory_store(store_home).lookup(VIEW, pd.Series(["b", "a", "zed"]))
    pd.testing.assert_frame_equal(
        out, expected_features([LATEST["b"], LATEST["a"], None], out.index)
    )
    assert "stageline materialize" in caplog.text  # tells the user how to snapshot


# --------------------------------------------------------------------------- the stage


def test_feature_lookup_scores_an_unknown_customer_with_defaults(
    fraud_pipeline: Pipeline, fraud_spec: PipelineSpec, good_record: dict[str, object]
) -> None:
    newcomer = {**good_record, "transaction_id": "t-new", "customer_id": "never-seen-before"}
    frame = fraud_pipeline(pd.DataFrame([good_record, newcomer]))

    assert frame["customer_stats_found"].tolist() == [True, False]
    assert frame["_error"].isna().all()
    defaults = fraud_spec.features.views["customer_stats"].features
    unknown = frame.iloc[1]
    for name, feature in defaults.items():
        assert unknown[name] == feature.default, name
    predicted = fraud_pipeline.predict(pd.DataFrame([newcomer]))
    assert predicted["error"].isna().all()
    assert 0.0 <= predicted["score"].iloc[0] <= 1.0
    assert predicted["model_name"].iloc[0] == "fraud"
