"""elasticpg scale-sim at small sizes: real GroupRuntimes over a real TCPStore, frames delivered
in-process. What a membership change costs must be exactly linear in the ranks: counted here
(store requests, frames), never timed."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch.distributed as dist

from elasticpg.cli import scale_sim
from elasticpg.cli.launching import HOST, listen_store


@pytest.fixture(scope="module")
def clients():
    server, port = listen_store(1, 30.0)
    conns = [dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
             for _ in range(3)]
    yield conns
    del conns, server


def test_one_failure_and_one_join_cost_a_linear_number_of_store_requests_and_frames(clients):
    results = [scale_sim.run_size(n, clients, 30.0) for n in (8, 16, 40)]
    for r in results:
        n, fail, join = r["ranks"], r["failure"], r["join"]
        assert fail["agreed"] and join["agreed"], r
        # every survivor: one proposal (won or lost) and one raise of view/latest; only the
        # winner announces, to the N - 2 other survivors
        assert fail["store_by_op"] == {"compare_set": 2 * (n - 1)}, fail
        assert fail["messages_by_kind"] == {"view": n - 2}, fail
        # joiner: 9 requests + 2 per member (endpoints); member: endpoint of the joiner (2),
        # the admission claim, the proposal, view/latest, joined/... (4)
        assert join["store_ops"] == 8 * (n - 1) + 9, join
        assert join["messages_by_kind"] == {"hello": 2 * (n - 1), "join": n - 1}, join
        assert r["final_epoch"] == 2
    assert scale_sim.superlinear(results) == []


def test_superlinear_counts_are_reported():
    def row(n, ops):
        return {"ranks": n, "failure": {"store_ops": ops, "messages": n},
                "join": {"store_ops": n, "messages": n}}

    assert scale_sim.superlinear([row(8, 20), row(16, 36), row(32, 68)]) == []  # 2n + 4
    bad = scale_sim.superlinear([row(8, 64), row(16, 256), row(32, 1024)])  # n^2
    assert len(bad) == 1 and bad[0].startswith("failure store_ops"), bad


def test_the_command_prints_the_table_and_checks_itself(capsys):
    assert scale_sim.main(["--ranks", "6,12", "--clients", "1", "--timeout", "30"]) == 0
    out = capsys.readouterr().out
    assert "decision" in out and "failure" in out and "join" in out
    with pytest.raises(SystemExit):
        scale_sim.main(["--ranks", "2"])
