"""Fresh features and caches, without Ray: a new snapshot served without a restart, its
age, ``max_age_s``, the lookup cache and the response cache."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pandas as pd

from serve_app.http import ApiKey
from serve_app.router import make_router
from stageline.caching import TTLCache
from stageline.features import MemoryOnlineStore, OfflineStore, open_online_store
from stageline.features.cache import CachedOnlineStore
from stageline.outputs import OutputContract
from stageline.pipeline import StageChain
from stageline.registry import LocalRegistry
from stageline.service import ChainRunner, ScoringService, UserConfig
from stageline.spec import LookupCacheSpec, PipelineSpec
from stageline.stages.features import FeatureLookup
from tests.conftest import GOOD_RECORD

VIEW = "stats"
SPEC = PipelineSpec.model_validate(
    {
        "name": "toy",
        "request": {"id_field": "id", "fields": {"id": {"type": "str"}}},
        "features": {
            "views": {
                VIEW: {
                    "entity": "user",
                    "features": {
                        "spend": {"type": "float", "default": -1.0},
                        "tier": {"type": "str", "default": "none"},
                    },
                }
            }
        },
        "stages": [{"name": "decide", "uses": "stageline.stages.postprocess:Decision"}],
    }
)
USERS = [f"u{i}" for i in range(50)]


def latest(spend: float, users: list[str] = USERS) -> pd.DataFrame:
    """Every user's values in one snapshot: all spend ``spend``."""
    return pd.DataFrame(
        {
            "user": users,
            "event_time": pd.Timestamp("2026-01-01", tz="UTC"),
            "spend": spend,
            "tier": f"tier-{spend:g}",
        }
    )


def store(home: Path, refresh_s: float = 0) -> MemoryOnlineStore:
    return MemoryOnlineStore(OfflineStore(home, SPEC.features.views), home / "online", refresh_s)


def keys(*users: str) -> pd.Series:
    return pd.Series(list(users), dtype=object)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ a new snapshot


def test_a_new_snapshot_is_served_after_a_check_without_a_new_store(tmp_path: Path) -> None:
    serving, materialize = store(tmp_path), store(tmp_path)
    materialize.write(VIEW, latest(1.0))
    assert serving.lookup(VIEW, keys("u1"))["spend"].tolist() == [1.0]
    before = serving.current(VIEW)

    materialize.write(VIEW, latest(2.0))
    assert serving.lookup(VIEW, keys("u1"))["spend"].tolist() == [1.0]  # until it checks
    serving.check()

    assert serving.lookup(VIEW, keys("u1"))["spend"].tolist() == [2.0]
    assert serving.current(VIEW) != before


def test_the_refresh_thread_picks_a_new_snapshot_up_within_its_interval(tmp_path: Path) -> None:
    materialize = store(tmp_path)
    materialize.write(VIEW, latest(1.0))
    serving = store(tmp_path, refresh_s=0.05)
    try:
        assert serving.lookup(VIEW, keys("u1"))["spend"].tolist() == [1.0]
        materialize.write(VIEW, latest(2.0))
        deadline = time.monotonic() + 30  # generous: a busy machine, not a timing claim
        while serving.lookup(VIEW, keys("u1"))["spend"].tolist() != [2.0]:
            assert time.monotonic() < deadline, "the new snapshot was never picked up"
            time.sleep(0.05)
    finally:
        serving.close()


def test_a_store_dropped_without_close_ends_its_refresh_thread(tmp_path: Path) -> None:
    store(tmp_path).write(VIEW, latest(1.0))
    serving = store(tmp_path, refresh_s=0.01)
    serving.lookup(VIEW, keys("u1"))
    watcher = serving._watcher
    assert watcher is not None
    del serving
    watcher._thread.join(timeout=30)
    assert not watcher._thread.is_alive()


def test_a_view_served_from_the_offline_table_switches_to_its_first_snapshot(
    tmp_path: Path,
) -> None:
    OfflineStore(tmp_path, SPEC.features.views).write(VIEW, latest(1.0))
    serving = store(tmp_path)
    first = serving.read(VIEW, keys("u1"))
    assert (first.snapshot, first.materialized_at) == (None, None)  # no age: never stale

    store(tmp_path).write(VIEW, latest(3.0))
    serving.check()
    assert serving.lookup(VIEW, keys("u1"))["spend"].tolist() == [3.0]


