"""Groups wider than 64 slots. With real processes: 100 slots, 3 founders, one of them killed, a
replacement in its slot and an extension in slot 99 (so masks span two words), then every
collective kind among slots {0, 1, 2, 99}, over shared memory and over TCP. In-process: where a
region keeps the full masks of a wide group."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import elasticpg
from elasticpg.core.slot_masks import mask_bytes
from elasticpg.transport.shm import INCLUDED, MAGIC, PARTS, Region, host_id

from .harness import HOST, only_victim_died, serving_steps
from .test_elastic import _admit_when_ready, _sum

SLOTS = 100
HIGH = 99  # the extension's slot: above bit 63 of any one-word mask
FOUNDERS = 3


def _init(rank: int, world: int, port: int, extension: bool = False) -> dist.Store:
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))
    dist.init_process_group("elasticpg", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60),
                            pg_options=elasticpg.Options(max_group_size=SLOTS,
                                                         is_extension=extension,
                                                         failure_timeout=10.0))
    return store


def _serve_and_admit() -> list[int]:
    """A serving loop that admits whoever is ready once per step (admit_ready_ranks)."""
    for _ in serving_steps(60):
        _sum(1.0)
        admitted = elasticpg.admit_ready_ranks()
        if admitted:
            return admitted
    raise AssertionError("unreachable: serving_steps raises when time is up")


def _collectives(slot: int) -> dict:
    """Every collective kind among the 4 members; positional ones (all_gather, reduce_scatter,
    all_to_all) and the reduce-scatter path of a large all_reduce check participants masks."""
    members = [0, 1, 2, HIGH]
    me = members.index(slot)
    out = {"sum": _sum(float(slot)), "mask": elasticpg.get_active_ranks().tolist()}
    big = torch.full((1 << 18,), float(slot))  # 1 MiB: reduce-scatter + all-gather
    dist.all_reduce(big)
    out["big_ok"] = bool((big == float(sum(members))).all())
    flat = torch.zeros(4)
    dist.all_gather_into_tensor(flat, torch.tensor([float(slot)]))
    out["gather"] = flat.tolist()
    mine = torch.zeros(1)
    dist.reduce_scatter_tensor(mine, torch.arange(4, dtype=torch.float32) * (slot + 1))
    out["rs"] = mine.item()
    a2a = torch.zeros(4)
    dist.all_to_all_single(a2a, torch.arange(4, dtype=torch.float32) + 10 * me)
    out["a2a"] = a2a.tolist()
    b = torch.tensor([float(slot)])
    dist.broadcast(b, src=HIGH)
    out["bcast"] = b.item()
    # the root of that broadcast finishes first; leaving now could overtake a member that has
    # not yet called it (it would then refuse a root that left)
    dist.barrier()
    return out


def job_wide(rank: int, world: int, port: int, transport: str) -> dict:
    saved = os.environ.get("ELASTICPG_TRANSPORT")
    os.environ["ELASTICPG_TRANSPORT"] = transport  # read when a group is created
    try:
        return _wide(rank, port)
    finally:  # the pool's worker runs other jobs afterwards
        if saved is None:
            del os.environ["ELASTICPG_TRANSPORT"]
        else:
            os.environ["ELASTICPG_TRANSPORT"] = saved


def _wide(rank: int, port: int) -> dict:
    if rank == 3:  # the replacement for slot 1
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))
        store.wait(["survivor0", "survivor2"], timedelta(seconds=60))
        _init(1, FOUNDERS, port, extension=True)
        elasticpg.join_group(timeout=60)
        out = {"admit_high": _serve_and_admit()}
        out.update(_collectives(1))
        return out
    if rank == 4:  # an extension into the highest slot, once slot 1 is back
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=60))
        store.wait(["replaced"], timedelta(seconds=60))
        _init(HIGH, SLOTS, port, extension=True)
        elasticpg.join_group(timeout=60)
        return _collectives(HIGH)
    store = _init(rank, FOUNDERS, port)
    first = _sum(1.0)
    if rank == 1:
        os._exit(0)
    out = {"first": first, "after_failure": _sum(1.0),
           "mask_after_failure": elasticpg.get_active_ranks().tolist()}
    store.set(f"survivor{rank}", "1")
    out["admit_replacement"] = _admit_when_ready(1)
    store.set("replaced", "1")
    out["admit_high"] = _serve_and_admit()
    out.update(_collectives(rank))
    return out


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_100_slot_group_survives_a_failure_and_admits_a_replacement_and_slot_99(pool,
                                                                                 transport):
    res = pool.run_raw(job_wide, transport, world=5, timeout=150)
    only_victim_died(res, 1)
    want_mask = [1 if s in (0, 1, 2, HIGH) else 0 for s in range(SLOTS)]
    members = [0, 1, 2, HIGH]
    for worker, slot in ((0, 0), (2, 2), (3, 1), (4, HIGH)):
        v = res[worker].value
        if worker in (0, 2):
            assert v["first"] == 3.0 and v["after_failure"] == 2.0, v
            assert v["mask_after_failure"] == [1, 0, 1] + [0] * (SLOTS - 3), v
            assert v["admit_replacement"] == "Applied", v
        if worker != 4:
            assert v["admit_high"] == [HIGH], v
        assert v["sum"] == float(sum(members)) and v["mask"] == want_mask, v
        assert v["big_ok"], v
        assert v["gather"] == [0.0, 1.0, 2.0, float(HIGH)], v
        i = members.index(slot)
        assert v["rs"] == float(i * sum(m + 1 for m in members)), v
        assert v["a2a"] == [float(i + 10 * j) for j in range(4)], v
        assert v["bcast"] == float(HIGH), v


@pytest.mark.skipif(not host_id(), reason="shared memory is off here (not x86-64 Linux, or "
                    "ELASTICPG_TRANSPORT=tcp)")
@pytest.mark.parametrize("slots", [1, 63, 64, 100, 1024])
def test_region_masks_sit_beside_the_tables_without_overlap(slots):
    region = Region.create(slots, 4096)
    try:
        words = -(-slots // 64)
        masks = {(b, m): mask_bytes(((1 << slots) - 1) >> (b * 2 + m), slots)
                 for b in (0, 1) for m in (PARTS, INCLUDED)}
        for b in (0, 1):
            region.table(b)[:] = -7
        for (b, m), raw in masks.items():
            region.write_mask(b, m, raw)
        for (b, m), raw in masks.items():
            assert region.mask_raw(b, m) == raw and len(raw) == 8 * words
        for b in (0, 1):
            assert (region.table(b) == -7).all()
        assert int(region.ctl[0]) == MAGIC  # the header words are untouched
    finally:
        region.close()
