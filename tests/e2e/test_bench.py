"""Every benchmark runs: each one's smoke mode as a user runs it, a subprocess that
starts its own Ray (never this test session's), writing its results to tmp_path."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.processes import NOT_INHERITED, local_env
from stageline.demo.train import DemoResult
from stageline.spec import load_spec
from tests.conftest import ROOT
from tests.support.processes import spawned

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bench_home(demo: DemoResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's demo home: the servers write to their home."""
    home = tmp_path_factory.mktemp("bench") / "home"
    shutil.copytree(demo.home, home)
    return home


def smoke(name: str, results: Path, home: Path, timeout: float) -> dict[str, Any]:
    """``python -m bench.<name> --smoke``; its JSON, after checking the files it writes."""
    argv = [sys.executable, "-m", f"bench.{name}", "--smoke", "--results", str(results)]
    if name != "hop":
        argv += ["--home", str(home)]
    out, err = results / f"{name}.out", results / f"{name}.err"
    # A benchmark starts servers of its own: on a timeout they are stopped with it.
    with spawned(argv, out, local_env(), cwd=ROOT, stderr_log=err) as bench:
        code = bench.wait(timeout=timeout)
    stdout, stderr = out.read_text(), err.read_text()
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    markdown = (results / f"{name}.md").read_text()
    assert markdown.startswith(f"# {name}")
    assert "\n|---|" in markdown
    assert markdown in stdout, "the table is printed too"
    text = (results / f"{name}.json").read_text()
    # Results are committed: no path of the machine that ran them.
    for local in (str(ROOT), sys.executable):
        assert local not in text, local
        assert local not in markdown, local
    record: dict[str, Any] = json.loads(text)
    assert record["config"]["smoke"] is True
    assert record["machine"]["versions"]["ray"]
    return record


def test_the_benchmarks_never_inherit_a_ray_address_or_an_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv("STAGELINE_API_KEY", "k")
    env = local_env()
    assert not set(NOT_INHERITED) & set(env)
    assert env["PATH"] == os.environ["PATH"]


def test_model_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("model", tmp_path, bench_home, timeout=120)
    rows = record["rows"]
    assert [r["batch"] for r in rows] == [1, 8, 64]
    assert all(r["identical"] for r in rows), rows


def test_cache_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("cache", tmp_path, bench_home, timeout=300)
    rows = {(r["kind"], r["store"], r["batch"]): r for r in record["rows"]}
    stores = {"memory", "memory + cache", "redis", "redis + cache"}
    assert {s for k, s, _ in rows if k == "lookup"} == stores
    assert {s for k, s, _ in rows if k == "response"} == {"no cache", "response cache"}
    assert all(r["calls_per_s"] > 0 for r in rows.values())
    # Under Zipf traffic the caches do hit: the figures are of a working cache.
    assert rows[("lookup", "redis + cache", 1)]["hit_rate"] > 0.2
    assert rows[("response", "response cache", 1)]["hit_rate"] > 0.2


def test_hop_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("hop", tmp_path, bench_home, timeout=180)
    rows = {r["kind"]: r for r in record["rows"]}
    assert set(rows) == {"DeploymentHandle", "DeploymentHandle, gRPC", "Ray actor"}
    assert all(r["sequential_s"] > 0 and r["calls_per_s"] > 0 for r in rows.values())


def test_capacity_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("capacity", tmp_path, bench_home, timeout=300)
    stages = ["validate", "features", "transform", "model", "postprocess"]
    assert [r["stage"] for r in record["rows"]] == stages * 2, "each stage at 1 and 10 rows"
    assert all(r["cpu_ms"] > 0 and r["calls"] >= 5 for r in record["rows"]), record["rows"]
    fits, plan = record["summary"]["fits"], record["summary"]["plan"]
    assert list(fits) == stages
    # The whole path in process and the online one, each against the model's floor.
    floors = record["summary"]["floor"]
    assert [f["rows"] for f in floors] == [1, 10]
    assert all(f["predict_cpu_ms"] > f["floor_cpu_ms"] > 0 for f in floors), floors
    assert all(f["online_cpu_ms"] > f["floor_cpu_ms"] for f in floors), floors
    assert all(f["fixed_ms"] >= 0 and f["per_row_ms"] >= 0 for f in fits.values()), fits
    # 2000 requests/s need more than one replica of some stage, and at least one node.
    assert list(plan["stages"]) == stages
    assert max(s["replicas"] for s in plan["stages"].values()) > 1, plan
    assert plan["nodes"] >= 1
    assert plan["cpu_cores"] == pytest.approx(sum(s["cpu_cores"] for s in plan["stages"].values()))


def test_batch_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("batch", tmp_path, bench_home, timeout=300)
    rows = record["rows"]
    assert {(r["kind"], r["rows"]) for r in rows} == {
        ("stageline batch", 20_000),
        ("pandas loop", 20_000),
    }
    assert all(r["rows_per_s"] > 0 and r["peak_pss"] > 0 for r in rows), rows
    assert (tmp_path / "batch.png").stat().st_size > 0
    assert not (tmp_path / "tmp" / "out").exists(), "the outputs are cleaned up"


needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None and os.environ.get("CI") != "true",
    reason="wrk is not installed (apt-get install wrk; scripts/test does)",
)


