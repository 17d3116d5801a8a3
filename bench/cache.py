"""The caches under skewed traffic: the feature-lookup cache in front of Redis and of
the in-memory store, and the response cache, each against no cache, in one run.

    python -m bench.cache [--home H] [--seconds S] [--zipf A] [--results DIR] [--smoke]

Entities (the demo's customers) are drawn from a Zipf distribution of exponent
``--zipf`` (rank ``k`` has weight ``1 / k^A``): a few customers send most requests, as
real traffic does. Records are the demo's held-out transactions whose customer is the
one drawn, so a record repeats about as often as its customer does.

- Lookup: the feature stage's store, one call per request of one key (``batch 1``) or
  per merged batch of 64 keys, for ``--seconds`` each: calls per second, and the
  cache's hit rate. Redis is a local ``redis-server`` on loopback (an upper bound on
  what a cache saves: a remote Redis costs more per round trip).
- Response: the whole pipeline in this process (``ScoringService`` over a
  ``ChainRunner``, as the ``local`` placement runs it), one request of one record at a
  time: requests per second and the hit rate.

No Ray: one process, so the figures are the code's, not the scheduler's.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.processes import free_port
from bench.report import add_run_options, markdown, scratch, write
from stageline.context import resolve_home
from stageline.demo.world import ensure_demo
from stageline.features import MemoryOnlineStore, materialize, open_online_store
from stageline.features.cache import CachedOnlineStore
from stageline.outputs import OutputContract
from stageline.pipeline import StageChain
from stageline.service import ChainRunner, ScoringService
from stageline.spec import LookupCacheSpec, PipelineSpec, load_spec
from stageline_cli.common import DEFAULT_SPEC

VIEW = "customer_stats"
CACHE = LookupCacheSpec(max_entries=100_000, ttl_s=5.0)


def zipf_draws(population: int, exponent: float, n: int, seed: int = 7) -> np.ndarray[Any, Any]:
    """``n`` ranks in ``[0, population)``, rank ``k`` with weight ``1 / (k + 1)^exponent``."""
    weights = 1.0 / np.arange(1, population + 1) ** exponent
    rng = np.random.default_rng(seed)
    return rng.choice(population, size=n, p=weights / weights.sum())


def rate(call: Callable[[int], Any], seconds: float) -> tuple[float, int]:
    """Calls per second of ``call(i)`` (i = 0, 1, ...) over ``seconds``, after a warm-up."""
    for i in range(50):
        call(i)
    done, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        call(done)
        done += 1
    return done / elapsed, done


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    if shutil.which("redis-server") is None:
        raise SystemExit("bench.cache needs redis-server (apt-get install redis-server)")
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("redis-server did not start")


def lookup_rows(
    spec: PipelineSpec, home: Path, redis_url: str, keys: list[str], seconds: float
) -> list[dict[str, Any]]:
    rspec = spec.with_online(redis_url, timeout_ms=2000)
    materialize(rspec, home)
    memory = open_online_store(spec, home)
    redis = open_online_store(rspec, home)
    stores: dict[str, tuple[Any, CachedOnlineStore | None]] = {
        "memory": (memory, None),
        "memory + cache": (c := CachedOnlineStore(memory, CACHE), c),
        "redis": (redis, None),
        "redis + cache": (c := CachedOnlineStore(redis, CACHE), c),
    }
    assert isinstance(memory, MemoryOnlineStore)
    rows = []
    for batch in (1, 64):
        batches = [
            pd.Series(keys[i : i + batch], dtype=object) for i in range(0, len(keys) - batch, batch)
        ]
        for name, (store, cache) in stores.items():
            before = (cache.counts.hits, cache.counts.misses) if cache else (0, 0)

            def call(i: int, s: Any = store, b: list[pd.Series] = batches) -> Any:
                return s.lookup(VIEW, b[i % len(b)])

            per_s, calls = rate(call, seconds)
            hits = misses = 0
            if cache is not None:
                hits, misses = cache.counts.hits - before[0], cache.counts.misses - before[1]
            rows.append({
                "kind": "lookup", "store": name, "batch": batch, "calls_per_s": per_s,
                "keys_per_s": per_s * batch, "calls": calls,
                "hit_rate": hits / (hits + misses) if hits + misses else None,
            })  # fmt: skip
    redis.close()
    return rows


def response_rows(
    spec: PipelineSpec, home: Path, records: list[dict[str, Any]], seconds: float
) -> list[dict[str, Any]]:
    rows = []
    for cached in (False, True):
        data = spec.model_dump(mode="json")
        data["serve"]["response_cache"] = {"max_entries": 10_000, "ttl_s": 60} if cached else None
        data["serve"]["ingress"]["batch"] = None  # one request at a time: no merging
        served = PipelineSpec.model_validate(data)
        served._base_dir = spec.base_dir
        chains = [
            StageChain(served, [], home, validate=True),
            StageChain(served, [s.name for s in served.stages], home),
        ]
        service = ScoringService(served, ChainRunner(chains, OutputContract(served)))

        async def run(service: ScoringService = service) -> tuple[float, int]:
            for i in range(50):
                await service.score([records[i]])
            done, started = 0, time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                await service.score([records[done % len(records)]])
                done += 1
            return done / elapsed, done

        per_s, calls = asyncio.run(run())
        counts = service.cache.counts if service.cache is not None else None
        rows.append({
            "kind": "response", "store": "response cache" if cached else "no cache",
            "batch": 1, "calls_per_s": per_s, "keys_per_s": per_s, "calls": calls,
            "hit_rate": counts.hits / (counts.hits + counts.misses) if counts else None,
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="stageline home with the demo (built if missing)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    add_run_options(parser)
    args = parser.parse_args(argv)
    seconds = 1.0 if args.smoke else args.seconds
    spec, home = load_spec(Path(DEFAULT_SPEC)), resolve_home(args.home)
    ensure_demo(spec, home)

    holdout = pd.read_parquet(home / "demo" / "holdout.parquet")
    by_customer = {str(c): g for c, g in holdout.groupby("customer_id")}
    customers = sorted(by_customer)
    np.random.default_rng(3).shuffle(customers)  # rank 0 is any customer, not the first id
    draws = zipf_draws(len(customers), args.zipf, 200_000)
    keys = [customers[k] for k in draws]
    # One record per draw: that customer's first held-out transaction, so a customer
    # drawn again sends the same record (a retry, a repeated check).
    fields = list(spec.request.fields)
    first = {c: {f: g.iloc[0][f] for f in fields} for c, g in by_customer.items()}
    records = [_json_ready(first[k]) for k in keys[:50_000]]

    work = scratch(args.results) / "cache"
    work.mkdir(parents=True, exist_ok=True)
    process, url = start_redis(work)
    try:
        rows = lookup_rows(spec, home, url, keys, seconds)
    finally:
        process.terminate()
        process.wait(timeout=20)
    rows += response_rows(spec, home, records, seconds)

    plain = ("memory", "redis", "no cache")
    base = {(r["kind"], r["batch"]): r for r in rows if r["store"] in plain}
    table = []
    for r in rows:
        kind = "redis" if r["store"].startswith("redis") else "memory"
        ref = base.get((r["kind"], r["batch"])) if r["kind"] == "response" else next(
            b for b in rows
            if b["kind"] == "lookup" and b["batch"] == r["batch"] and b["store"] == kind
        )  # fmt: skip
        assert ref is not None
        table.append([
            r["kind"], r["store"], r["batch"], f"{r['calls_per_s']:,.0f}",
            f"{r['keys_per_s']:,.0f}", "-" if r["hit_rate"] is None else f"{r['hit_rate']:.0%}",
            f"{r['calls_per_s'] / ref['calls_per_s']:.2f}x",
        ])  # fmt: skip
    header = ["cache", "store", "batch", "calls/s", "keys/s", "hit rate", "vs no cache"]
    config = {
        "seconds": seconds,
        "zipf": args.zipf,
        "customers": len(customers),
        "lookup_cache": CACHE.model_dump(),
        "response_cache": {"max_entries": 10_000, "ttl_s": 60},
        "smoke": args.smoke,
    }
    write("cache", config, rows, markdown(header, table), args.results)
    return 0


def _json_ready(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, pd.Timestamp):
            v = v.isoformat()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


if __name__ == "__main__":
    raise SystemExit(main())
