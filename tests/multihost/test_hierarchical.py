"""Hierarchical all_reduce over 2 hosts x 2 ranks (network namespaces, see conftest.py): shared
memory inside each host, TCP between the host leaders (ranks 0 and 2).

Results equal the flat form's bit for bit (and the arithmetic reference); a leader SIGKILLed
inside the collective leaves its member with the host's partial, reported incomplete, and no
healthy rank excluded; a member SIGKILLed likewise is excluded and nobody else."""

from __future__ import annotations

import itertools
import os
import signal

import torch
import torch.distributed as dist

import elasticpg
from elasticpg.api import runtime_of
from elasticpg.collectives import hierarchical

from .. import test_collectives as single_host
from ..harness import init_group

BOTH_HOSTS = [0, 1, 2, 3]  # ranks 0, 1 on host 0 (leader 0); 2, 3 on host 1 (leader 2)


def job_equal_to_flat(rank: int, world: int, port: int) -> dict:
    # 4 KiB windows: 6 elements take one round, 5000 and 70000 several (step 1 and step 3)
    init_group(rank, world, port, env={"ELASTICPG_SHM_WINDOW": "4096"})
    rt = runtime_of(None)
    plan = rt.hier_plan(rt.view.active)
    calls = {"n": 0}
    real = hierarchical._allreduce

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    hierarchical._allreduce = counting
    bad: list[str] = []
    try:
        for dtype, n in itertools.product(single_host.DTYPES, (6, 5000, 70_000)):
            for name, op in single_host.OPS.items():
                if not single_host._valid(name, dtype):
                    continue
                outs = []
                for flat in (False, True):
                    rt.hierarchical = not flat
                    t = single_host._input(rank, dtype, n)
                    w = dist.all_reduce(t, op=op, async_op=True)
                    w.wait()
                    if not elasticpg.get_local_success(w):
                        bad.append(f"{name} {dtype} x{n} flat={flat}: no local success")
                    outs.append(t)
                want = single_host._reference(name, dtype, world, n)
                if not single_host._same(outs[0], outs[1]) or not single_host._same(outs[0], want):
                    bad.append(f"{name} {dtype} x{n}: hierarchical {outs[0][:6].tolist()} flat "
                               f"{outs[1][:6].tolist()} want {want[:6].tolist()}")
    finally:
        hierarchical._allreduce = real
        rt.hierarchical = True
    dist.barrier()
    return {"bad": bad, "hier_calls": calls["n"], "leader": plan and plan.leader,
            "groups": plan and plan.groups}


def test_hierarchical_all_reduce_equals_flat(cluster):
    res = cluster.pool.run(job_equal_to_flat, nodes=BOTH_HOSTS, timeout=180)
    for rank, v in enumerate(res):
        assert v["bad"] == [], v["bad"][:6]
        assert v["groups"] == ((0, 1), (2, 3)) and v["leader"] == (0 if rank < 2 else 2), v
        assert v["hier_calls"] > 100, v  # it ran (AVG and 16-bit floats run flat)


def _kill_self_before(name: str) -> None:
    """Make this process SIGKILL itself when its next hierarchical all_reduce reaches `name`
    (a real death at an exact point inside the collective)."""
    real = getattr(hierarchical, name) if hasattr(hierarchical, name) else None

    def die(*a, **kw):
        os.kill(os.getpid(), signal.SIGKILL)

    if real is not None:
        setattr(hierarchical, name, die)
    else:  # step 1 is the one-host all_reduce
        hierarchical.shm_algorithms.allreduce = die  # type: ignore[assignment]


def job_killed_inside(rank: int, world: int, port: int, victim: int, where: str) -> dict:
    init_group(rank, world, port, pg_options=elasticpg.Options(failure_timeout=2.0))
    value = float(1 << rank)
    t = torch.tensor([value])
    dist.all_reduce(t)  # links and mappings up
    assert t.item() == 15.0
    if rank == victim:
        _kill_self_before(where)
    t = torch.tensor([value])
    w = dist.all_reduce(t, async_op=True)
    w.wait()
    out = {"sum": t.item(), "ok": elasticpg.get_local_success(w),
           "hint": [r for r, b in enumerate(elasticpg.get_failed_ranks_hint(w).tolist()) if b],
           "mask": elasticpg.get_active_ranks().tolist()}
    after = []
    for _ in range(5):
        t = torch.tensor([value])
        w = dist.all_reduce(t, async_op=True)
        w.wait()
        after.append((t.item(), elasticpg.get_local_success(w)))
    out["after"] = after
    out["mask_end"] = elasticpg.get_active_ranks().tolist()
    return out


def test_a_leader_killed_inside_the_collective(cluster):
    """Leader 2 dies after posting its contribution in shared memory, before it sends the
    host's partial: rank 3 keeps {2, 3} (local_success False, 0 and 1 missing, not failed);
    ranks 0 and 1 get {0, 1}; only 2 is excluded."""
    pool = cluster.pool
    job = pool.submit(job_killed_inside, 2, "_leaders_exchange", nodes=BOTH_HOSTS)
    res = pool.collect(job, BOTH_HOSTS, timeout=90)
    assert res[2].status == "dead", res[2]
    v = {r: res[r].value for r in (0, 1, 3)}
    for r in (0, 1, 3):
        assert res[r].status == "ok", res[r].value
    assert v[0]["sum"] == v[1]["sum"] == 3.0 and v[3]["sum"] == 12.0, v
    for r in (0, 1, 3):
        assert not v[r]["ok"] and v[r]["hint"] == [2], v  # the healthy ranks are not named
        assert v[r]["mask_end"] == [1, 1, 0, 1], v  # no healthy host excluded
        assert v[r]["after"][-1] == (11.0, True), v
        assert all(s == 11.0 for s, ok in v[r]["after"] if ok), v


def test_a_member_killed_inside_the_collective(cluster):
    """Member 3 dies before posting: leader 2's partial is {2}, and it says 3 failed, so every
    survivor has {0, 1, 2} and names 3; only 3 is excluded."""
    pool = cluster.pool
    job = pool.submit(job_killed_inside, 3, "one-host step", nodes=BOTH_HOSTS)
    res = pool.collect(job, BOTH_HOSTS, timeout=90)
    assert res[3].status == "dead", res[3]
    v = {r: res[r].value for r in (0, 1, 2)}
    for r in (0, 1, 2):
        assert res[r].status == "ok", res[r].value
        assert v[r]["sum"] == 7.0 and not v[r]["ok"] and v[r]["hint"] == [3], v
        assert v[r]["mask_end"] == [1, 1, 1, 0], v
        assert v[r]["after"][-1] == (7.0, True), v
