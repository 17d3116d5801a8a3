"""Batch input for the demo: new transactions, as parquet files, with a few bad rows.

What a nightly job would find in its landing folder: transactions of the demo's
customers (and some the feature store has never seen) in several part files, and
about 1% rows that break the request schema in different ways, so a batch run
shows its quarantine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stageline.demo import data

BATCH_DIR = "demo/batch"
ROWS_PER_FILE = 250_000
ROW_GROUP = 65_536
BAD_KINDS = ("negative_amount", "unknown_category", "missing_customer_id", "bad_ts")


def batch_dir(home: Path) -> Path:
    return home / BATCH_DIR


def write_batch_input(
    home: Path,
    *,
    rows: int = 200_000,
    files: int | None = None,
    bad_share: float = 0.01,
    customers: int | None = None,
    days: int | None = None,
    seed: int = 11,
) -> list[Path]:
    """Write ``rows`` transactions as ``files`` parquet files under ``<home>/demo/batch``.

    Customers and days default to the demo world's (``demo/world.json``); files to one
    per :data:`ROWS_PER_FILE` rows (at least 4). Row groups of :data:`ROW_GROUP` rows, as
    a warehouse export writes them. Returns the files.
    """
    world = _world(home)
    frame = transactions(
        rows,
        customers=customers or int(str(world.get("customers", 5_000))),
        days=days or int(str(world.get("days", 60))),
        bad_share=bad_share,
        seed=seed,
    )
    folder = batch_dir(home)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.parquet"):
        old.unlink()
    paths = []
    count = files if files is not None else max(4, math.ceil(rows / ROWS_PER_FILE))
    for i, part in enumerate(np.array_split(np.arange(len(frame)), max(1, count))):
        path = folder / f"part-{i:03d}.parquet"
        pq.write_table(_table(frame.iloc[part]), path, row_group_size=ROW_GROUP)
        paths.append(path)
    return paths


def transactions(
    rows: int, *, customers: int, days: int, bad_share: float = 0.01, seed: int = 11
) -> pd.DataFrame:
    """``rows`` request records (ids ``b000000000``...), ``bad_share`` of them invalid,
    spread evenly over :data:`BAD_KINDS`; ``ts`` stays a timestamp column (microseconds)."""
    world = data.generate(customers=customers, transactions=rows, days=days, seed=seed)
    tx = world.transactions.drop(columns=["is_fraud"]).reset_index(drop=True)
    tx["transaction_id"] = [f"b{i:09d}" for i in range(len(tx))]
    tx["ts"] = tx["ts"].astype("datetime64[us, UTC]")
    rng = np.random.default_rng(seed)
    n_bad = round(len(tx) * bad_share)
    bad = rng.choice(len(tx), size=n_bad, replace=False)
    for kind, rows_of_kind in zip(BAD_KINDS, np.array_split(bad, len(BAD_KINDS)), strict=True):
        if kind == "negative_amount":
            tx.loc[rows_of_kind, "amount"] = -tx.loc[rows_of_kind, "amount"] - 1.0
        elif kind == "unknown_category":
            tx.loc[rows_of_kind, "merchant_category"] = "casino"
        elif kind == "missing_customer_id":
            tx.loc[rows_of_kind, "customer_id"] = None
        else:  # a date no nanosecond timestamp can hold: a corrupt upstream value
            tx.loc[rows_of_kind, "ts"] = pd.Timestamp("1500-01-01", tz="UTC").as_unit("us")
    return tx


def _table(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(frame, preserve_index=False)


def _world(home: Path) -> dict[str, object]:
    try:
        loaded: dict[str, object] = json.loads((home / "demo" / "world.json").read_text())
    except (OSError, ValueError):
        return {}
    return loaded
