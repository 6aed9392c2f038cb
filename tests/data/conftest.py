"""Fixtures for the recommendation-pipeline tests (tiny, hand-checkable data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import REAL_DATA  # noqa: F401  (the data tests' fixtures read it)
from xkern.data.domain import DomainData


@pytest.fixture
def tiny_domain() -> DomainData:
    """40 items; users 0-2 train, 3 val, 10-11 test (by-user layout)."""
    return DomainData(
        name="Tiny",
        n_items=40,
        titles=[f"item {i}" for i in range(40)],
        train={0: [0, 1, 2, 3], 1: [1, 2, 4], 2: [2, 5, 6, 7]},
        val={3: [8, 9, 10]},
        test={10: [0, 2, 11, 12], 11: [13, 14, 1]},
    )


@pytest.fixture(scope="session")
def real_data_root() -> Path:
    if not (REAL_DATA / "Tools" / "train.json").exists():
        pytest.skip(f"real data not present at {REAL_DATA}")
    return REAL_DATA
