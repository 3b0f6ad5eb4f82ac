"""SPEC scenarios 3, 4 and 5: deferred join of a replacement, scale-up into reserved slots,
graceful leave, in-place rejoin, subgroups and P2P across a recovery. Real processes throughout.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import elasticpg

from .harness import HOST

REPLACEMENT = 4  # the pool worker that plays the replacement process


def _init(rank: int, world: int, port: int, **opts) -> dist.Store:
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
    opts.setdefault("failure_timeout", 1.0)
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=30),
                            pg_options=elasticpg.Options(**opts))
    return store


def _sum(x: float, group=None) -> float:
    t = torch.tensor([x])
    dist.all_reduce(t, group=group)
    return t.item()


def _serve_until_admitted(rank: int, joiner: int, steps: int = 4000) -> dict:
    """The healthy ranks' serving loop: one all_reduce per step, poll, admit when ready."""
    worst, before, stall, seen_at = 0.0, set(), None, None
    for _ in range(steps):
        t0 = time.perf_counter()
        before.add(_sum(float(rank)))
        worst = max(worst, time.perf_counter() - t0)
        if elasticpg.get_peer_state(None, [joiner]) == [True]:
            seen_at = time.time()
            t0 = time.perf_counter()
            res = elasticpg.recover_ranks(None, [joiner])
            stall = time.perf_counter() - t0
            return {"worst_step": worst, "sums_before": sorted(before), "stall": stall,
                    "status": res.status.value, "epoch": res.new_epoch, "seen_at": seen_at}
    raise AssertionError("joiner never became ready")


def job_scenario3(rank: int, world: int, port: int) -> dict:
    if rank == REPLACEMENT:
        return _replacement(port)
    store = _init(rank, 4, port)
    if rank == 1:
        os._exit(0)
    out = {"first": _sum(float(rank)), "mask": elasticpg.get_active_ranks().tolist()}
    store.set(f"survivor{rank}-ready", "1")
    out.update(_serve_until_admitted(rank, 1))
    out["after"] = _sum(float(rank))
    out["mask_after"] = elasticpg.get_active_ranks().tolist()
    out["world"] = dist.get_world_size()
    return out


def _replacement(port: int) -> dict:
    started = time.time()
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
    # start only once the survivors have excluded the dead rank 1 and run a collective
    store.wait([f"survivor{r}-ready" for r in (0, 2, 3)], timedelta(seconds=30))
    dist.init_process_group("elasticpg", store=store, rank=1, world_size=4,
                            timeout=timedelta(seconds=30),
                            pg_options=elasticpg.Options(is_extension=True, failure_timeout=1.0))
    out = {"isolated": _sum(1.0), "world": dist.get_world_size()}
    out["isolated_gather"] = _isolated_gather()
    t_end = time.monotonic() + 1.0  # "warm-up": a second of local-only collectives
    while time.monotonic() < t_end:
        _sum(1.0)
    out["join_called"] = time.time()
    elasticpg.join_group()
    out["active_after"] = time.time() - started
    out["after"] = _sum(1.0)
    out["mask_after"] = elasticpg.get_active_ranks().tolist()
    return out


def _isolated_gather() -> list[float]:
    out = [torch.full((1,), -1.0) for _ in range(4)]
    dist.all_gather(out, torch.tensor([1.0]))
    return [x.item() for x in out]


def test_scenario3_deferred_join_of_a_replacement(pool):
    res = pool.run_raw(job_scenario3, world=5, timeout=120)
    assert res[1].status == "dead"
    bad = [(r, x.value) for r, x in enumerate(res) if r != 1 and x.status != "ok"]
    assert not bad, bad
    j = res[REPLACEMENT].value
    assert j["isolated"] == 1.0 and j["world"] == 4
    assert j["isolated_gather"] == [-1.0, 1.0, -1.0, -1.0]  # only its own slot
    assert j["after"] == 6.0 and j["mask_after"] == [1, 1, 1, 1]
    for r in (0, 2, 3):
        v = res[r].value
        assert v["first"] == 5.0 and v["mask"] == [1, 0, 1, 1], v
        assert v["sums_before"] == [5.0], v  # the survivors kept serving, never disturbed
        assert v["status"] == "Applied" and v["epoch"] == 2, v
        assert v["after"] == 6.0 and v["mask_after"] == [1, 1, 1, 1], v
        assert v["seen_at"] >= j["join_called"], (v, j)
