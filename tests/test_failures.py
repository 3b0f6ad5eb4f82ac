"""SPEC scenarios 2, 5 (framework-managed part) and 6: real kills, real hangs, real severed links.

Dead ranks are real processes that called os._exit or were SIGKILLed/SIGSTOPped; the pool
replaces them before the next job.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import elasticpg

from .harness import init_group


def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def _opts(**kw) -> elasticpg.Options:
    # crashes are detected by closed links at once; this bound is for hangs only, and is kept
    # generous so that a heavily loaded 2-core machine cannot fake a hang
    kw.setdefault("failure_timeout", 5.0)
    return elasticpg.Options(**kw)


def job_scenario2(rank: int, world: int, port: int) -> dict:
    """Rank 1 exits right after init; the survivors' all_reduce of rank ids gives 0+2+3."""
    init_group(rank, world, port, pg_options=_opts())
    if rank == 1:
        os._exit(0)
    t = torch.tensor([float(rank)])
    t0 = time.monotonic()
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    return {"sum": t.item(), "mask": elasticpg.get_active_ranks().tolist(),
            "epoch": elasticpg.get_current_epoch(), "s": time.monotonic() - t0,
            "then": _sum_again(rank)}


def _sum_again(rank: int) -> float:
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def test_scenario2_survivors_complete_without_dead_rank(pool):
    res = pool.run_raw(job_scenario2, timeout=60)
    assert res[1].status == "dead"
    for r in (0, 2, 3):
        assert res[r].status == "ok", res[r].value
        v = res[r].value
        assert v["sum"] == 5.0 and v["then"] == 5.0, v
        assert v["mask"] == [1, 0, 1, 1], v
        assert v["epoch"] == 1, v
        assert v["s"] < 10.0, v


