"""What an operator scrapes: stageline's metrics on Ray's Prometheus endpoint."""

from __future__ import annotations

import re
import time

import pytest
import ray
import requests

pytestmark = pytest.mark.integration


def scrape() -> str:
    node = ray._private.worker._global_node
    assert node is not None
    return requests.get(f"http://127.0.0.1:{node.metrics_export_port}/metrics", timeout=10).text


def series(text: str, name: str, **labels: str) -> list[float]:
    """Values of ``name`` whose labels include ``labels``."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(tags.get(k) == v for k, v in labels.items()):
            out.append(float(line.rsplit(" ", 1)[1]))
    return out


def test_stage_latency_batch_sizes_and_model_version_are_exported(
    fraud_url: str, good_record: dict[str, object]
) -> None:
    sent = 12
    for i in range(sent):
        record = {**good_record, "transaction_id": f"m-{i}"}
        assert requests.post(f"{fraud_url}/predict", json={"records": [record]}, timeout=30).ok
    # Ray pushes each metric every few seconds, not all at once: wait for all of them.
    deadline = time.monotonic() + 90
    while True:
        text = scrape()
        missing = missing_series(text, sent)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not missing, missing


def missing_series(text: str, sent: int) -> list[str]:
    app = {"application": "fraud"}
    missing = []
    if sum(series(text, "ray_stageline_stage_latency_ms_count", segment="model", **app)) < sent:
        missing.append(f"{sent} model-stage latency observations")
    for segment in ("features", "transform", "model", "postprocess"):
        if sum(series(text, "ray_stageline_batch_rows_count", segment=segment, **app)) < 1:
            missing.append(f"batch sizes of {segment}")
        if not series(text, "ray_stageline_stage_latency_ms_bucket", segment=segment, **app):
            missing.append(f"latency histogram of {segment}")
    # One series per replica that runs the model stage (the ingress runs two by default).
    if set(series(text, "ray_stageline_model_version", stage="model", **app)) != {1.0}:
        missing.append("model version 1 of the model stage")
    return missing
