"""The multi-host fixture: hosts as network namespaces joined by veth links to a bridge (see
elasticpg.netns.topology), with rank processes started inside them by `ip netns exec`.

Nodes 0 and 1 live on host 0, nodes 2 and 3 on host 1, node 4 (a spare, for replacements) on
host 2. Everything is removed afterwards, also when a test or the set-up fails, and the
teardown fails the run if any namespace of it is left behind."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

import pytest

from elasticpg.netns.nodes import NodePool
from elasticpg.netns.topology import Topology, leftovers, unavailable

from ..harness import TEST_ENV

PLACEMENT = (0, 0, 1, 1, 2)


def run_prefix() -> str:
    """Names unique to this run: concurrent runs, or a killed earlier one, never collide."""
    return f"epgt-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class Cluster:
    topo: Topology
    pool: NodePool


@pytest.fixture(scope="session")
def cluster():
    why = unavailable()
    if why:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    topo = Topology(run_prefix(), hosts=3)
    pool = None
    try:
        topo.create()
        pool = NodePool(topo, PLACEMENT, env=TEST_ENV)
        yield Cluster(topo, pool)
    finally:
        if pool is not None:
            pool.close()
        errors = topo.remove()
        left = leftovers(topo.prefix)
        assert not errors and not left, f"namespaces left behind: {left} {errors}"
