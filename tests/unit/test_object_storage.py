"""The registry and the feature store on object storage: a real S3-compatible server
(moto's, started once per session on loopback), no mocks, no Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pytest
import xgboost

from stageline import Pipeline
from stageline.features import FeatureStoreError, OfflineStore, materialize, open_online_store
from stageline.features.online import MemoryOnlineStore
from stageline.registry import (
    ModelIntegrityError,
    ModelNotFoundError,
    ObjectStoreRegistry,
    RegistryError,
    open_registry,
)
from stageline.spec import PipelineSpec
from stageline.storage import (
    FEATURES_ENV,
    MODELS_ENV,
    ONLINE_ENV,
    StorageLocations,
    s3_filesystem,
)
from tests.conftest import S3Server, free_port
from tests.unit.test_features import HISTORY, SPEC, VIEW

FEATURES = ["f0", "f1", "f2"]


def _train(seed: int) -> xgboost.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, len(FEATURES)))
    y = (x[:, 0] + x[:, 1] > 0).astype(int)
    dtrain = xgboost.DMatrix(x, label=y, feature_names=FEATURES)
    return xgboost.train({"objective": "binary:logistic", "seed": seed}, dtrain, 4)


def _scores(booster: xgboost.Booster) -> np.ndarray:
    x = np.random.default_rng(99).normal(size=(20, len(FEATURES)))
    return booster.predict(xgboost.DMatrix(x, feature_names=FEATURES))


def _fs() -> pafs.S3FileSystem:
    # The test's AWS variables point at the server (the s3_bucket fixture).
    return s3_filesystem()


def test_a_version_registered_on_s3_loads_with_the_same_predictions(s3_bucket: str) -> None:
    registry = open_registry(f"{s3_bucket}/models")
    assert isinstance(registry, ObjectStoreRegistry)
    booster = _train(1)
    meta = registry.register("fraud", booster, features=FEATURES, aliases=["champion"])
    assert meta.version == 1

    # A registry opened anew (another node) finds it and loads the same model.
    again = open_registry(f"{s3_bucket}/models")
    assert again.models() == ["fraud"]
    loaded = again.load("fraud")
    assert loaded.metadata == meta
    assert loaded.path == f"{s3_bucket}/models/fraud/1/model.ubj"
    np.testing.assert_array_equal(_scores(loaded.booster), _scores(booster))


def test_a_corrupted_model_object_is_refused(s3_bucket: str) -> None:
    registry = open_registry(f"{s3_bucket}/models")
    registry.register("fraud", _train(1), features=FEATURES)
    key = f"{s3_bucket.removeprefix('s3://')}/models/fraud/1/model.ubj"
    fs = _fs()
    with fs.open_input_stream(key) as f:
        raw = bytearray(f.read())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte changed
    with fs.open_output_stream(key) as f:
        f.write(bytes(raw))

    with pytest.raises(ModelIntegrityError, match="sha256") as caught:
        registry.load("fraud", 1)
    assert f"{s3_bucket}/models/fraud/1/model.ubj" in str(caught.value)

    with fs.open_output_stream(key) as f:
        f.write(bytes(raw[:-10]))
    with pytest.raises(ModelIntegrityError, match="truncated or replaced"):
        registry.load("fraud", 1)


def test_aliases_on_s3_move_and_are_deleted(s3_bucket: str) -> None:
    registry = open_registry(f"{s3_bucket}/models")
    first, second = _train(1), _train(2)
    registry.register("fraud", first, features=FEATURES, aliases=["champion"])
    registry.register("fraud", second, features=FEATURES, aliases=["challenger"])
    assert registry.aliases("fraud") == {"challenger": 2, "champion": 1}
    np.testing.assert_array_equal(_scores(registry.load("fraud").booster), _scores(first))

    registry.set_alias("fraud", "champion", 2)
    assert registry.resolve("fraud", "champion").version == 2
    np.testing.assert_array_equal(_scores(registry.load("fraud").booster), _scores(second))

    registry.delete_alias("fraud", "challenger")
    assert registry.aliases("fraud") == {"champion": 2}
    with pytest.raises(ModelNotFoundError, match="no alias 'challenger'"):
        registry.load("fraud", "challenger")
    with pytest.raises(ModelNotFoundError, match="no version 7"):
        registry.set_alias("fraud", "champion", 7)
    with pytest.raises(ModelNotFoundError, match="no model 'credit'"):
        registry.load("credit")


def test_a_version_without_its_metadata_is_invisible_and_never_reused(s3_bucket: str) -> None:
    """A register that died after its model file and before its metadata: readers never
    see the half-written version, and the next register does not write over it."""
    registry = open_registry(f"{s3_bucket}/models")
    registry.register("fraud", _train(1), features=FEATURES)
    with _fs().open_output_stream(f"{s3_bucket[5:]}/models/fraud/2/model.ubj") as f:
        f.write(b"{half")

    assert [m.version for m in registry.versions("fraud")] == [1]
    with pytest.raises(ModelNotFoundError, match="no version 2"):
        registry.load("fraud", 2)
    assert registry.register("fraud", _train(2), features=FEATURES).version == 3
    assert [m.version for m in registry.versions("fraud")] == [1, 3]


def test_a_missing_bucket_or_an_unreachable_endpoint_says_so(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(RegistryError, match="bucket does not exist") as caught:
        open_registry("s3://no-such-bucket-here/models").models()
    assert "s3://no-such-bucket-here/models" in str(caught.value)

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RegistryError, match="cannot be reached"):
        open_registry(f"{s3_bucket}/models").load("fraud")
    with pytest.raises(FeatureStoreError, match="cannot be reached"):
        OfflineStore(Path("unused"), SPEC.features.views, location=s3_bucket).read(VIEW)


def test_refused_credentials_say_which_variables_to_set(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server of this test's own that checks access keys, as S3 does.
    checking = S3Server(tmp_path, INITIAL_NO_AUTH_ACTION_COUNT="0")
    checking.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", checking.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key-it-knows")
        with pytest.raises(RegistryError, match="access was refused") as caught:
            open_registry("s3://models-bucket/models").load("fraud")
        assert "AWS_ACCESS_KEY_ID" in str(caught.value)
        with pytest.raises(FeatureStoreError, match="access was refused"):
            OfflineStore(tmp_path, SPEC.features.views, location="s3://tables/f").read(VIEW)
    finally:
        checking.stop()


def test_the_offline_store_and_the_online_snapshot_on_s3(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FEATURES_ENV, f"{s3_bucket}/features")
    monkeypatch.setenv(ONLINE_ENV, f"{s3_bucket}/online")
    home = tmp_path / "home"  # stays empty: everything is in the bucket
    offline = OfflineStore.for_spec(SPEC, home)
    assert offline.path(VIEW) == f"{s3_bucket}/features/{VIEW}.parquet"
    offline.write(VIEW, HISTORY)
    read = offline.read(VIEW)
    pd.testing.assert_frame_equal(read, HISTORY)

    assert materialize(SPEC, home) == {VIEW: 2}
    assert _fs().get_file_info(f"{s3_bucket[5:]}/online/{VIEW}.parquet").size > 0
    store = open_online_store(SPEC, home)
    looked_up = store.lookup(VIEW, pd.Series(["a", "zed"]))
    assert looked_up["spend"].tolist() == [30.0, -1.0]
    assert looked_up[f"{VIEW}_found"].tolist() == [True, False]

    # A snapshot materialized again into the bucket is what the running store serves
    # after its next check, stamped with its own time (the views' age).
    assert isinstance(store, MemoryOnlineStore)
    before = store.read(VIEW, pd.Series(["a"]))
    assert before.materialized_at is not None
    newer = HISTORY.assign(spend=HISTORY["spend"] * 2)
    writer = MemoryOnlineStore(OfflineStore.for_spec(SPEC, home), f"{s3_bucket}/online")
    writer.write(VIEW, newer.sort_values("event_time").groupby("user").tail(1),
                 materialized_at=before.materialized_at + 60)  # fmt: skip
    store.check()
    after = store.read(VIEW, pd.Series(["a"]))
    assert after.values["spend"].tolist() == [60.0]
    assert after.snapshot != before.snapshot
    assert after.materialized_at == before.materialized_at + 60
    store.close()
    assert not home.exists()


def test_the_spec_points_the_pipeline_at_s3_with_the_same_predictions(
    s3_bucket: str,
    fraud_spec: PipelineSpec,
    fraud_pipeline: Pipeline,
    demo_home: Path,
    holdout: pd.DataFrame,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The demo's registry and tables copied into a bucket: a pipeline whose spec says
    ``storage: {models: s3://..., features: s3://..., online: s3://...}`` on an empty
    home scores exactly as the one on the local home."""
    for name in (MODELS_ENV, FEATURES_ENV, ONLINE_ENV):
        monkeypatch.delenv(name, raising=False)
    bucket = s3_bucket.removeprefix("s3://")
    for folder in ("models", "features", "online"):
        pafs.copy_files(
            str(demo_home / folder), f"{bucket}/demo/{folder}", destination_filesystem=_fs()
        )
    storage = {f: f"{s3_bucket}/demo/{f}" for f in ("models", "features", "online")}
    spec = fraud_spec.model_copy(update={"storage": fraud_spec.storage.model_copy(update=storage)})
    assert StorageLocations.resolve(spec, tmp_path) == StorageLocations(**storage)

    rows = holdout.head(200)
    on_s3 = Pipeline(spec, tmp_path / "empty-home").predict(rows)
    pd.testing.assert_frame_equal(on_s3, fraud_pipeline.predict(rows))
    assert on_s3["score"].notna().all()
    assert not (tmp_path / "empty-home" / "models").exists()
