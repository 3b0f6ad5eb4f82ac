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


@pytest.fixture(scope="session")
def etcd():
    """A 3-member etcd cluster on 127.0.0.1 (tests/etcd_cluster.py), shared by the session and
    always torn down. Tests that kill members restart them before they end."""
    pytest.importorskip("requests", reason="the etcd store needs the `etcd` extra")
    from .etcd_cluster import EtcdCluster, etcd_available

    if not etcd_available():
        pytest.skip("etcd is not installed (Debian: apt-get install etcd-server; .ci/run does)")
    cluster = EtcdCluster(3)
    yield cluster
    cluster.close()