def test_no_batch_mixes_two_snapshots_while_they_are_swapped(tmp_path: Path) -> None:
    """Snapshots A (spend 1) and B (spend 2) written one after the other while a refresh
    thread swaps them in and lookups run: every batch has one spend throughout."""
    materialize = store(tmp_path)
    materialize.write(VIEW, latest(1.0))
    serving = store(tmp_path, refresh_s=0.001)
    seen: set[float] = set()
    mixed: list[list[float]] = []
    done = threading.Event()

    def look() -> None:
        while not done.is_set():
            spends = serving.lookup(VIEW, keys(*USERS))["spend"].tolist()
            seen.update(spends)
            if len(set(spends)) != 1:
                mixed.append(spends)
            time.sleep(0.0005)  # let the writer and the refresh thread have the GIL too

    reader = threading.Thread(target=look)
    reader.start()
    try:
        for i in range(16):
            materialize.write(VIEW, latest(1.0 + i % 2))
            time.sleep(0.005)
    finally:
        done.set()
        reader.join()
        serving.close()
    assert not mixed, mixed[:1]
    assert seen == {1.0, 2.0}  # both were served: swaps did happen under the reads


# ------------------------------------------------------------------ age and max_age


def changed(spec: PipelineSpec, data: dict[str, Any]) -> PipelineSpec:
    """``data`` (``spec`` dumped, then edited) as a spec in ``spec``'s folder."""
    out = PipelineSpec.model_validate(data)
    out._base_dir = spec.base_dir
    return out


def fraud_lookup(
    spec: PipelineSpec, home: Path, age_s: float, **view: Any
) -> tuple[PipelineSpec, FeatureLookup]:
    """The fraud spec with ``view`` options on its customer view, its snapshot
    materialized ``age_s`` ago, and its feature stage."""
    data = spec.model_dump(mode="json")
    data["features"]["views"]["customer_stats"].update(view)
    spec = changed(spec, data)
    online = open_online_store(spec, home)
    assert isinstance(online, MemoryOnlineStore)
    offline = OfflineStore(home, spec.features.views, spec.base_dir)
    online.write("customer_stats", offline.latest("customer_stats"), time.time() - age_s)
    chain = StageChain(spec, ["features"], home)
    stage = dict(chain.stages)["features"]
    assert isinstance(stage, FeatureLookup)
    return spec, stage


def test_the_age_of_the_snapshot_read_is_reported(
    fraud_spec: PipelineSpec, demo_copy: Path
) -> None:
    _, stage = fraud_lookup(fraud_spec, demo_copy, age_s=3600)
    stage(pd.DataFrame({"customer_id": ["c000001"]}))
    (age,) = [r for r in stage.readings() if r.name == "feature_age_s"]
    assert age.tags == {"view": "customer_stats"}
    assert 3600 <= age.value < 3600 + 120


def test_a_stale_snapshot_rejects_each_row_with_its_reason(
    fraud_spec: PipelineSpec, demo_copy: Path
) -> None:
    _, stage = fraud_lookup(fraud_spec, demo_copy, age_s=3600, max_age_s=600, on_stale="reject")
    out = stage(pd.DataFrame({"customer_id": ["c000001", "c000002"]}))
    for error in out["_error"]:
        assert error.startswith("features: feature view 'customer_stats' is stale"), error
        assert "max_age_s of 600" in error
        assert "stageline materialize" in error


def test_a_snapshot_within_max_age_is_served(fraud_spec: PipelineSpec, demo_copy: Path) -> None:
    _, stage = fraud_lookup(fraud_spec, demo_copy, age_s=10, max_age_s=600)
    out = stage(pd.DataFrame({"customer_id": ["c000001"]}))
    assert out.get("_error") is None or out["_error"].isna().all()
    assert out["customer_stats_found"].tolist() == [True]


