"""Real processes over TCP while the caller reads its own links (TcpTransport.pump): a peer
SIGKILLed or SIGSTOPped during back-to-back collectives, whose link the survivors' callers own
(lease) and poll, is detected within today's bounds (EOF at once, a hang within
failure_timeout); point-to-point operations interleaved with collectives get their frames and
acknowledgements (the links go back to the readers) and every value is right."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import elasticpg

from .harness import init_group

TCP = {"ELASTICPG_TRANSPORT": "tcp"}


def job_peer_dies_mid_loop(rank: int, world: int, port: int, how: str, bound: float) -> dict:
    """Ranks run 300 back-to-back 4 B all_reduces (so each reads its links itself), then rank
    2 dies (SIGKILL) or hangs (SIGSTOP) at once, while the others start their next ones."""
    init_group(rank, world, port, env=TCP,
               pg_options=elasticpg.Options(failure_timeout=bound))
    store = dist.distributed_c10d._get_default_store()
    t = torch.ones(1)
    for _ in range(300):
        dist.all_reduce(t)
        t.fill_(1.0)
    if rank == 2:
        store.set("pid2", str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        return {}  # not reached (a stopped rank is SIGKILLed by rank 0 below)
    t0 = time.monotonic()
    ok, n = True, 0
    while ok:  # the first all_reduce that misses rank 2 returns without success
        t = torch.ones(1)
        work = dist.all_reduce(t, async_op=True)
        work.wait()
        ok = elasticpg.get_local_success(work)
        n += 1
    took = time.monotonic() - t0
    out = {"s": took, "n": n, "sum": t.item(), "mask": elasticpg.get_active_ranks().tolist()}
    t = torch.ones(1)
    dist.all_reduce(t)
    out["then"] = t.item()
    if rank == 0 and how == "stop":
        store.wait(["pid2"], timedelta(seconds=10))
        os.kill(int(store.get("pid2")), signal.SIGKILL)
    return out


@pytest.mark.parametrize(("how", "bound"), [("kill", 10.0), ("stop", 1.0)])
def test_a_peer_lost_while_the_callers_read_its_link_is_detected_within_the_bound(
        pool, how, bound):
    res = pool.run_raw(job_peer_dies_mid_loop, how, bound, world=3, timeout=90)
    assert res[2].status == "dead"
    for r in (0, 1):
        v = res[r].value
        assert res[r].status == "ok", v
        assert v["mask"] == [1, 1, 0] and v["then"] == 2.0, v
        assert v["sum"] == 2.0, v  # the failing op, without rank 2
        if how == "kill":  # EOF: far below the silence bound (10 s), on a loaded machine too
            assert v["s"] < 5.0, v
        else:  # silence: failure_timeout (1 s) plus a tick; slack for a loaded 2-core box
            assert v["s"] < 6.0, v


def job_p2p_between_collectives(rank: int, world: int, port: int) -> list:
    """Point-to-point operations posted before, waited after, and placed between small
    collectives, over TCP: every one completes with the right value."""
    init_group(rank, world, port, env=TCP)
    bad = []
    for i in range(60):
        t = torch.ones(1)
        dist.all_reduce(t)  # the caller owns the link now
        x = torch.ones(1)
        if rank == 0:
            w = dist.isend(torch.tensor([float(i)]), 1)
            dist.all_reduce(x)
            w.wait()  # the acknowledgement comes through rank 1's link to us
            dist.send(torch.tensor([i + 0.5]), 1)
            back = torch.zeros(1)
            dist.recv(back, 1)
            if back.item() != -i:
                bad.append(("recv", i, back.item()))
        else:
            got = torch.zeros(1)
            w = dist.irecv(got, 0)
            dist.all_reduce(x)
            w.wait()
            again = torch.zeros(1)
            dist.recv(again, 0)
            dist.send(torch.tensor([float(-i)]), 0)
            if got.item() != i or again.item() != i + 0.5:
                bad.append(("irecv/recv", i, got.item(), again.item()))
        if t.item() != 2.0 or x.item() != 2.0:
            bad.append(("all_reduce", i, t.item(), x.item()))
    dist.barrier()
    return bad


def test_point_to_point_interleaved_with_collectives_over_tcp(pool):
    assert pool.run(job_p2p_between_collectives, world=2, timeout=90) == [[], []]
