"""Shared fixtures: one pool of rank processes for the whole session."""

from __future__ import annotations

import pytest

from .harness import RankPool


@pytest.fixture(scope="session")
def pool4():
    pool = RankPool(4)
    yield pool
    pool.close()
