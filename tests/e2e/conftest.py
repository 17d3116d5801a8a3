"""The example pipelines as a fixture: each test that takes ``case`` runs once per
example (tests/cases.py), the tests of one example together."""

from __future__ import annotations

import pytest

from stageline.spec import load_spec
from tests.cases import EXAMPLES, TIERS_SPEC, Case, make_case
from tests.pipelines.tiers import World as TiersWorld
from tests.pipelines.tiers import build as build_tiers


@pytest.fixture(scope="session")
def tiers_world(tmp_path_factory: pytest.TempPathFactory) -> TiersWorld:
    """The multiclass test pipeline's world, built once per session. Read-only."""
    return build_tiers(load_spec(TIERS_SPEC), tmp_path_factory.mktemp("tiers-home"))


@pytest.fixture(scope="session", params=EXAMPLES, ids=[e.name for e in EXAMPLES])
def case(request: pytest.FixtureRequest) -> Case:
    """One example pipeline with its world (built once per session)."""
    return make_case(request.param, request.getfixturevalue(request.param.world_fixture))
