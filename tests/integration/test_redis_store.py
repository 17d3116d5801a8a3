"""The Redis online store against a real redis-server (no Ray)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from stageline import Pipeline
from stageline.features import (
    FeatureStoreError,
    OfflineStore,
    StoreUnavailableError,
    materialize,
    open_online_store,
)
from stageline.features.cache import CachedOnlineStore
from stageline.spec import PipelineSpec
from tests.conftest import RedisServer, redis_spec

pytestmark = pytest.mark.integration

VIEW = "customer_stats"


@pytest.fixture
def rspec(fraud_spec: PipelineSpec, redis_server: RedisServer, demo_home: Path) -> PipelineSpec:
    spec = redis_spec(fraud_spec, redis_server.url, prefix=f"t{time.monotonic_ns()}")
    materialize(spec, demo_home)
    return spec


def test_redis_serves_exactly_what_memory_serves(
    rspec: PipelineSpec, fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame
) -> None:
    rows = holdout.head(3000)
    memory = Pipeline(fraud_spec, demo_home).predict(rows)
    from_redis = Pipeline(rspec, demo_home).predict(rows)
    assert from_redis["error"].isna().all()
    assert np.array_equal(memory["score"].to_numpy(), from_redis["score"].to_numpy())


def test_unknown_entity_gets_defaults_and_flag(rspec: PipelineSpec, demo_home: Path) -> None:
    store = open_online_store(rspec, demo_home)
    out = store.lookup(VIEW, pd.Series(["nobody", "c000001"], index=[7, 9]))
    assert out.index.tolist() == [7, 9]
    assert out[f"{VIEW}_found"].tolist() == [False, True]
    assert out.loc[7, "avg_amount_30d"] == 50.0
    assert out.loc[7, "home_country"] == "??"
    assert out["txn_count_7d"].dtype == "int64"
    assert store.lookup(VIEW, pd.Series([], dtype=str)).empty


def test_a_batch_is_one_round_trip(
    rspec: PipelineSpec, demo_home: Path, redis_server: RedisServer
) -> None:
    store = open_online_store(rspec, demo_home)
    keys = pd.Series([f"c{i:06d}" for i in range(1000)])
    store.lookup(VIEW, keys)  # loads the script once
    admin = redis.Redis.from_url(redis_server.url)
    before = admin.info("stats")["total_connections_received"], _calls(admin)
    store.lookup(VIEW, keys)
    after = admin.info("stats")["total_connections_received"], _calls(admin)
    assert after[0] == before[0], "a lookup opened a new connection: the pool is not reused"
    # One EVALSHA from the client; the GET and MGET inside the script are the only others.
    delta = {k: v - before[1].get(k, 0) for k, v in after[1].items() if k != "info"}
    assert {k: v for k, v in delta.items() if v} == {"evalsha": 1, "get": 1, "mget": 1}


def test_a_batch_larger_than_luas_unpack_limit_is_still_one_call(
    rspec: PipelineSpec, fraud_spec: PipelineSpec, demo_home: Path, redis_server: RedisServer
) -> None:
    # Batch runs look up 8192 keys at a time; Lua's unpack() stops at a few thousand.
    keys = pd.Series([f"c{i:06d}" for i in range(10_000)] + ["nobody"] * 10)
    store = open_online_store(rspec, demo_home)
    admin = redis.Redis.from_url(redis_server.url)
    before = _calls(admin).get("evalsha", 0)
    got = store.lookup(VIEW, keys)
    assert _calls(admin).get("evalsha", 0) - before == 1
    expected = open_online_store(fraud_spec, demo_home).lookup(VIEW, keys)
    pd.testing.assert_frame_equal(got, expected)
    assert not got[f"{VIEW}_found"].iloc[-10:].any()


def _calls(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def test_rematerializing_never_mixes_two_snapshots(
    fraud_spec: PipelineSpec, redis_server: RedisServer, tmp_path: Path
) -> None:
    spec = redis_spec(fraud_spec, redis_server.url, prefix="mix")
    store = open_online_store(spec, tmp_path)
    n = 30_000
    keys = [f"k{i}" for i in range(n)]

    def snapshot(value: float) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "customer_id": keys,
                "event_time": pd.Timestamp("2026-01-01", tz="UTC"),
                "avg_amount_30d": value,
                "txn_count_7d": 1,
                "account_age_days": 1,
                "home_country": "US",
            }
        )

    store.write(VIEW, snapshot(1.0))
    writer = threading.Thread(target=store.write, args=(VIEW, snapshot(2.0)))
    sample = pd.Series(keys[:: n // 500])
    seen: set[float] = set()
    writer.start()
    while writer.is_alive():
        values = set(store.lookup(VIEW, sample)["avg_amount_30d"])
        assert len(values) == 1, f"one batch saw two snapshots: {values}"
        seen |= values
    writer.join()
    assert set(store.lookup(VIEW, sample)["avg_amount_30d"]) == {2.0}
    # The old snapshot is gone: the view holds one value per key plus its pointer.
    admin = redis.Redis.from_url(redis_server.url)
    assert sum(1 for _ in admin.scan_iter(match="{mix:customer_stats}:*", count=5000)) == n + 1


def test_redis_down_fails_fast_and_recovers_without_restart(
    rspec: PipelineSpec, demo_home: Path, redis_server: RedisServer
) -> None:
    store = open_online_store(rspec, demo_home)
    keys = pd.Series(["c000001", "c000002"])
    expected = store.lookup(VIEW, keys)
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="did not answer"):
            store.lookup(VIEW, keys)
        # Never a hang: the 200 ms timeout holds (a generous bound, not a benchmark).
        assert time.monotonic() - started < 5
    finally:
        redis_server.resume()
    pd.testing.assert_frame_equal(store.lookup(VIEW, keys), expected)
    redis_server.stop()
    try:
        with pytest.raises(StoreUnavailableError):
            store.lookup(VIEW, keys)
    finally:
        redis_server.start()  # same port, data back from its append-only file
    pd.testing.assert_frame_equal(store.lookup(VIEW, keys), expected)


def test_never_materialized_view_is_a_clear_error(
    fraud_spec: PipelineSpec, redis_server: RedisServer, demo_home: Path
) -> None:
    spec = redis_spec(fraud_spec, redis_server.url, prefix="empty")
    store = open_online_store(spec, demo_home)
    with pytest.raises(StoreUnavailableError, match="stageline materialize"):
        store.lookup(VIEW, pd.Series(["c000001"]))


def test_password_from_env(
    fraud_spec: PipelineSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path, "--requirepass", "s3cret")
    server.start()
    try:
        spec = redis_spec(fraud_spec, server.url, password_env="TEST_REDIS_PASSWORD")
        monkeypatch.setenv("TEST_REDIS_PASSWORD", "wrong")
        with pytest.raises(FeatureStoreError, match="refused the credentials"):
            open_online_store(spec, tmp_path).lookup(VIEW, pd.Series(["x"]))
        monkeypatch.setenv("TEST_REDIS_PASSWORD", "s3cret")
        with pytest.raises(StoreUnavailableError, match="never materialized"):
            open_online_store(spec, tmp_path).lookup(VIEW, pd.Series(["x"]))
    finally:
        server.stop()


def test_values_are_read_by_name_whatever_the_spec_order(
    rspec: PipelineSpec, demo_home: Path
) -> None:
    """A replica whose spec lists the view's features in another order (or with a
    feature added since) reads the same values."""
    keys = pd.Series(["c000001", "c000002", "nobody"])
    before = open_online_store(rspec, demo_home).lookup(VIEW, keys)
    data = rspec.model_dump()
    features = data["features"]["views"][VIEW]["features"]
    reordered = dict(reversed(list(features.items())))
    reordered["chargebacks_90d"] = {"type": "int", "default": 0}
    data["features"]["views"][VIEW]["features"] = reordered
    after = open_online_store(PipelineSpec.model_validate(data), demo_home).lookup(VIEW, keys)
    pd.testing.assert_frame_equal(after[before.columns], before)
    assert after["chargebacks_90d"].tolist() == [0, 0, 0]


def cached_spec(rspec: PipelineSpec, **online: object) -> PipelineSpec:
    data = rspec.model_dump(mode="json")
    data["features"]["cache"] = {"max_entries": 1000, "ttl_s": 3600}
    data["features"]["online"].update(online)
    spec = PipelineSpec.model_validate(data)
    spec._base_dir = rspec.base_dir
    return spec


def test_the_lookup_cache_serves_repeated_keys_without_redis_and_a_new_snapshot_at_once(
    rspec: PipelineSpec, demo_home: Path, redis_server: RedisServer
) -> None:
    """Hits served as Redis would; a materialize seen by the next lookup that misses (no
    mixed batch), and by one that only hits after the store's check."""
    spec = cached_spec(rspec, refresh_s=0)  # no background check: this test checks by hand
    store = open_online_store(spec, demo_home)
    assert isinstance(store, CachedOnlineStore)
    keys = pd.Series(["c000001", "c000002", "nobody", "c000001"], index=[4, 3, 2, 1])
    expected = open_online_store(rspec, demo_home).lookup(VIEW, keys)

    pd.testing.assert_frame_equal(store.lookup(VIEW, keys), expected)
    redis_server.stop()  # every key cached: Redis is not asked
    try:
        pd.testing.assert_frame_equal(store.lookup(VIEW, keys), expected)
    finally:
        redis_server.start()
    assert (store.counts.hits, store.counts.misses) == (4, 4)

    # A new snapshot with other values, seen by a batch with one new key: the whole
    # batch is read again from it, not cached values of the old one beside a new one.
    latest = OfflineStore(demo_home, spec.features.views, spec.base_dir).latest(VIEW)
    materialize_with(rspec, latest.assign(avg_amount_30d=12345.0))
    mixed = store.lookup(VIEW, pd.Series(["c000001", "c000003"]))
    assert mixed["avg_amount_30d"].tolist() == [12345.0, 12345.0]

    # Only cached keys: served until the store checks which snapshot is current.
    materialize_with(rspec, latest.assign(avg_amount_30d=777.0))
    assert store.lookup(VIEW, pd.Series(["c000001"]))["avg_amount_30d"].tolist() == [12345.0]
    store.store.check()  # type: ignore[attr-defined]  # what the background check does
    assert store.lookup(VIEW, pd.Series(["c000001"]))["avg_amount_30d"].tolist() == [777.0]
    store.close()


def materialize_with(spec: PipelineSpec, latest: pd.DataFrame) -> None:
    writer = open_online_store(spec, Path("."))
    try:
        writer.write(VIEW, latest)
    finally:
        writer.close()


def test_the_age_of_a_redis_snapshot_is_when_it_was_materialized(
    rspec: PipelineSpec, demo_home: Path
) -> None:
    before = time.time()
    materialize(rspec, demo_home)
    rows = open_online_store(rspec, demo_home).read(VIEW, pd.Series(["c000001"]))
    assert rows.materialized_at is not None
    assert int(before) <= rows.materialized_at <= time.time()
