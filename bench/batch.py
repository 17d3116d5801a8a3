"""Batch: ``stageline batch`` (Ray Data) against a single-process pandas loop.

    python -m bench.batch [--sizes 1000000 4000000 16000000] [--home H] [--results DIR] [--smoke]

The demo pipeline over parquet inputs of each size (generated once under
``bench/.data/``, 250,000 rows a file, ~1% bad rows, reused by later runs; under
``<results>/tmp`` when the results go elsewhere). The
baseline does the same stages file by file in one process: read, validate, look
up, transform, predict with every core, write. Each runs as its own process, twice:
once timed, with nothing else running, and once for its peak memory, the PSS of its
whole process tree (Ray's processes included). Sampling PSS costs the kernel ~65 ms of
CPU per sample of stageline's ~20 processes, a fifth of a core at 4 samples a second:
in the timed run it would slow the many-process side alone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from bench.processes import OWN_SESSION, local_env, stop_group
from bench.procmem import PeakMemory, gib
from bench.report import add_run_options, markdown, scratch, write
from stageline.context import resolve_home
from stageline.demo.batch import ROW_GROUP, ROWS_PER_FILE, transactions
from stageline.demo.world import ensure_demo
from stageline.spec import PipelineSpec, load_spec
from stageline_cli.common import DEFAULT_SPEC

SIZES = (1_000_000, 4_000_000, 16_000_000)
SMOKE_SIZES = (20_000,)


def inputs(rows: int, home: Path, data: Path) -> Path:
    """``rows`` demo transactions as parquet files under ``data``, made once."""
    folder = data / f"rows={rows}"
    done = folder / "_complete"
    if done.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    world = pd.read_json(home / "demo" / "world.json", typ="series")
    for i, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        part = transactions(
            n, customers=int(world["customers"]), days=int(world["days"]), seed=100 + i
        )
        part["transaction_id"] = [f"b{start + j:010d}" for j in range(n)]
        part.to_parquet(folder / f"part-{i:05d}.parquet", row_group_size=ROW_GROUP)
    done.touch()
    return folder


def pandas_loop(spec: PipelineSpec, source: Path, output: Path, home: Path) -> int:
    """The baseline: every file through the in-process pipeline, one after another."""
    from stageline.pipeline import Pipeline

    model = next(s for s in spec.stages if s.uses.endswith(":XGBoostPredictor"))
    stages = [
        s.model_copy(update={"params": {**s.params, "nthread": os.cpu_count() or 1}})
        if s is model
        else s
        for s in spec.stages
    ]
    tuned = spec.model_copy(update={"stages": tuple(stages)})
    pipeline = Pipeline(tuned, home)
    output.mkdir(parents=True, exist_ok=True)
    rows = 0
    for path in sorted(source.glob("*.parquet")):
        frame = pd.read_parquet(path)
        pipeline.predict(frame).to_parquet(output / path.name)
        rows += len(frame)
    return rows


def measure(argv: list[str], sample_memory: bool) -> tuple[float, int]:
    """Seconds a command takes and, if ``sample_memory``, the peak PSS (bytes) of its
    whole process tree (else 0)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=local_env(), **OWN_SESSION
    )
    try:
        if sample_memory:
            with PeakMemory(proc.pid) as peak:
                _out, err = proc.communicate()
        else:
            _out, err = proc.communicate()
    finally:
        stop_group(proc)  # interrupted: its Ray goes too
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{err.decode()[-3000:]}")
    return time.perf_counter() - started, peak.pss if sample_memory else 0


def plot(rows: list[dict[str, Any]], results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("stageline batch", "pandas loop"):
        mine = [r for r in rows if r["kind"] == kind]
        sizes = [r["rows"] / 1e6 for r in mine]
        speed.plot(sizes, [r["rows_per_s"] / 1e3 for r in mine], marker="o", label=kind)
        memory.plot(sizes, [gib(r["peak_pss"]) for r in mine], marker="o", label=kind)
    speed.set(xlabel="input rows (millions)", ylabel="thousand rows/s", title="throughput")
    memory.set(xlabel="input rows (millions)", ylabel="GiB (PSS)", title="peak memory")
    for ax in (speed, memory):
        ax.set_xscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(results / "batch.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--home", help="stageline home with the demo (built if missing)")
    parser.add_argument(
        "--baseline-run", nargs=2, metavar=("INPUT", "OUTPUT"), help=argparse.SUPPRESS
    )
    add_run_options(parser)
    args = parser.parse_args(argv)
    sizes = list(SMOKE_SIZES) if args.smoke else args.sizes
    spec, home = load_spec(Path(DEFAULT_SPEC)), resolve_home(args.home)
    if args.baseline_run:
        pandas_loop(spec, Path(args.baseline_run[0]), Path(args.baseline_run[1]), home)
        return 0
    ensure_demo(spec, home)
    rows: list[dict[str, Any]] = []
    data = scratch(args.results)
    work = data / "out"
    for size in sizes:
        source = inputs(size, home, data)
        commands = {
            "stageline batch": [
                sys.executable, "-m", "stageline_cli", "batch", "--home", str(home),
                "--input", str(source), "--output", str(work / "stageline"), "--full",
            ],
            "pandas loop": [
                sys.executable, "-m", "bench.batch", "--home", str(home),
                "--baseline-run", str(source), str(work / "pandas"),
            ],
        }  # fmt: skip
        for kind, command in commands.items():
            shutil.rmtree(work, ignore_errors=True)
            seconds, _ = measure(command, sample_memory=False)
            shutil.rmtree(work, ignore_errors=True)
            _, pss = measure(command, sample_memory=True)
            rows.append(
                {"kind": kind, "rows": size, "seconds": seconds, "rows_per_s": size / seconds,
                 "peak_pss": pss}
            )  # fmt: skip
            print(f"{kind}: {size:,} rows in {seconds:.1f} s, peak {gib(pss):.2f} GiB", flush=True)
    shutil.rmtree(work, ignore_errors=True)

    table = []
    for size in sizes:
        ours, loop = (
            next(r for r in rows if r["rows"] == size and r["kind"] == k)
            for k in ("stageline batch", "pandas loop")
        )
        table.append(
            [f"{size:,}", f"{ours['rows_per_s']:,.0f}", f"{loop['rows_per_s']:,.0f}",
             f"{ours['rows_per_s'] / loop['rows_per_s']:.2f}x",
             f"{gib(ours['peak_pss']):.2f}", f"{gib(loop['peak_pss']):.2f}"]
        )  # fmt: skip
    header = [
        "rows",
        "stageline rows/s",
        "pandas loop rows/s",
        "ratio",
        "stageline GiB",
        "loop GiB",
    ]
    config = {
        "sizes": sizes,
        "rows_per_file": ROWS_PER_FILE,
        "spec": DEFAULT_SPEC,
        "smoke": args.smoke,
    }
    write("batch", config, rows, markdown(header, table), args.results)
    plot(rows, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