@needs_wrk
def test_online_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("online", tmp_path, bench_home, timeout=600)
    rows = record["rows"]
    assert {(r["target"], r["concurrency"]) for r in rows} == {
        *((t, c) for t in ("A", "N", "G", "B", "C", "E") for c in (1, 8)),
        ("D", 1),
    }
    for row in rows:
        if row["target"] != "D" and row["concurrency"] == 1:
            assert row["requests"] > 0, row
            assert sum(row["errors"].values()) == 0, row
    turns = [(r["round"], r["target"], r["concurrency"]) for r in rows if "round" in r]
    # The smoke's one round of each, in turn: A, G and C at one client; A and N at the
    # most clients, what the prediction log costs.
    assert turns == [(1, "A", 1), (1, "G", 1), (1, "C", 1), (1, "A", 8), (1, "N", 8)]
    summary = record["summary"]
    assert set(summary["max_rps"]) == {"A", "N", "G", "B", "C", "D", "E"}
    assert set(summary["idle_p50_ms"]) == {"A", "G", "C"}
    assert set(summary["peak_rps"]) == {"A", "N"}
    assert {
        "A/C p50 at concurrency 1 (the pass above)",
        "A/C p50 at concurrency 1 (median of 1 round)",
        "G/A p50 at concurrency 1 (median of 1 round)",
        "A/N req/s at concurrency 8 (median of 1 round)",
        "A/N max RPS",
    } <= set(summary["ratios"])
    assert (tmp_path / "online.png").stat().st_size > 0


@needs_wrk
def test_soak_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("soak", tmp_path, bench_home, timeout=300)
    rows = record["rows"]
    assert len(rows) == 6, "a minute, sampled every 10 s"
    for row in rows:
        assert all(row[k] > 0 for k in ("rss", "pss", "fds", "requests", "p50_ms")), row
        assert row["processes"] > 1, row
        assert row["p99_ms"] >= row["p50_ms"], row
        assert sum(row["errors"].values()) == 0, row
    summary = record["summary"]
    assert summary["peak_rps"] > 0
    assert 0 < summary["rate"] <= summary["peak_rps"]
    assert sum(summary["warmup"]["errors"].values()) == 0
    goals = {v["goal"]: v for v in summary["verdicts"]}
    assert set(goals) == {
        "memory flat (RSS)",
        "memory flat (PSS)",
        "open file descriptors flat",
        "p99 steady",
        "0 errors",
    }
    assert goals["0 errors"]["ok"], goals["0 errors"]
    assert (tmp_path / "soak.png").stat().st_size > 0


@needs_wrk
def test_scale_smoke(tmp_path: Path, bench_home: Path) -> None:
    record = smoke("scale", tmp_path, bench_home, timeout=600)
    assert record["rows"], "the load's windows"
    summary = record["summary"]
    steps = summary["steps"]
    assert [(s["clients"], s["seconds"]) for s in steps] == [(1, 4), (8, 6), (1, 6)]
    assert all(s["requests"] > 0 and s["errors"] == 0 for s in steps), steps
    # The graph placement: every stage a deployment of its own, in the spec's ranges.
    assert set(summary["bounds"]) == {"ingress", "features", "transform", "model", "postprocess"}
    assert summary["bounds"]["model"] == {"min": 1, "max": 3}
    sampled = [s for s in summary["samples"] if "deployments" in s]
    assert len(sampled) >= 10, "replicas sampled every second through the load"
    assert all(s["deployments"]["model"]["running"] >= 1 for s in sampled)
    probed = [r for r in summary["busy_rounds"] if r["busy"]]
    assert probed, "the stage deployments' busy shares were read"
    assert {"features", "transform", "model", "postprocess"} == set(probed[-1]["busy"])
    assert all(0 <= b["mean"] <= 1 for r in probed for b in r["busy"].values())
    assert [e["direction"] for e in summary["events"]] == ["up", "down"]
    assert summary["cluster"]["left_running"] == [], "the cluster is stopped"
    assert (tmp_path / "scale.png").stat().st_size > 0


def test_hops_smoke(tmp_path: Path, bench_home: Path) -> None:
    """The graph's time split by what each part measured: every stage deployment and the
    ingress counted the requests, and no part's time is negative or missing."""
    record = smoke("hops", tmp_path, bench_home, timeout=400)
    rows = {r["part"]: r for r in record["rows"]}
    # The shipped graph's deployments (its serve.graph.fuse groups), then the ingress.
    graph = load_spec(ROOT / "pipelines" / "fraud.yaml").with_placement("graph")
    assert list(rows) == [*(s.name for s in graph.segments()), "ingress"], rows
    assert len(rows) > 2, rows
    for part, r in rows.items():
        assert r["in_process_ms"] > 0, (part, r)
        assert r["replica_ms"] > 0, (part, r)
        if part != "ingress":
            # Serve's time on a call covers the stage's work in it.
            assert 0 < r["work_ms"] <= r["replica_ms"], (part, r)
    # The ingress's time covers its stage deployments' calls.
    assert rows["ingress"]["around_ms"] > 0, rows["ingress"]
    assert record["summary"]["client_p50_ms"] > 0
