"""use_loopback: a local Ray stays on loopback, or stageline says why it cannot."""

from __future__ import annotations

import os
import sys
import types

import pytest

from stageline.localray import LOOPBACK_ENV, local_ray_options, use_loopback

(NAME, VALUE), *_ = LOOPBACK_ENV.items()


@pytest.fixture
def ray_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if Ray had been imported (without importing it: this tier runs without Ray)."""
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))


def test_before_ray_is_imported_it_sets_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.delenv(NAME, raising=False)
    use_loopback()
    assert os.environ[NAME] == VALUE


@pytest.mark.parametrize("before", [None, "1"])
def test_after_ray_was_imported_without_it_the_error_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, ray_imported: None, before: str | None
) -> None:
    if before is None:
        monkeypatch.delenv(NAME, raising=False)
    else:
        monkeypatch.setenv(NAME, before)
    with pytest.raises(RuntimeError, match=f"set {NAME}={VALUE} in the environment"):
        local_ray_options()


def test_after_ray_was_imported_with_it_already_set_all_is_well(
    monkeypatch: pytest.MonkeyPatch, ray_imported: None
) -> None:
    monkeypatch.setenv(NAME, VALUE)
    assert local_ray_options(num_cpus=1)["_node_ip_address"] == "127.0.0.1"
