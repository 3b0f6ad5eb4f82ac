"""Hierarchical all_reduce, broadcast and all_gather over 2 hosts x 2 ranks (network
namespaces, see conftest.py): shared memory inside each host, TCP between the host leaders
(ranks 0 and 2). The jobs force the hierarchy at every size (ELASTICPG_HIERARCHICAL=always, or
the runtime's flag): by default small ones run flat (core.hierarchy.pays).

Results equal the flat form's bit for bit (and the arithmetic reference); a leader SIGKILLed
inside the collective leaves its member with what its host has, reported incomplete, and no
healthy rank excluded; a member SIGKILLed likewise is excluded and nobody else."""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

import elasticpg
from elasticpg.api import runtime_of
from elasticpg.collectives import hierarchical
from elasticpg.core.framing import OpKind
from elasticpg.core.hierarchy import MIN_BYTES

from .. import test_collectives as single_host
from ..harness import init_group

BOTH_HOSTS = [0, 1, 2, 3]  # ranks 0, 1 on host 0 (leader 0); 2, 3 on host 1 (leader 2)


def job_equal_to_flat(rank: int, world: int, port: int) -> dict:
    # 4 KiB windows: 6 elements take one round, 5000 and 70000 several (step 1 and step 3)
    init_group(rank, world, port, env={"ELASTICPG_SHM_WINDOW": "4096"})
    rt = runtime_of(None)
    rt.hier_every_size = True
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


def job_data_movement_equal_to_flat(rank: int, world: int, port: int) -> dict:
    """broadcast from every root, all_gather_into_tensor and all_gather (list) of every dtype
    at 6, 5000 and 70000 elements (several 4 KiB windows in every step), hierarchical then
    flat: both equal to the reference, bit for bit."""
    init_group(rank, world, port, env={"ELASTICPG_SHM_WINDOW": "4096",
                                       "ELASTICPG_HIERARCHICAL": "always"})
    rt = runtime_of(None)
    calls = {"_broadcast": 0, "_allgather": 0}
    real = {name: getattr(hierarchical, name) for name in calls}

    def counting(name: str):
        def fn(*a, **kw):
            calls[name] += 1
            return real[name](*a, **kw)
        return fn

    for name in calls:
        setattr(hierarchical, name, counting(name))
    bad: list[str] = []

    def check(what: str, works: list, got: torch.Tensor, want: torch.Tensor) -> None:
        if not all(elasticpg.get_local_success(w) for w in works):
            bad.append(f"{what}: no local success")
        if not single_host._same(got, want):
            bad.append(f"{what}: got {got.reshape(-1)[:6].tolist()} want "
                       f"{want.reshape(-1)[:6].tolist()}")

    try:
        for dtype, n in itertools.product(single_host.DTYPES, (6, 5000, 70_000)):
            mine = single_host._input(rank, dtype, n)
            everyone = [single_host._input(r, dtype, n) for r in range(world)]
            for flat in (False, True):
                rt.hierarchical = not flat
                form = f"{dtype} x{n} flat={flat}"
                for root in range(world):
                    t = mine.clone()
                    w = dist.broadcast(t, src=root, async_op=True)
                    check(f"broadcast root={root} {form}", [w], t, everyone[root])
                out = torch.zeros(world * n, dtype=dtype)
                w = dist.all_gather_into_tensor(out, mine, async_op=True)
                check(f"all_gather_into_tensor {form}", [w], out, torch.cat(everyone))
                outs = [torch.zeros(n, dtype=dtype) for _ in range(world)]
                w = dist.all_gather(outs, mine, async_op=True)
                check(f"all_gather {form}", [w], torch.cat(outs), torch.cat(everyone))
    finally:
        for name, fn in real.items():
            setattr(hierarchical, name, fn)
        rt.hierarchical = True
    dist.barrier()
    return {"bad": bad, "calls": calls}


def test_hierarchical_all_reduce_equals_flat(cluster):
    res = cluster.pool.run(job_equal_to_flat, nodes=BOTH_HOSTS, timeout=180)
    for rank, v in enumerate(res):
        assert v["bad"] == [], v["bad"][:6]
        assert v["groups"] == ((0, 1), (2, 3)) and v["leader"] == (0 if rank < 2 else 2), v
        assert v["hier_calls"] > 100, v  # it ran (AVG and 16-bit floats run flat)


def test_hierarchical_broadcast_and_all_gather_equal_flat(cluster):
    res = cluster.pool.run(job_data_movement_equal_to_flat, nodes=BOTH_HOSTS, timeout=240)
    for v in res:
        assert v["bad"] == [], v["bad"][:6]
        assert v["calls"]["_broadcast"] >= 4 * 3 * 4 and v["calls"]["_allgather"] >= 2 * 3 * 4, v


