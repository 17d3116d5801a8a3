"""The example ensemble (pipelines/fraud-ensemble.yaml) in the graph placement: its two
model stages and its Combine in one deployment, behind an ingress that only routes,
answer every record sent alone exactly as the in-process pipeline answers it in a batch
(the local placement and batch are tests/e2e/test_pipelines.py's, as for every example).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import pytest
import requests
from ray import serve

from stageline import Pipeline
from stageline.spec import load_spec
from tests.conftest import ENSEMBLE_SPEC, EnsembleWorld, deploy_app
from tests.integration.serve_helpers import (
    TIMEOUT,
    answers,
    client_records,
    delete_apps,
    in_process_answers,
)

pytestmark = pytest.mark.e2e

APP = "ensemble-graph"
ROWS = 60


@pytest.fixture(scope="module")
def graph_url(serve_base: str, ensemble_world: EnsembleWorld) -> Iterator[str]:
    url = deploy_app(
        serve_base, APP, spec=str(ENSEMBLE_SPEC), home=str(ensemble_world.home), placement="graph"
    )
    yield url
    delete_apps([APP])


def test_graph_placement_answers_each_record_as_in_process(
    graph_url: str, ensemble_world: EnsembleWorld
):
    spec = load_spec(ENSEMBLE_SPEC)
    frame = pd.read_parquet(ensemble_world.holdout, columns=list(spec.request.fields)).head(ROWS)
    expected = in_process_answers(Pipeline(spec, ensemble_world.home), frame)
    # One record per request, six clients at once: the stage deployments merge them.
    sent = client_records(frame)
    with ThreadPoolExecutor(max_workers=6) as pool:
        parts = list(pool.map(lambda r: answers(graph_url, [r], "transaction_id"), sent))
    online = {k: v for part in parts for k, v in part.items()}

    assert set(serve.status().applications[APP].deployments) == {
        "ingress",
        "features+transform",
        "model+combine",
    }
    assert online == expected
    assert {tuple(a["models"]) for a in online.values()} == {("fraud v1", "fraud_lite v1")}
    assert len({a["score"] for a in online.values()}) > ROWS // 2


def test_models_lists_both_models_of_the_ensemble(graph_url: str):
    body = requests.get(f"{graph_url}/models", timeout=TIMEOUT).json()
    served = {(m["stage"], m["model"], m["version"]) for m in body["models"]}
    assert served == {("model", "fraud", 1), ("model_lite", "fraud_lite", 1)}
