"""The embedded demo: what it registers, exact parity of the CLI with the raw model,
and a training set built point-in-time correctly."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost

from stageline.demo import data
from stageline.demo.train import DemoResult
from stageline.demo.transforms import fraud_features
from stageline.features import OfflineStore
from stageline.registry import LocalRegistry, ModelMetadata
from stageline.spec import PipelineSpec
from stageline.stages.transform import apply_encoders
from stageline.training import training_frame
from tests.conftest import ROOT

VIEW = "customer_stats"


@pytest.fixture(scope="module")
def champion(demo_home: Path) -> ModelMetadata:
    return LocalRegistry(demo_home / "models").resolve("fraud", "champion")


def test_demo_registers_fraud_v1_as_champion(demo: DemoResult, champion: ModelMetadata) -> None:
    registry = LocalRegistry(demo.home / "models")
    assert registry.models() == ["fraud"]
    assert registry.aliases("fraud") == {"champion": 1}
    assert champion.version == 1
    assert champion == demo.model
    auc = champion.metrics["auc"]
    assert auc >= 0.85, f"held-out AUC {auc:.3f} on the small demo: the model learned too little"
    assert champion.threshold is not None
    assert 0.0 < champion.threshold < 1.0
    assert champion.encoders == {
        "merchant_category": {
            "kind": "ordinal",
            "output": "merchant_category_code",
            "categories": sorted(data.MERCHANTS),
        }
    }
    assert "merchant_category_code" in champion.features


# --------------------------------------------------------------------------- parity


def independent_scores(
    spec: PipelineSpec, home: Path, meta: ModelMetadata, rows: pd.DataFrame
) -> pd.Series:
    """The champion's scores computed without the pipeline: plain pandas and XGBoost."""
    model_file = home / "models" / "fraud" / str(meta.version) / meta.file
    raw = model_file.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == meta.sha256
    booster = xgboost.Booster(model_file=str(model_file))

    view = spec.features.views[VIEW]
    snapshot = pd.read_parquet(home / "online" / f"{VIEW}.parquet")
    frame = rows.merge(
        snapshot[[view.entity, *view.features]], on=view.entity, how="left", indicator=True
    )
    frame[f"{VIEW}_found"] = frame.pop("_merge").eq("both")
    for name, feature in view.features.items():
        frame[name] = frame[name].where(frame[f"{VIEW}_found"], feature.default)
    frame["country"] = frame["country"].fillna(spec.request.fields["country"].default)
    frame = pd.concat([frame, fraud_features(frame)], axis=1)
    frame = apply_encoders(frame, meta.encoders)
    matrix = frame[list(meta.features)].astype("float32")
    dmatrix = xgboost.DMatrix(matrix.to_numpy(), feature_names=list(meta.features))
    return pd.Series(booster.predict(dmatrix), index=frame["transaction_id"], dtype="float64")


def test_cli_predict_scores_exactly_as_the_registered_booster(
    fraud_spec: PipelineSpec,
    demo_home: Path,
    champion: ModelMetadata,
    holdout: pd.DataFrame,
    tmp_path: Path,
) -> None:
    rows = holdout.drop(columns="is_fraud").copy()
    snapshot = pd.read_parquet(demo_home / "online" / f"{VIEW}.parquet")
    assert (~rows["customer_id"].isin(snapshot["customer_id"])).sum() > 50, "needs unknowns"
    # Leave out the optional country of a US customer's purchase abroad: the default
    # ("US") makes it a domestic purchase, which changes its score.
    americans = snapshot.loc[snapshot["home_country"] == "US", "customer_id"]
    abroad = rows.index[rows["customer_id"].isin(americans) & (rows["country"] != "US")]
    rows.loc[abroad[0], "country"] = None
    source, out = tmp_path / "holdout.parquet", tmp_path / "out.parquet"
    rows.to_parquet(source)

    command = ["predict", "--spec", "pipelines/fraud.yaml", "--input", str(source)]
    command += ["--output", str(out), "--home", str(demo_home)]
    run = subprocess.run(
        [sys.executable, "-m", "stageline_cli", *command],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr

    cli = pd.read_parquet(out).set_index("transaction_id")
    assert cli["error"].isna().all()
    assert (cli["model_name"] == "fraud").all()
    assert (cli["model_version"] == 1).all()
    expected = independent_scores(fraud_spec, demo_home, champion, rows)
    assert sorted(cli.index) == sorted(expected.index)
    got = cli["score"].reindex(expected.index).to_numpy(dtype="float64")
    assert np.array_equal(got, expected.to_numpy()), np.abs(got - expected.to_numpy()).max()
    assert (cli["label"] == (cli["score"] >= champion.threshold)).all()


# --------------------------------------------------------------------------- training


def test_training_features_are_as_of_each_transaction(
    fraud_spec: PipelineSpec, demo_home: Path, holdout: pd.DataFrame
) -> None:
    marker = json.loads((demo_home / "demo" / "world.json").read_text())
    world = data.generate(**{k: marker[k] for k in ("customers", "transactions", "days", "seed")})
    cut = int(len(world.transactions) * 0.8)
    # The regenerated world is the one the demo trained on.
    assert (
        world.transactions["transaction_id"].iloc[cut:].tolist()
        == holdout["transaction_id"].tolist()
    )
    sample = world.transactions.iloc[:cut].sample(300, random_state=3)
    request = sample[list(fraud_spec.request.fields)]
    offline = OfflineStore(demo_home, fraud_spec.features.views, fraud_spec.base_dir)

    frame, _ = training_frame(fraud_spec, demo_home, request)

    view = fraud_spec.features.views[VIEW]
    table = offline.read(VIEW)
    expected, latest = [], []
    for customer, at in zip(request["customer_id"], request["ts"], strict=True):
        history = table[table[view.entity] == customer].sort_values(view.event_time)
        past = history[history[view.event_time] <= at]
        expected.append(past.iloc[-1][list(view.features)] if len(past) else None)
        latest.append(history.iloc[-1][list(view.features)] if len(history) else None)
    found = np.array([e is not None for e in expected])
    assert frame[f"{VIEW}_found"].tolist() == found.tolist()
    as_of = pd.DataFrame([e for e in expected if e is not None]).reset_index(drop=True)
    got = frame.loc[found, list(view.features)].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, as_of, check_dtype=False)
    # The check can tell: joining the latest values instead would differ for most rows.
    newest = pd.DataFrame([x for x in latest if x is not None]).reset_index(drop=True)
    assert (newest["avg_amount_30d"] != as_of["avg_amount_30d"]).mean() > 0.5
    # ... and the pipeline's own transform ran on those as-of values.
    np.testing.assert_allclose(
        frame.loc[found, "amount_to_avg"],
        request["amount"].to_numpy()[found] / (as_of["avg_amount_30d"].to_numpy() + 1.0),
    )