def job_default_size_rule(rank: int, world: int, port: int) -> dict:
    """Without ELASTICPG_HIERARCHICAL=always: each op just below its threshold runs flat, at
    it hierarchically (core.hierarchy.MIN_BYTES), with the flat form's results."""
    init_group(rank, world, port)
    names = {"all_reduce": "_allreduce", "broadcast": "_broadcast", "all_gather": "_allgather"}
    kinds = {"all_reduce": OpKind.ALLREDUCE, "broadcast": OpKind.BROADCAST,
             "all_gather": OpKind.ALLGATHER_INTO_TENSOR}
    calls = dict.fromkeys(names, 0)
    real = {op: getattr(hierarchical, fn) for op, fn in names.items()}

    def counting(op: str):
        def fn(*a, **kw):
            calls[op] += 1
            return real[op](*a, **kw)
        return fn

    for op, fn in names.items():
        setattr(hierarchical, fn, counting(op))
    seen, bad = {}, []
    try:
        for op, kind in kinds.items():
            for where, n in (("below", MIN_BYTES[kind] // 8 - 1), ("at", MIN_BYTES[kind] // 8)):
                before = calls[op]
                mine = torch.arange(n, dtype=torch.int64) * (rank + 1)
                if op == "all_reduce":
                    got, want = mine.clone(), mine * 0 + torch.arange(n) * 10
                    dist.all_reduce(got)
                elif op == "broadcast":
                    got, want = mine.clone(), torch.arange(n, dtype=torch.int64) * 2
                    dist.broadcast(got, src=1)
                else:
                    got = torch.zeros(world * n, dtype=torch.int64)
                    want = torch.cat([torch.arange(n) * (r + 1) for r in range(world)])
                    dist.all_gather_into_tensor(got, mine)
                if not torch.equal(got, want):
                    bad.append(f"{op} x{n}")
                seen[f"{op} {where}"] = calls[op] > before
    finally:
        for op, fn in names.items():
            setattr(hierarchical, fn, real[op])
    dist.barrier()
    return {"bad": bad, "seen": seen}


def test_the_default_size_rule(cluster):
    res = cluster.pool.run(job_default_size_rule, nodes=BOTH_HOSTS, timeout=120)
    for v in res:
        assert v["bad"] == [], v
        # the choice is every rank's alike: below each threshold flat, at it hierarchical
        assert v["seen"] == {f"{op} {where}": where == "at" for op in
                             ("all_reduce", "broadcast", "all_gather")
                             for where in ("below", "at")}, v


def _kill_self_before(name: str, first: Callable[[], object] | None = None) -> None:
    """Make this process SIGKILL itself when its next hierarchical collective reaches `name`
    (a real death at an exact point inside the collective): a function of the hierarchical
    module, or "shm:<name>", a one-host step (shm_algorithms.<name>). `first` runs before."""
    def die(*a, **kw):
        if first is not None:
            first()
        os.kill(os.getpid(), signal.SIGKILL)

    if name.startswith("shm:"):
        setattr(hierarchical.shm_algorithms, name[4:], die)
    else:
        assert hasattr(hierarchical, name), name
        setattr(hierarchical, name, die)


def job_killed_inside(rank: int, world: int, port: int, victim: int, where: str) -> dict:
    init_group(rank, world, port, pg_options=elasticpg.Options(failure_timeout=2.0),
               env={"ELASTICPG_HIERARCHICAL": "always"})
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
    job = pool.submit(job_killed_inside, 3, "shm:allreduce", nodes=BOTH_HOSTS)
    res = pool.collect(job, BOTH_HOSTS, timeout=90)
    assert res[3].status == "dead", res[3]
    v = {r: res[r].value for r in (0, 1, 2)}
    for r in (0, 1, 2):
        assert res[r].status == "ok", res[r].value
        assert v[r]["sum"] == 7.0 and not v[r]["ok"] and v[r]["hint"] == [3], v
        assert v[r]["mask_end"] == [1, 1, 1, 0], v
        assert v[r]["after"][-1] == (7.0, True), v


def job_killed_inside_data_movement(rank: int, world: int, port: int, op: str, victim: int,
                                    where: str) -> dict:
    """One hierarchical broadcast from rank 0 (each rank's input: 1 << rank) or all_gather
    (into a tensor of zeros) in which `victim` SIGKILLs itself at `where`; then all_reduce
    until the view settles, and a broadcast from the lowest survivor."""
    init_group(rank, world, port, pg_options=elasticpg.Options(failure_timeout=2.0),
               env={"ELASTICPG_HIERARCHICAL": "always"})
    value = float(1 << rank)

    def run() -> tuple[torch.Tensor, object]:
        if op == "broadcast":
            t = torch.tensor([value])
            return t, dist.broadcast(t, src=0, async_op=True)
        t = torch.zeros(world)
        return t, dist.all_gather_into_tensor(t, torch.tensor([value]), async_op=True)

    run()  # links and mappings up
    # The victim dies only once every survivor is inside the collective: one that learnt of
    # the death before it started would run it on the next view (or, the root gone, refuse it)
    store = dist.distributed_c10d._get_default_store()
    body = "_broadcast" if op == "broadcast" else "_allgather"
    real = getattr(hierarchical, body)
    if rank == victim:
        others = [f"inside{r}" for r in range(world) if r != victim]
        _kill_self_before(where, lambda: store.wait(others, timedelta(seconds=30)))
    else:
        def entering(*a, **kw):
            store.set(f"inside{rank}", "1")
            return real(*a, **kw)

        setattr(hierarchical, body, entering)
    try:
        t, w = run()
        w.wait()
    finally:
        setattr(hierarchical, body, real)
    out = {"got": t.tolist(), "ok": elasticpg.get_local_success(w),
           "hint": [r for r, b in enumerate(elasticpg.get_failed_ranks_hint(w).tolist()) if b]}
    after = []
    for _ in range(5):
        s = torch.tensor([value])
        w = dist.all_reduce(s, async_op=True)
        w.wait()
        after.append((s.item(), elasticpg.get_local_success(w)))
    out["after"] = after
    out["mask_end"] = elasticpg.get_active_ranks().tolist()
    src = out["mask_end"].index(1)
    b = torch.tensor([value])
    w = dist.broadcast(b, src=src, async_op=True)
    w.wait()
    out["bcast_after"] = (b.item(), elasticpg.get_local_success(w), float(1 << src))
    # A broadcast's root never waits: without this, it could leave the group (its job done)
    # before a slower survivor called the broadcast, which then refused an inactive root
    store.set(f"done{rank}", "1")
    store.wait([f"done{r}" for r in range(world) if r != victim], timedelta(seconds=30))
    return out


def _survivors(cluster, op: str, victim: int, where: str) -> dict[int, dict]:
    pool = cluster.pool
    job = pool.submit(job_killed_inside_data_movement, op, victim, where, nodes=BOTH_HOSTS)
    res = pool.collect(job, BOTH_HOSTS, timeout=90)
    assert res[victim].status == "dead", res[victim]
    for r in BOTH_HOSTS:
        if r != victim:
            assert res[r].status == "ok", res[r].value
    v = {r: res[r].value for r in BOTH_HOSTS if r != victim}
    alive = [int(r != victim) for r in BOTH_HOSTS]
    survivors_sum = float(sum(1 << r for r in BOTH_HOSTS if r != victim))
    for r, x in v.items():
        assert x["mask_end"] == alive, (r, x)  # only the victim excluded
        assert x["after"][-1] == (survivors_sum, True), (r, x)
        assert all(s == survivors_sum for s, ok in x["after"] if ok), (r, x)
        got, ok, want = x["bcast_after"]
        assert ok and got == want, (r, x)
    return v


def test_broadcast_remote_leader_killed_inside(cluster):
    """Leader 2 dies with the root's tensor, before posting it: member 3 keeps its input and
    names only 2 (the root is missing, not failed); the root's host completes."""
    v = _survivors(cluster, "broadcast", 2, "_post_stream")
    assert v[3]["got"] == [8.0] and not v[3]["ok"] and v[3]["hint"] == [2], v
    for r in (0, 1):
        assert v[r]["got"] == [1.0] and v[r]["hint"] in ([], [2]), v


def test_broadcast_remote_member_killed_inside(cluster):
    """Member 3 dies before posting: leader 2 has the root's tensor and names 3."""
    v = _survivors(cluster, "broadcast", 3, "_take_stream")
    assert v[2]["got"] == [1.0] and not v[2]["ok"] and v[2]["hint"] == [3], v
    for r in (0, 1):
        assert v[r]["got"] == [1.0] and v[r]["hint"] in ([], [3]), v


def test_broadcast_root_killed_inside(cluster):
    """The root (leader 0) dies before sending: every survivor keeps its input and names 0,
    rank 3 through its leader's table."""
    v = _survivors(cluster, "broadcast", 0, "broadcast_targets")
    for r in (1, 2, 3):
        assert v[r]["got"] == [float(1 << r)] and not v[r]["ok"] and v[r]["hint"] == [0], v


def test_all_gather_leader_killed_inside(cluster):
    """Leader 2 dies after the one-host step, before the leaders' exchange: rank 3 has the
    blocks of {2, 3}, ranks 0 and 1 those of {0, 1}; all name only 2."""
    v = _survivors(cluster, "all_gather", 2, "_leaders_gather")
    assert v[3]["got"][2:] == [4.0, 8.0] and not v[3]["ok"] and v[3]["hint"] == [2], v
    for r in (0, 1):
        assert v[r]["got"][:2] == [1.0, 2.0] and not v[r]["ok"] and v[r]["hint"] == [2], v


def test_all_gather_member_killed_inside(cluster):
    """Member 3 dies before its one-host step: every survivor has the blocks of {0, 1, 2} and
    names 3 (leader 2's table says it failed)."""
    v = _survivors(cluster, "all_gather", 3, "shm:allgather")
    for r in (0, 1, 2):
        assert v[r]["got"][:3] == [1.0, 2.0, 4.0] and not v[r]["ok"] and v[r]["hint"] == [3], v
