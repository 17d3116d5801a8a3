"""use_loopback: a local Ray stays on loopback, or stageline says why it cannot; and
check_port_free: a port a command cannot listen on is one line, before anything starts."""

from __future__ import annotations

import os
import socket
import sys
import types

import pytest

from stageline.localray import LOOPBACK_ENV, check_port_free, local_ray_options, use_loopback

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


# -- check_port_free: a port that cannot be used is one line naming it and its option ----


def test_a_free_port_passes() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check_port_free("127.0.0.1", port, "--port")  # closed again: free


@pytest.mark.parametrize("held_on", ["127.0.0.1", "0.0.0.0"])
def test_a_port_in_use_names_the_port_and_the_option_that_moves_it(held_on: str) -> None:
    with socket.socket() as held:
        held.bind((held_on, 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(OSError, match=f"^port {port} on 127.0.0.1 is in use") as raised:
            check_port_free("127.0.0.1", port, "--metrics-port")
    message = str(raised.value)
    assert message.endswith("stop what holds it or choose another with --metrics-port")
    assert "\n" not in message


def test_a_host_that_is_not_this_machines_says_so() -> None:
    with pytest.raises(OSError, match=r"192\.0\.2\.1 is not an address of this machine"):
        check_port_free("192.0.2.1", 8000, "--port")  # TEST-NET-1: never assigned
