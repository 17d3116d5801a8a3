"""What the Serve integration tests share: Serve's own view of an app, HTTP calls
as a client makes them (of the fraud pipeline, and of any pipeline), and variants of
the fraud spec."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests
import yaml
from ray.serve.schema import ApplicationDetails, ServeInstanceDetails

from stageline import Pipeline
from stageline.pipeline import records
from tests.conftest import FRAUD_SPEC

TIMEOUT = 30.0
Json = dict[str, Any]
Scored = tuple[float, bool, list[str], int]
"""What a caller of the fraud pipeline gets for one record: score, label, reasons, model
version."""
Answer = dict[str, Any]
"""What a caller of any pipeline gets for one record: each of its declared outputs, and
``model_name`` and ``model_version``."""


def app_details(name: str) -> ApplicationDetails:
    """Serve's detailed view of application ``name`` (deployments, options, replicas)."""
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None, "Serve is not running"
    details = ServeInstanceDetails(**client.get_serve_details())
    return details.applications[name]


def replica_ids(name: str) -> dict[str, set[str]]:
    """The running replicas of every deployment of application ``name``."""
    return {
        deployment: {r.replica_id for r in d.replicas if r.state == "RUNNING"}
        for deployment, d in app_details(name).deployments.items()
    }


def client_records(frame: pd.DataFrame) -> list[Json]:
    """Rows as a client sends them: JSON values, ISO 8601 times, null fields left out."""
    return [
        {str(k): _json_value(v) for k, v in row.items() if v is not None and not pd.isna(v)}
        for row in frame.to_dict(orient="records")
    ]


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):  # a pd.Timestamp too
        return value.isoformat()
    if isinstance(value, np.generic):
        return value.item()
    return value


def predict(url: str, records: list[Json]) -> dict[str, Scored]:
    """``POST /predict``: what the caller got for each record id (a 200 is required)."""
    resp = requests.post(f"{url}/predict", json={"records": records}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    version = int(body["model"]["version"])
    return {
        p["transaction_id"]: (p["score"], p["label"], p["reasons"], version)
        for p in body["predictions"]
    }


def answers(url: str, records: list[Json], id_field: str) -> dict[str, Answer]:
    """``POST /predict`` for any pipeline: what the caller got for each record id (a 200
    is required, and every record scored)."""
    resp = requests.post(f"{url}/predict", json={"records": records}, timeout=TIMEOUT)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    model = {"model_name": body["model"]["name"], "model_version": body["model"]["version"]}
    out = {}
    for p in body["predictions"]:
        assert "error" not in p, p
        out[str(p[id_field])] = {**{k: v for k, v in p.items() if k != id_field}, **model}
    return out


def in_process_answers(pipeline: Pipeline, frame: pd.DataFrame) -> dict[str, Answer]:
    """The reference for any pipeline: what the in-process pipeline computes for the same
    rows (every one scored), by record id."""
    id_field = pipeline.contract.id_field
    expected = records(pipeline.predict(frame))
    assert [r for r in expected if r["error"]] == []
    return {
        str(r[id_field]): {k: v for k, v in r.items() if k not in (id_field, "error")}
        for r in expected
    }


def in_process(pipeline: Pipeline, frame: pd.DataFrame) -> dict[str, Scored]:
    """The reference: what the in-process pipeline computes for the same rows."""
    expected = records(pipeline.predict(frame))
    assert [r for r in expected if r["error"]] == []
    return {
        r["transaction_id"]: (r["score"], r["label"], r["reasons"], r["model_version"])
        for r in expected
    }


def fraud_variant(
    directory: Path,
    serve: Json | None = None,
    stages: dict[str, Json] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """The fraud spec with ``serve:`` options and per-stage fields replaced, written
    to ``directory`` with ``files`` (user stage modules) beside it."""
    data = yaml.safe_load(FRAUD_SPEC.read_text())
    # One light ingress replica: the session's Ray holds many apps at once.
    light = {"ingress": {"num_cpus": 0.25, "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}
    data["serve"] = {**data.get("serve", {}), **light, **(serve or {})}
    for stage in data["stages"]:
        stage.update((stages or {}).get(stage["name"], {}))
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {}).items():
        (directory / name).write_text(text)
    path = directory / "fraud.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def delete_apps(names: list[str]) -> None:
    """Delete the applications side by side (their replicas free their CPUs)."""
    from ray import serve

    for name in names:
        serve.delete(name, _blocking=False)
    wait_for(
        lambda: not set(names) & set(serve.status().applications),
        timeout=60,
        what=f"Serve to delete {names}",
    )


def wait_for(condition: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``condition()`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"{what}: not within {timeout:g} s")