def predict(spec: PipelineSpec, home: Path, records: list[dict[str, Any]]) -> httpx.Response:
    """``POST /predict`` to the whole of ``spec`` run in this process."""
    chains = [
        StageChain(spec, [], home, validate=True),
        StageChain(spec, [s.name for s in spec.stages], home),
    ]
    service = ScoringService(spec, ChainRunner(chains, OutputContract(spec)))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=make_router(service, ApiKey("NO_KEY_HERE")))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            return await http.post("/predict", json={"records": records})

    return asyncio.run(go())


def test_a_stale_snapshot_is_a_503_by_default(fraud_spec: PipelineSpec, demo_copy: Path) -> None:
    spec, _ = fraud_lookup(fraud_spec, demo_copy, age_s=3600, max_age_s=600)
    resp = predict(spec, demo_copy, [GOOD_RECORD])
    assert resp.status_code == 503, resp.text
    assert resp.headers["retry-after"] == "1"
    error = resp.json()["error"]
    assert error["code"] == "unavailable"
    assert "feature store is unavailable" in error["message"]
    assert "'customer_stats' is stale" in error["message"]


def test_a_stale_snapshot_rejects_each_record_with_the_reason_when_the_view_says_reject(
    fraud_spec: PipelineSpec, demo_copy: Path
) -> None:
    spec, _ = fraud_lookup(fraud_spec, demo_copy, age_s=3600, max_age_s=600, on_stale="reject")
    resp = predict(spec, demo_copy, [GOOD_RECORD])
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "rejected"
    (detail,) = error["details"]
    assert detail["stage"] == "features"
    assert "'customer_stats' is stale" in detail["message"]


# ------------------------------------------------------------------ TTLCache


def test_the_cache_keeps_at_most_max_entries_dropping_the_least_recently_used() -> None:
    cache: TTLCache[str, int] = TTLCache(max_entries=2, ttl_s=60, clock=Clock())
    cache.put_many([("a", 1), ("b", 2)])
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3)
    assert len(cache) == 2
    assert cache.get_many(["a", "b", "c"]) == [1, None, 3]
    assert (cache.counts.hits, cache.counts.misses) == (3, 1)


def test_an_entry_expires_after_ttl_s() -> None:
    clock = Clock()
    cache: TTLCache[str, int] = TTLCache(max_entries=10, ttl_s=5, clock=clock)
    cache.put("a", 1)
    clock.now = 4.9
    assert cache.get("a") == 1
    clock.now = 5.0
    assert cache.get("a") is None
    assert len(cache) == 0


# ------------------------------------------------------------------ lookup cache


def cached(
    home: Path, clock: Clock, ttl_s: float = 5
) -> tuple[CachedOnlineStore, MemoryOnlineStore]:
    inner = store(home)
    return CachedOnlineStore(inner, LookupCacheSpec(max_entries=100, ttl_s=ttl_s), clock), inner


def test_the_lookup_cache_answers_as_the_store_does_and_counts(tmp_path: Path) -> None:
    store(tmp_path).write(VIEW, latest(1.0, USERS[:3]))
    cache, inner = cached(tmp_path, Clock())
    batch = pd.Series(["u1", "nobody", "u2", "u1"], index=[9, 8, 7, 6], dtype=object)

    first, second = cache.lookup(VIEW, batch), cache.lookup(VIEW, batch)

    expected = inner.lookup(VIEW, batch)
    pd.testing.assert_frame_equal(first, expected)
    pd.testing.assert_frame_equal(second, expected)  # from the cache alone
    # first: 4 keys missed (fetched once each); second: 4 hits
    assert (cache.counts.hits, cache.counts.misses) == (4, 4)


def test_the_lookup_cache_reads_again_after_ttl_s(tmp_path: Path) -> None:
    clock = Clock()
    store(tmp_path).write(VIEW, latest(1.0))
    cache, _ = cached(tmp_path, clock, ttl_s=5)
    cache.lookup(VIEW, keys("u1"))
    clock.now = 6
    cache.lookup(VIEW, keys("u1"))
    assert (cache.counts.hits, cache.counts.misses) == (0, 2)


