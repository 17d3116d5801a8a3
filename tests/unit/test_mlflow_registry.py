"""The MLflow registry backend against a real MLflow tracking store (a folder in
tmp_path; no server), with the local registry's integrity rules."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest

from stageline import Pipeline
from stageline.registry import (
    LocalRegistry,
    ModelIntegrityError,
    ModelNotFoundError,
    open_registry,
    parse_model_ref,
)
from stageline.registry.mlflow_registry import SHA256_TAG, MlflowRegistry
from stageline.spec import PipelineSpec
from stageline.storage import MODELS_ENV
from tests.unit.test_object_storage import FEATURES, _scores, _train

try:
    from mlflow import MlflowClient
except ImportError:  # pragma: no cover - the dev extra installs it
    message = "mlflow-skinny is not installed (pip install -e '.[dev]'; scripts/test does)"
    if os.environ.get("CI") == "true":
        raise
    pytest.skip(message, allow_module_level=True)


@pytest.fixture
def tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An MLflow tracking and registry store in a folder of this test's own."""
    # The folder store is MLflow's simplest; a real deployment points at a server.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.delenv(MODELS_ENV, raising=False)
    return (tmp_path / "mlruns").as_uri()


def _artifact_file(tracking_uri: str, name: str, version: int, file: str) -> Path:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run_id = client.get_model_version(name, str(version)).run_id
    assert run_id is not None
    artifacts = client.get_run(run_id).info.artifact_uri
    return Path(urlsplit(artifacts).path) / "stageline-model" / file


def test_register_and_load_through_mlflow_aliases_and_refs(tracking_uri: str) -> None:
    registry = open_registry(f"mlflow:{tracking_uri}")
    assert isinstance(registry, MlflowRegistry)
    first, second = _train(1), _train(2)
    one = registry.register("fraud", first, features=FEATURES, threshold=0.3, aliases=["champion"])
    two = registry.register("fraud", second, features=FEATURES, aliases=["challenger"])
    assert (one.version, two.version) == (1, 2)

    # MLflow itself sees the versions and its aliases are stageline's.
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    assert int(client.get_model_version_by_alias("fraud", "champion").version) == 1
    assert client.get_model_version("fraud", "2").tags[SHA256_TAG] == two.sha256

    assert registry.models() == ["fraud"]
    assert registry.aliases("fraud") == {"challenger": 2, "champion": 1}
    loaded = registry.load(*parse_model_ref("models:/fraud@champion"))
    assert loaded.metadata == one
    assert loaded.metadata.threshold == 0.3
    assert loaded.metadata.features == tuple(FEATURES)
    np.testing.assert_array_equal(_scores(loaded.booster), _scores(first))
    by_number = registry.load(*parse_model_ref("models:/fraud/2"))
    np.testing.assert_array_equal(_scores(by_number.booster), _scores(second))

    registry.set_alias("fraud", "champion", 2)
    assert int(client.get_model_version_by_alias("fraud", "champion").version) == 2
    registry.delete_alias("fraud", "challenger")
    assert registry.aliases("fraud") == {"champion": 2}
    with pytest.raises(ModelNotFoundError, match="no version 5"):
        registry.load("fraud", 5)
    with pytest.raises(ModelNotFoundError, match="no model 'credit'"):
        registry.load("credit")


def test_altered_artifacts_are_refused(tracking_uri: str) -> None:
    registry = open_registry(f"mlflow:{tracking_uri}")
    registry.register("fraud", _train(1), features=FEATURES, aliases=["champion"])
    model = _artifact_file(tracking_uri, "fraud", 1, "model.ubj")
    raw = bytearray(model.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    model.write_bytes(bytes(raw))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        registry.load("fraud")

    # Rewriting the metadata to match the new file does not help: MLflow's record of the
    # version (its sha256 tag, set at registration) disagrees.
    other = open_registry(f"mlflow:{tracking_uri}")
    other.register("fraud", _train(2), features=FEATURES)
    swapped = _artifact_file(tracking_uri, "fraud", 2, "metadata.json").read_bytes()
    _artifact_file(tracking_uri, "fraud", 1, "metadata.json").write_bytes(swapped)
    model.write_bytes(_artifact_file(tracking_uri, "fraud", 2, "model.ubj").read_bytes())
    with pytest.raises(ModelIntegrityError, match="modified after registration"):
        registry.load("fraud", 1)


def test_a_version_of_a_pickle_flavor_is_refused(tracking_uri: str, tmp_path: Path) -> None:
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    run = client.create_run(client.create_experiment("elsewhere"))
    folder = tmp_path / "sk"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps({"not": "a booster"}))
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.create_registered_model("fraud")
    client.create_model_version("fraud", f"runs:/{run.info.run_id}/model", run.info.run_id)

    registry = open_registry(f"mlflow:{tracking_uri}")
    assert registry.versions("fraud") == []  # not stageline's: not listed
    with pytest.raises(ModelIntegrityError, match="never a pickle-based flavor"):
        registry.load("fraud", 1)


def test_the_pipeline_scores_from_mlflow_as_from_the_local_registry(
    tracking_uri: str,
    fraud_spec: PipelineSpec,
    fraud_pipeline: Pipeline,
    demo_home: Path,
    holdout: pd.DataFrame,
    tmp_path: Path,
) -> None:
    """The demo's champion registered in MLflow with its metadata; a spec whose
    ``storage.models`` is ``mlflow:...`` scores exactly as the local home does."""
    champion = LocalRegistry(demo_home / "models").load("fraud")
    meta = champion.metadata
    registry = open_registry(f"mlflow:{tracking_uri}")
    registry.register(
        "fraud",
        champion.booster,
        features=meta.features,
        encoders=meta.encoders,
        threshold=meta.threshold,
        metrics=meta.metrics,
        profile=meta.profile,
        aliases=["champion"],
    )
    home = tmp_path / "home"
    home.mkdir()
    (home / "features").symlink_to(demo_home / "features", target_is_directory=True)
    (home / "online").symlink_to(demo_home / "online", target_is_directory=True)
    storage = fraud_spec.storage.model_copy(update={"models": f"mlflow:{tracking_uri}"})
    spec = fraud_spec.model_copy(update={"storage": storage})

    rows = holdout.head(200)
    pd.testing.assert_frame_equal(Pipeline(spec, home).predict(rows), fraud_pipeline.predict(rows))


def test_the_registry_command_registers_lists_and_shows_in_mlflow(
    tracking_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stageline_cli import main

    booster = _train(3)
    booster.save_model(tmp_path / "model.ubj")
    where = ["--registry", f"mlflow:{tracking_uri}"]
    register = ["registry", "register", "fraud", str(tmp_path / "model.ubj"), *where]
    assert (
        main([*register, "--threshold", "0.3", "--metric", "auc=0.9", "--alias", "champion"]) == 0
    )
    capsys.readouterr()

    assert main(["registry", "list", *where]) == 0
    listed = capsys.readouterr().out
    row = next(line for line in listed.splitlines() if line.startswith("fraud"))
    assert row.split()[:3] == ["fraud", "1", "champion"]
    assert "auc 0.9" in row
    assert main(["registry", "show", "models:/fraud@champion", *where]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["version"], shown["threshold"], shown["features"]) == (1, 0.3, FEATURES)
    loaded = open_registry(f"mlflow:{tracking_uri}").load("fraud")
    np.testing.assert_array_equal(_scores(loaded.booster), _scores(booster))
