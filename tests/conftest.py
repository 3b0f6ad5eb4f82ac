"""Shared fixtures: one pool of rank processes for the whole session (5 workers: jobs run on 4
ranks unless they ask for more, e.g. a replacement process beside 4 original ranks)."""

from __future__ import annotations

import pytest

from .harness import TEST_ENV, RankPool


@pytest.fixture(scope="session")
def pool():
    pool = RankPool(5, default_world=4, env=TEST_ENV)
    yield pool
    pool.close()
