"""The fault suite (issue 7): every test here is marked ``faults``, so
``pytest -m faults`` runs it alone; CI runs it with everything else."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.faults)