def job_hang(rank: int, world: int, port: int) -> dict:
    """Rank 2 SIGSTOPs itself after a barrier: detected within failure_timeout; survivors go on."""
    init_group(rank, world, port, pg_options=_opts(failure_timeout=1.0))
    store = _store()
    dist.barrier()
    if rank == 2:
        store.set("pid2", str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
        return {}  # not reached: rank 0 SIGKILLs us
    store.wait(["pid2"], timedelta(seconds=10))
    t = torch.tensor([float(rank)])
    t0 = time.monotonic()
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    took = time.monotonic() - t0
    out = {"sum": t.item(), "s": took, "ok": elasticpg.get_local_success(work),
           "hint": elasticpg.get_failed_ranks_hint(work, 4).tolist(),
           "mask": elasticpg.get_active_ranks().tolist(), "then": _sum_again(rank)}
    dist.barrier()
    if rank == 0:
        os.kill(int(store.get("pid2")), signal.SIGKILL)
    return out


def test_scenario6_sigstopped_rank_detected_within_bound(pool):
    res = pool.run_raw(job_hang, timeout=60)
    assert res[2].status == "dead"
    for r in (0, 1, 3):
        v = res[r].value
        assert res[r].status == "ok", v
        assert v["sum"] == 4.0 and v["then"] == 4.0, v
        assert v["mask"] == [1, 1, 0, 1], v
        assert v["ok"] is False and v["hint"] == [0, 0, 1, 0], v
        # failure_timeout is 1 s; allow generous slack for a loaded 2-core machine
        assert v["s"] < 6.0, v


WINDOW = 1 << 20  # the shared-memory window (bytes): the unit a contribution arrives in
DIE_AFTER = 5  # shm variant: rank 3 exits right after posting this window (of 16)


def _exit_after_posting(window: int) -> None:
    """Make this process die (os._exit) the moment it has posted shared-memory `window` of
    its next collective: a real death at a known point inside the operation."""
    from elasticpg.collectives.shm_exchange import ShmOp

    post = ShmOp.post

    def post_then_die(self, k, *args, **kwargs):
        b = post(self, k, *args, **kwargs)
        if k == window:
            os._exit(1)
        return b

    ShmOp.post = post_then_die


def job_die_mid_allreduce(rank: int, world: int, port: int, delay: float | None,
                          transport: str) -> dict:
    """Rank 3 dies inside a 16 MB all_reduce: `delay` seconds after starting it, or (None)
    right after posting window DIE_AFTER (shared memory only)."""
    init_group(rank, world, port, pg_options=_opts(),
               env={"ELASTICPG_TRANSPORT": transport, "ELASTICPG_SHM_WINDOW": str(WINDOW)})
    n = 4 << 20  # 16 MB of float32 per rank
    t = torch.full((n,), float(rank + 1))
    dist.barrier()
    if rank == 3:
        if delay is None:
            _exit_after_posting(DIE_AFTER)
        else:
            threading.Timer(delay, os._exit, (1,)).start()
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    if rank == 3:
        time.sleep(5)  # the timer kills us; survive long enough for it to fire
    ok = elasticpg.get_local_success(work)
    windows = [torch.unique(w).tolist() for w in t.split(WINDOW // 4)]
    return {"ok": ok, "windows": windows, "mask": elasticpg.get_active_ranks().tolist(),
            "hint": elasticpg.get_failed_ranks_hint(work, 4).tolist(),
            "then": _sum_again(rank)}


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_rank_killed_inside_large_all_reduce(pool, transport):
    delays = (0.0, 0.02) if transport == "tcp" else (None, 0.0, 0.02)
    for delay in delays:
        res = pool.run_raw(job_die_mid_allreduce, delay, transport, timeout=90)
        assert res[3].status == "dead"
        for r in (0, 1, 2):
            v = res[r].value
            assert res[r].status == "ok", v
            # explicit rule: a contribution counts iff received whole; over TCP the whole
            # tensor is one message, over shared memory each window is one (README)
            sums = [w[0] if len(w) == 1 else w for w in v["windows"]]
            assert all(x in (10.0, 6.0) for x in sums), v
            if transport == "tcp":
                assert len(set(sums)) == 1, sums
            else:  # the windows it completed before dying, then none
                assert sums == sorted(sums, reverse=True), sums
            if delay is None:  # died at a known point: exactly its posted windows count
                assert sums == [10.0] * (DIE_AFTER + 1) + [6.0] * (15 - DIE_AFTER), sums
                assert v["ok"] is False, v
            if v["ok"]:  # a timed death can come after rank 3 finished the op, or before
                # this rank started it (then the op ran over the survivors only)
                assert set(sums) == {10.0} or (set(sums) == {6.0} and v["mask"][3] == 0), v
            else:  # mode (a): a failed operation returns with the hole already in the view
                assert v["hint"] == [0, 0, 0, 1], v
                assert v["mask"] == [1, 1, 1, 0], v
            assert v["then"] == 3.0, v


def job_view_lag(rank: int, world: int, port: int, transport: str) -> dict:
    """Mode (b): after rank 3 dies, ranks 0 and 1 apply the new view, rank 2 not yet. An even
    all_to_all_single then splits by 3 at ranks 0 and 1 and by 4 at rank 2: view lag, not a
    program error. It must not poison the group nor exclude rank 2."""
    init_group(rank, world, port, env={"ELASTICPG_TRANSPORT": transport},
               pg_options=_opts(auto_sync_on_failure=False))
    dist.barrier()
    if rank == 3:
        os._exit(0)
    dist.all_reduce(torch.ones(1))  # sees rank 3 fail; mode (b) leaves the view alone
    if rank in (0, 1):
        elasticpg.sync_after_failure()
    inp = torch.arange(12) + 100 * rank
    out = torch.full((12,), -1, dtype=torch.int64)
    work = dist.all_to_all_single(out, inp, async_op=True)
    work.wait()
    first = {"ok": elasticpg.get_local_success(work), "out": out.tolist(),
             "hint": elasticpg.get_failed_ranks_hint(work, world).tolist()}
    if rank == 2:
        elasticpg.sync_after_failure()
    out2 = torch.empty(12, dtype=torch.int64)
    work = dist.all_to_all_single(out2, inp, async_op=True)
    work.wait()
    dist.barrier()
    return {"first": first, "ok2": elasticpg.get_local_success(work), "out2": out2.tolist(),
            "mask": elasticpg.get_active_ranks().tolist(), "epoch": elasticpg.get_current_epoch()}


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_view_lag_skips_the_lagging_peer_without_poisoning(pool, transport):
    res = pool.run_raw(job_view_lag, transport, timeout=90)
    v = [res[r].value for r in range(3)]
    assert all(res[r].status == "ok" for r in range(3)), v
    for r in (0, 1):  # three blocks of 4: their own, each other's, rank 2's (skipped)
        other = 1 - r
        assert v[r]["first"]["ok"] is False, v[r]
        want = [-1] * 12
        want[4 * r:4 * r + 4] = [100 * r + 4 * r + i for i in range(4)]
        want[4 * other:4 * other + 4] = [100 * other + 4 * r + i for i in range(4)]
        assert v[r]["first"]["out"] == want, v[r]
        assert v[r]["first"]["hint"] == [0, 0, 0, 0], v[r]  # rank 2 lagged, it did not fail
    # rank 2 (four blocks of 3) kept only its own block: 0 and 1 lagged, 3 is dead
    want2 = [-1] * 12
    want2[6:9] = [200 + 6, 200 + 7, 200 + 8]
    assert v[2]["first"]["out"] == want2 and v[2]["first"]["ok"] is False, v[2]
    for r in range(3):  # then all agree again, nobody was excluded but the dead rank
        assert v[r]["ok2"] is True and v[r]["mask"] == [1, 1, 1, 0], v[r]
        assert v[r]["out2"] == [100 * p + 4 * r + i for p in range(3) for i in range(4)], v[r]
    assert len({x["epoch"] for x in v}) == 1, v


def _subsets(got: torch.Tensor, unit: torch.Tensor) -> set[frozenset[int]]:
    """Rank r contributes 10**r * unit; the sets of ranks whose contributions the elements of
    `got` sum. An element that is no such exact sum (a block from the wrong place, a slice
    left unwritten) yields {-1}."""
    x = (got / unit).round()
    out = {frozenset({-1})} if not torch.equal(got, x * unit) else set()
    for v in x.long().unique().tolist():
        digits = [int(c) for c in reversed(str(v))] if v > 0 else [2]
        out.add(frozenset(r for r, d in enumerate(digits) if d == 1)
                if set(digits) <= {0, 1} else frozenset({-1}))
    return out


def job_view_lag_layouts(rank: int, world: int, port: int, transport: str,
                         dead: tuple[int, ...], synced: tuple[int, ...]) -> dict:
    """Mode (b): `dead` exit, then only `synced` apply the view without them. The others run
    the next collectives over the old participants, whose layouts differ: reduce_scatter
    chunks at other positions, all_reduce sliced another way or by another algorithm."""
    init_group(rank, world, port, env={"ELASTICPG_TRANSPORT": transport},
               pg_options=_opts(auto_sync_on_failure=False))
    dist.barrier()
    if rank in dead:
        os._exit(0)
    dist.all_reduce(torch.ones(1))  # sees the deaths; mode (b) leaves the view alone
    if rank in synced:
        elasticpg.sync_after_failure()
    out = {}
    unit = torch.arange(1, 4, dtype=torch.float64)  # chunk s of rank r: 10**r * (s+1) * unit
    inp = torch.cat([10.0 ** rank * (s + 1) * unit for s in range(world)])
    rs = torch.zeros(3, dtype=torch.float64)
    work = dist.reduce_scatter_tensor(rs, inp, async_op=True)
    out["rs"] = (elasticpg.get_local_success(work), _subsets(rs, (rank + 1) * unit))
    unit = torch.arange(1, (96 << 10) + 1, dtype=torch.float64)  # 768 KiB: the large path
    t = 10.0 ** rank * unit
    work = dist.all_reduce(t, async_op=True)
    out["ar"] = (elasticpg.get_local_success(work), _subsets(t, unit))
    elasticpg.sync_after_failure()
    t = torch.tensor([10.0 ** rank])
    dist.all_reduce(t)
    out["after"] = t.item()
    return out


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("dead,synced", [((1,), (0, 3)), ((2, 3), (0,))])
def test_view_lag_with_other_layouts_is_never_a_wrong_result(pool, transport, dead, synced):
    """Whatever each rank counts in the op after a failure, it is an exact sum over ranks
    that include itself, and local_success=True means every live participant was counted."""
    res = pool.run_raw(job_view_lag_layouts, transport, dead, synced, timeout=90)
    live = [r for r in range(4) if r not in dead]
    for r in live:
        v = res[r].value
        assert res[r].status == "ok", v
        for op in ("rs", "ar"):
            ok, subsets = v[op]
            assert len(subsets) == 1, (op, v)
            (got,) = subsets
            assert r in got and got <= set(live), (op, r, got)
            if ok:
                assert got == set(live), (op, r, got)
        assert v["after"] == sum(10.0 ** p for p in live), v


def job_p2p_peer_dies(rank: int, world: int, port: int) -> dict:
    init_group(rank, world, port, pg_options=_opts())
    dist.barrier()
    if rank == 1:
        os._exit(0)
    out = {}
    if rank == 0:
        # large enough that it cannot all sit in socket buffers (and a send completes only
        # once the receiver acknowledges it anyway)
        works = [dist.isend(torch.ones(8 << 20), 1) for _ in range(20)]
        for w in works:
            w.wait()  # completes, unsuccessfully, instead of hanging or raising
        out["send"] = (works[-1].local_success, list(works[-1].failed_ranks))
    if rank == 2:
        w = dist.irecv(torch.zeros(4), 1)
        w.wait()
        out["recv"] = (w.local_success, list(w.failed_ranks))
    out["sum"] = _sum_again(rank)
    return out


def test_p2p_with_dead_peer_fails_instead_of_hanging(pool):
    res = pool.run_raw(job_p2p_peer_dies, world=3, timeout=60)
    assert res[1].status == "dead"
    assert res[0].value["send"] == (False, [1]), res[0]
    assert res[2].value["recv"] == (False, [1]), res[2]
    assert res[0].value["sum"] == res[2].value["sum"] == 2.0


def job_severed(rank: int, world: int, port: int) -> dict:
    """Both processes live, but rank 0 cuts its links with rank 1. Views must stay agreed."""
    init_group(rank, world, port, pg_options=_opts())
    dist.barrier()
    rt = dist.group.WORLD.runtime
    if rank == 0:
        rt.fail_peer(1, "test severed the link")
    outcome = "ok"
    try:
        _sum_again(rank)
        _sum_again(rank)
    except elasticpg.GroupStateError:
        outcome = "GroupStateError"
    dist.barrier() if outcome == "ok" else None
    # let every rank settle on the latest decided view before comparing
    elasticpg.sync_after_failure()
    out = {"outcome": outcome, "epoch": elasticpg.get_current_epoch(),
           "mask": elasticpg.get_active_ranks().tolist()}
    # nobody leaves (destroying its group is a graceful leave, which would rightly produce
    # yet another view at the slower ranks) before every rank has taken its snapshot
    store = _store()
    if store.add("snapshots", 1) == world:
        store.set("all-snapshots", "1")
    store.wait(["all-snapshots"], timedelta(seconds=30))
    return out


def test_severed_link_between_live_ranks_keeps_views_agreed(pool):
    res = pool.run(job_severed, timeout=60)
    masks = {tuple(v["mask"]) for v in res}
    epochs = {v["epoch"] for v in res}
    assert len(masks) == 1 and len(epochs) == 1, res
    mask = masks.pop()
    assert sum(mask) == 3 and (mask[0] == 0 or mask[1] == 0), res
    out = mask.index(0)
    assert res[out]["outcome"] == "GroupStateError", res
    assert all(v["outcome"] == "ok" for r, v in enumerate(res) if r != out), res


def _survivors_all_reduce_after_rank1_exits(rank: int, world: int, port: int,
                                            **opts) -> tuple[torch.Tensor, object]:
    """Rank 1 exits after a barrier; the others all_reduce their rank ids (async Work)."""
    init_group(rank, world, port, pg_options=_opts(**opts))
    dist.barrier()
    if rank == 1:
        os._exit(0)
    t = torch.tensor([float(rank)])
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    return t, work


def job_mode_b(rank: int, world: int, port: int) -> dict:
    t, work = _survivors_all_reduce_after_rank1_exits(rank, world, port,
                                                      auto_sync_on_failure=False)
    before = elasticpg.get_active_ranks().tolist()
    first = elasticpg.sync_after_failure()
    second = elasticpg.sync_after_failure()
    return {"sum": t.item(), "ok": elasticpg.get_local_success(work), "before": before,
            "after": elasticpg.get_active_ranks().tolist(), "first": first.status.value,
            "second": second.status.value, "then": _sum_again(rank)}


def test_mode_b_returns_at_once_and_sync_applies(pool):
    res = pool.run_raw(job_mode_b, timeout=60)
    for r in (0, 2, 3):
        v = res[r].value
        assert res[r].status == "ok", v
        assert v["sum"] == 5.0 and v["ok"] is False, v
        assert v["before"] == [1, 1, 1, 1], v
        assert v["after"] == [1, 0, 1, 1], v
        assert v["first"] == "Reconciled" and v["second"] == "NoPending", v
        assert v["then"] == 5.0, v


def job_mode_c(rank: int, world: int, port: int) -> dict:
    t, work = _survivors_all_reduce_after_rank1_exits(rank, world, port,
                                                      auto_deactivate_on_failure=False,
                                                      auto_sync_on_failure=False)
    hint = elasticpg.get_failed_ranks_hint(work, 4)
    unchanged = elasticpg.get_active_ranks().tolist()
    # the framework reads the hints and removes the failed rank, collectively
    elasticpg.deactivate_ranks(None, hint.nonzero().flatten().tolist())
    out = {"sum": t.item(), "hint": hint.tolist(), "unchanged": unchanged,
           "mask": elasticpg.get_active_ranks().tolist(), "epoch": elasticpg.get_current_epoch()}
    # planned removal of a live rank: rank 3 is deactivated and gets a clear error
    elasticpg.deactivate_ranks(None, [3])
    try:
        out["next"] = _sum_again(rank)
    except elasticpg.GroupStateError:
        out["next"] = "GroupStateError"
    return out


def test_mode_c_framework_managed_and_deactivated_live_rank(pool):
    res = pool.run_raw(job_mode_c, timeout=60)
    for r in (0, 2, 3):
        v = res[r].value
        assert res[r].status == "ok", v
        assert v["sum"] == 5.0 and v["hint"] == [0, 1, 0, 0], v
        assert v["unchanged"] == [1, 1, 1, 1], v
        assert v["mask"] == [1, 0, 1, 1] and v["epoch"] == 1, v
    assert res[0].value["next"] == res[2].value["next"] == 2.0
    assert res[3].value["next"] == "GroupStateError"
