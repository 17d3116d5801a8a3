"""LocalRegistry: versions, aliases, and the checks that guard every load."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timezone
from pathlib import Path

import numpy as np
import pytest
import xgboost

from stageline.registry import (
    LocalRegistry,
    ModelIntegrityError,
    ModelMetadata,
    ModelNotFoundError,
    RegistryError,
    parse_model_ref,
)
from stageline.registry.local import DEFAULT_MAX_MODEL_BYTES, MAX_MODEL_BYTES_ENV
from tests.model_files import (
    flip_a_byte,
    huge_sparse_file,
    model_file,
    replace_model_bytes,
    truncate,
)

FEATURES = ("amount", "age", "score")


def _train(rounds: int = 5, seed: int = 0) -> xgboost.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 3))
    y = (x[:, 0] + 0.5 * x[:, 2] > 0).astype(int)
    return xgboost.train(
        {"objective": "binary:logistic", "max_depth": 2, "nthread": 1, "seed": seed},
        xgboost.DMatrix(x, label=y),
        num_boost_round=rounds,
    )


def _predict(booster: xgboost.Booster) -> np.ndarray:
    x = np.random.default_rng(42).normal(size=(50, 3))
    return booster.predict(xgboost.DMatrix(x, feature_names=list(FEATURES)))


@pytest.fixture
def booster() -> xgboost.Booster:
    return _train()


@pytest.fixture
def registry(tmp_path: Path) -> LocalRegistry:
    return LocalRegistry(tmp_path / "registry")


@pytest.fixture
def two_versions(registry: LocalRegistry) -> tuple[xgboost.Booster, xgboost.Booster]:
    """fraud@1 (champion) and fraud@2 (challenger), with different predictions."""
    first, second = _train(rounds=3, seed=1), _train(rounds=5, seed=2)
    registry.register("fraud", first, features=FEATURES, aliases=["champion"])
    registry.register("fraud", second, features=FEATURES, aliases=["challenger"])
    return first, second


# -- register, versions, metadata ------------------------------------------


def test_register_assigns_versions_1_then_2(
    registry: LocalRegistry, booster: xgboost.Booster
) -> None:
    first = registry.register("fraud", booster, features=FEATURES)
    second = registry.register("fraud", booster, features=FEATURES)

    assert (first.version, second.version) == (1, 2)
    assert [m.version for m in registry.versions("fraud")] == [1, 2]
    assert registry.models() == ["fraud"]
    assert sorted(p.name for p in (registry.root / "fraud" / "2").iterdir()) == [
        "metadata.json",
        "model.ubj",
    ]


def test_metadata_round_trips_through_disk(
    registry: LocalRegistry, booster: xgboost.Booster
) -> None:
    encoders = {"country": {"kind": "ordinal", "categories": ["de", "fr", "us"]}}
    registered = registry.register(
        "fraud",
        booster,
        features=FEATURES,
        encoders=encoders,
        threshold=0.7,
        metrics={"auc": 0.91, "logloss": 0.3},
        params={"max_depth": 2, "eta": 0.3},
        description="first cut",
    )

    stored = registry.resolve("fraud", 1)
    raw = model_file(registry).read_bytes()

    assert stored == registered
    assert stored.features == FEATURES
    assert stored.encoders == encoders
    assert stored.threshold == 0.7
    assert stored.metrics == {"auc": 0.91, "logloss": 0.3}
    assert stored.params == {"max_depth": 2, "eta": 0.3}
    assert stored.sha256 == hashlib.sha256(raw).hexdigest()
    assert stored.size_bytes == len(raw)
    assert stored.created_at.tzinfo is not None
    assert stored.created_at.utcoffset() == timezone.utc.utcoffset(None)


def test_concurrent_registers_never_share_a_version(registry: LocalRegistry) -> None:
    boosters = [_train(rounds=2, seed=s) for s in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        metas = list(pool.map(lambda b: registry.register("fraud", b, features=FEATURES), boosters))

    assert sorted(m.version for m in metas) == list(range(1, 9))
    assert [m.sha256 for m in registry.versions("fraud")] == [
        m.sha256 for m in sorted(metas, key=lambda m: m.version)
    ]


def test_an_unfinished_version_is_invisible_and_skipped(
    registry: LocalRegistry, booster: xgboost.Booster
) -> None:
    registry.register("fraud", booster, features=FEATURES)
    os.mkdir(registry.root / "fraud" / "2")  # a register that claimed 2 and is still writing

    assert [m.version for m in registry.versions("fraud")] == [1]
    with pytest.raises(ModelNotFoundError, match="no version 2"):
        registry.resolve("fraud", 2)
    assert registry.register("fraud", booster, features=FEATURES).version == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "Fraud!"}, "bad model name"),
        ({"name": "../escape"}, "bad model name"),
        ({"features": ("amount", "age")}, "expects 3 features"),
        ({"features": ("amount", "age", "age")}, "duplicate feature names"),
        ({"features": "amount"}, "not one string"),
        ({"aliases": ["Champion"]}, "bad alias"),
        ({"aliases": ["7"]}, "bad alias"),
        ({"params": {"weights": np.zeros(2)}}, "not JSON-serializable"),
        ({"threshold": float("nan")}, "metadata is invalid"),
        ({"format": "pickle"}, "format must be"),
    ],
)
def test_register_refuses_bad_input_and_leaves_no_version(
    registry: LocalRegistry, booster: xgboost.Booster, kwargs: dict[str, object], message: str
) -> None:
    call: dict[str, object] = {"name": "fraud", "features": FEATURES, **kwargs}
    name = call.pop("name")

    with pytest.raises(RegistryError, match=message):
        registry.register(name, booster, **call)  # type: ignore[arg-type]
    assert not (registry.root / "fraud").exists() or registry.versions("fraud") == []


def test_register_refuses_features_that_differ_from_the_boosters(
    registry: LocalRegistry, booster: xgboost.Booster
) -> None:
    booster.feature_names = ["a", "b", "c"]
    with pytest.raises(RegistryError, match=r"trained on features \['a', 'b', 'c'\]"):
        registry.register("fraud", booster, features=FEATURES)


# -- aliases ---------------------------------------------------------------


@pytest.mark.usefixtures("two_versions")
def test_aliases_set_move_and_delete(registry: LocalRegistry) -> None:
    assert registry.aliases("fraud") == {"challenger": 2, "champion": 1}

    registry.set_alias("fraud", "champion", 2)
    assert registry.resolve("fraud").version == 2

    registry.delete_alias("fraud", "challenger")
    assert registry.aliases("fraud") == {"champion": 2}
    on_disk = json.loads((registry.root / "fraud" / "aliases.json").read_text())
    assert on_disk == {"champion": 2}

    with pytest.raises(ModelNotFoundError, match="no alias 'challenger'"):
        registry.resolve("fraud", "challenger")
    with pytest.raises(ModelNotFoundError, match="no alias 'challenger' to delete"):
        registry.delete_alias("fraud", "challenger")


@pytest.mark.usefixtures("two_versions")
def test_alias_to_a_missing_version_is_refused(registry: LocalRegistry) -> None:
    with pytest.raises(ModelNotFoundError, match=r"'fraud' has no version 3 \(versions: 1, 2\)"):
        registry.set_alias("fraud", "champion", 3)
    assert registry.aliases("fraud")["champion"] == 1


@pytest.mark.usefixtures("two_versions")
@pytest.mark.parametrize("alias", ["", "3", "Champion", "-x", "a@b", "has space"])
def test_bad_alias_names_are_refused(registry: LocalRegistry, alias: str) -> None:
    with pytest.raises(RegistryError, match="bad alias"):
        registry.set_alias("fraud", alias, 1)


# -- resolve and load ------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "version"),
    [(None, 1), ("champion", 1), ("challenger", 2), (2, 2), ("2", 2), (1, 1)],
)
def test_load_by_alias_or_version_predicts_like_the_original(
    registry: LocalRegistry,
    two_versions: tuple[xgboost.Booster, xgboost.Booster],
    ref: str | int | None,
    version: int,
) -> None:
    loaded = registry.load("fraud", ref)

    assert loaded.metadata.version == version
    assert loaded.path == registry.root / "fraud" / str(version) / "model.ubj"
    assert loaded.booster.feature_names == list(FEATURES)
    assert np.array_equal(_predict(loaded.booster), _predict(two_versions[version - 1]))


@pytest.mark.parametrize("fmt", ["ubj", "json"])
def test_both_xgboost_formats_round_trip(
    registry: LocalRegistry, booster: xgboost.Booster, fmt: str
) -> None:
    meta = registry.register("fraud", booster, features=FEATURES, format=fmt)  # type: ignore[arg-type]
    loaded = registry.load("fraud", 1)

    assert meta.file == f"model.{fmt}"
    assert isinstance(loaded.path, Path)  # a local registry's file is a local path
    assert loaded.path.name == f"model.{fmt}"
    if fmt == "json":
        assert json.loads(loaded.path.read_bytes())["learner"]
    assert np.array_equal(_predict(loaded.booster), _predict(booster))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda r: r.load("churn"), "no model 'churn'.*models: fraud"),
        (lambda r: r.load("fraud", 9), r"no version 9 \(versions: 1, 2\)"),
        (lambda r: r.load("fraud", "staging"), "no alias 'staging'.*set_alias"),
        (lambda r: r.versions("churn"), "no model 'churn'"),
        (lambda r: r.aliases("churn"), "no model 'churn'"),
    ],
)
@pytest.mark.usefixtures("two_versions")
def test_unknown_models_versions_and_aliases_say_what_exists(
    registry: LocalRegistry, call: Callable[[LocalRegistry], object], message: str
) -> None:
    with pytest.raises(ModelNotFoundError, match=message):
        call(registry)


@pytest.mark.parametrize("ref", [0, -1, True, 1.5, "Bad!"])
@pytest.mark.usefixtures("two_versions")
def test_bad_refs_are_refused(registry: LocalRegistry, ref: object) -> None:
    with pytest.raises(RegistryError, match="fraud@"):
        registry.load("fraud", ref)  # type: ignore[arg-type]


@pytest.mark.usefixtures("two_versions")
def test_alias_pointing_at_a_deleted_version_says_how_to_repoint(registry: LocalRegistry) -> None:
    for path in (registry.root / "fraud" / "2").iterdir():
        path.unlink()
    (registry.root / "fraud" / "2").rmdir()

    with pytest.raises(ModelNotFoundError, match=r"fraud@challenger points at version 2"):
        registry.load("fraud", "challenger")


# -- refusals on load ------------------------------------------------------


TAMPERING: list[tuple[str, Callable[[LocalRegistry], None], str]] = [
    ("flipped byte", flip_a_byte, "has sha256 .* but its metadata.json records"),
    ("truncated", truncate, "bytes but its metadata.json records"),
    ("huge sparse file", huge_sparse_file, "is 1073741824 bytes but"),
    (
        "huge sparse file its metadata claims",
        lambda r: huge_sparse_file(r, claimed=True),
        "is 1073741824 bytes, over the 536870912-byte limit on model files, and was not read",
    ),
    ("missing", lambda r: model_file(r).unlink(), "is missing"),
    (
        "pickle protocol 5",
        lambda r: replace_model_bytes(r, pickle.dumps({"booster": [1, 2]}, protocol=5)),
        r'never loads pickle.*booster\.save_model\("model\.ubj"\)',
    ),
    (
        "pickle protocol 0",
        lambda r: replace_model_bytes(r, pickle.dumps({"booster": [1, 2]}, protocol=0)),
        "never loads pickle",
    ),
    (
        "json that is not a model",
        lambda r: replace_model_bytes(r, b'{"hello": 1}'),
        "XGBoost cannot load",
    ),
    (
        "random bytes after {",
        lambda r: replace_model_bytes(r, b"{" + np.random.default_rng(0).bytes(300)),
        "XGBoost cannot load",
    ),
    (
        "zip archive",
        lambda r: replace_model_bytes(r, b"PK\x03\x04" + bytes(100)),
        "not an XGBoost JSON/UBJSON model",
    ),
]


@pytest.mark.parametrize(
    ("tamper", "message"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING]
)
def test_load_refuses_a_tampered_model_file_naming_it(
    registry: LocalRegistry,
    booster: xgboost.Booster,
    tamper: Callable[[LocalRegistry], None],
    message: str,
) -> None:
    registry.register("fraud", booster, features=FEATURES, aliases=["champion"])
    tamper(registry)

    with pytest.raises(ModelIntegrityError, match=message) as caught:
        registry.load("fraud")
    assert str(model_file(registry)) in str(caught.value)
    assert "fraud@1" in str(caught.value)


def test_a_model_file_over_the_size_limit_is_refused_without_reading_it(
    registry: LocalRegistry, booster: xgboost.Booster
) -> None:
    """1 GiB that its metadata vouches for: refused on its size, before a byte is read
    (this process's peak memory does not grow by the file's size)."""
    registry.register("fraud", booster, features=FEATURES, aliases=["champion"])
    huge_sparse_file(registry, claimed=True)
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB

    with pytest.raises(ModelIntegrityError, match="over the 536870912-byte limit"):
        registry.load("fraud")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 100, f"loading grew the peak memory by {grown_mib:.0f} MiB"


def test_the_size_limit_is_configurable_and_guards_register(
    tmp_path: Path, booster: xgboost.Booster, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert LocalRegistry(tmp_path).max_model_bytes == DEFAULT_MAX_MODEL_BYTES
    monkeypatch.setenv(MAX_MODEL_BYTES_ENV, "1000")
    small = LocalRegistry(tmp_path / "small")
    assert small.max_model_bytes == 1000

    with pytest.raises(RegistryError, match=r"over the 1000-byte limit.*STAGELINE_MAX_MODEL_BYTES"):
        small.register("fraud", booster, features=FEATURES)
    assert not (small.root / "fraud").exists()
    roomy = LocalRegistry(tmp_path / "roomy", max_model_bytes=10**7)
    assert roomy.register("fraud", booster, features=FEATURES).version == 1


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda p: p.unlink(), "metadata.json is missing"),
        (lambda p: p.write_text("{not json"), "is not valid metadata"),
        (lambda p: p.write_text('{"name": "fraud"}'), "is not valid metadata"),
    ],
    ids=["missing", "corrupt json", "incomplete"],
)
def test_load_refuses_missing_or_corrupt_metadata_naming_it(
    registry: LocalRegistry,
    booster: xgboost.Booster,
    tamper: Callable[[Path], None],
    message: str,
) -> None:
    registry.register("fraud", booster, features=FEATURES)
    meta_path = registry.root / "fraud" / "1" / "metadata.json"
    tamper(meta_path)

    with pytest.raises(ModelIntegrityError, match=message) as caught:
        registry.load("fraud", 1)
    assert str(meta_path) in str(caught.value)


def test_load_refuses_features_that_differ_from_the_metadata(
    registry: LocalRegistry, booster: xgboost.Booster
) -> None:
    registry.register("fraud", booster, features=FEATURES)
    meta_path = registry.root / "fraud" / "1" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["features"] = ["score", "age", "amount"]  # same names, wrong order
    meta_path.write_text(json.dumps(meta))

    with pytest.raises(ModelIntegrityError, match="has feature names") as caught:
        registry.load("fraud", 1)
    assert str(model_file(registry)) in str(caught.value)


def test_corrupt_aliases_file_is_named(registry: LocalRegistry, booster: xgboost.Booster) -> None:
    registry.register("fraud", booster, features=FEATURES)
    aliases_path = registry.root / "fraud" / "aliases.json"
    aliases_path.write_text('{"champion": "one"}')

    with pytest.raises(ModelIntegrityError, match="must map alias names") as caught:
        registry.load("fraud")
    assert str(aliases_path) in str(caught.value)


# -- parse_model_ref and the package ---------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("fraud@champion", ("fraud", "champion")),
        ("fraud@3", ("fraud", 3)),
        ("fraud", ("fraud", "champion")),
        ("fraud-v2@shadow_a", ("fraud-v2", "shadow_a")),
    ],
)
def test_parse_model_ref(ref: str, expected: tuple[str, str | int]) -> None:
    assert parse_model_ref(ref) == expected


@pytest.mark.parametrize(
    "ref", ["", "@champion", "fraud@", "fraud@@3", "a@b@c", "fraud@0", "fraud@Champ", "Fraud"]
)
def test_parse_model_ref_refuses_bad_text(ref: str) -> None:
    with pytest.raises(RegistryError, match="fraud@champion"):
        parse_model_ref(ref)


_VALID_METADATA = {
    "name": "fraud",
    "version": 1,
    "format": "ubj",
    "file": "model.ubj",
    "sha256": "0" * 64,
    "size_bytes": 1,
    "features": ["a"],
    "created_at": "2024-01-01T00:00:00+00:00",
}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"created_at": "2024-01-01T00:00:00"}, "timezone-aware"),
        ({"file": "../../etc/passwd"}, "plain file name"),
        ({"sha256": "not-a-hash"}, "sha256"),
        ({"surprise": 1}, "Extra inputs are not permitted"),
    ],
)
def test_metadata_refuses_bad_fields(bad: dict[str, object], message: str) -> None:
    assert ModelMetadata.model_validate(_VALID_METADATA).file == "model.ubj"
    with pytest.raises(ValueError, match=message):
        ModelMetadata.model_validate({**_VALID_METADATA, **bad})


def test_registry_does_not_import_ray() -> None:
    code = (
        "import sys, stageline.registry; "
        "assert not [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