def test_a_new_snapshot_replaces_cached_values_before_ttl_s(tmp_path: Path) -> None:
    store(tmp_path).write(VIEW, latest(1.0))
    cache, inner = cached(tmp_path, Clock(), ttl_s=3600)
    assert cache.lookup(VIEW, keys("u1", "u2"))["spend"].tolist() == [1.0, 1.0]

    store(tmp_path).write(VIEW, latest(2.0))
    inner.check()  # what the refresh thread does

    assert cache.lookup(VIEW, keys("u1", "u2"))["spend"].tolist() == [2.0, 2.0]
    assert cache.counts.hits == 0


def test_the_memory_store_is_served_without_a_lookup_cache(
    fraud_spec: PipelineSpec, demo_home: Path
) -> None:
    """Already in the replica: a cache in front only costs time (bench.cache)."""
    data = fraud_spec.model_dump(mode="json")
    data["features"]["cache"] = {}
    spec = changed(fraud_spec, data)
    assert isinstance(open_online_store(spec, demo_home), MemoryOnlineStore)


# ------------------------------------------------------------------ response cache


def cached_service(spec: PipelineSpec, home: Path, clock: Clock) -> ScoringService:
    data = spec.model_dump(mode="json")
    data["serve"]["response_cache"] = {"max_entries": 100, "ttl_s": 60}
    spec = changed(spec, data)
    chains = [
        StageChain(spec, [], home, validate=True),
        StageChain(spec, [s.name for s in spec.stages], home),
    ]
    return ScoringService(spec, ChainRunner(chains, OutputContract(spec)), clock=clock)


async def score(service: ScoringService, *records: dict[str, Any]) -> list[dict[str, Any]]:
    return await service.score(list(records))


def test_a_record_seen_before_is_answered_from_the_response_cache(
    fraud_spec: PipelineSpec, demo_copy: Path
) -> None:
    clock = Clock()
    service = cached_service(fraud_spec, demo_copy, clock)
    other = {**GOOD_RECORD, "transaction_id": "t-2", "amount": 900.0}

    async def go() -> None:
        first = await score(service, GOOD_RECORD)
        again = await score(service, other, GOOD_RECORD)
        assert again[1] == first[0]
        assert again[0]["transaction_id"] == "t-2"
        assert service.cache is not None
        assert (service.cache.counts.hits, service.cache.counts.misses) == (1, 2)
        clock.now = 61  # past ttl_s
        await score(service, GOOD_RECORD)
        assert service.cache.counts.misses == 3

    asyncio.run(go())


def test_a_model_swap_drops_every_cached_answer(fraud_spec: PipelineSpec, demo_copy: Path) -> None:
    registry = LocalRegistry(demo_copy / "models")
    v1 = registry.load("fraud", "champion")
    meta = v1.metadata
    registry.register(
        "fraud",
        v1.booster,
        features=meta.features,
        encoders=meta.encoders,
        threshold=meta.threshold,
        aliases=["challenger"],
    )
    service = cached_service(fraud_spec, demo_copy, Clock())

    async def go() -> None:
        assert (await score(service, GOOD_RECORD))[0]["model_version"] == 1
        service.reconfigure(UserConfig(stages={"model": {"alias": "challenger"}}))
        assert (await score(service, GOOD_RECORD))[0]["model_version"] == 2
        assert service.cache is not None
        assert service.cache.counts.hits == 0

    asyncio.run(go())


def test_a_new_feature_snapshot_drops_every_cached_answer(
    fraud_spec: PipelineSpec, demo_copy: Path
) -> None:
    service = cached_service(fraud_spec, demo_copy, Clock())
    lookups = [
        stage
        for chain in service.runner.step.chains  # type: ignore[attr-defined]
        for _, stage in chain
        if isinstance(stage, FeatureLookup)
    ]

    async def go() -> None:
        await score(service, GOOD_RECORD)
        online = open_online_store(fraud_spec, demo_copy)
        offline = OfflineStore(demo_copy, fraud_spec.features.views, fraud_spec.base_dir)
        online.write("customer_stats", offline.latest("customer_stats"))
        for stage in lookups:
            stage.store.check()  # type: ignore[union-attr]  # what its refresh thread does
        await score(service, GOOD_RECORD)
        assert service.cache is not None
        assert service.cache.counts.hits == 0
        await score(service, GOOD_RECORD)
        assert service.cache.counts.hits == 1

    asyncio.run(go())
