"""Contracts that code written for the reference (Mooncake PG) relies on, as elasticpg's own
API states them (issue 16): point-to-point operations complete when they lose their peer and
say so; a send completes only against a live receiver; a member may leave alone and be
replaced; get_world_size() is the extent of the active rank space; a failed member is not
"ready"; strided tensors are staged. Plus the compat layer's legacy defaults (spare slots, a
rank declaring a larger world joins as a scale-up). Real processes, real exits."""

from __future__ import annotations

import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

import elasticpg
from elasticpg.compat import mooncake as compat

from .harness import HOST, init_group, serving_steps


def _opts(**kw) -> elasticpg.Options:
    kw.setdefault("failure_timeout", 5.0)  # a hang bound only: exits are seen as closed links
    return elasticpg.Options(**kw)


def _sum(x: float, group=None) -> float:
    t = torch.tensor([float(x)])
    dist.all_reduce(t, group=group)
    return t.item()


def _store(port: int) -> dist.Store:
    return dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))


# ---- point-to-point with a peer that died ------------------------------------------------------

def job_p2p_lost_peer(rank: int, world: int, port: int) -> dict:
    init_group(rank, world, port, pg_options=_opts())
    store = _store(port)
    if rank == 1:
        store.set("pid", str(os.getpid()))
    dist.barrier()
    if rank == 1:
        os._exit(0)
    # a live process acknowledges what reaches it: until rank 1 has exited, its reader could
    # still take (and ack) the send below, which is right by contract, not what this tests
    _wait_gone(int(store.get("pid")))
    other = 2 - rank  # the other survivor: 0 <-> 2
    ops, peers = [], []
    for peer in (1, other):
        ops += [dist.P2POp(dist.isend, torch.tensor([float(rank)]), peer),
                dist.P2POp(dist.irecv, torch.zeros(1), peer)]
        peers += [peer, peer]
    works = dist.batch_isend_irecv(ops)
    for w in works:
        w.wait()  # returns: completion with a failure is not an exception
    out = {"ops": [(p, elasticpg.get_local_success(w), elasticpg.get_failed_ranks_hint(w).tolist())
                   for p, w in zip(peers, works, strict=True)],
           "got": ops[3].tensor.item()}
    out["mask"] = elasticpg.get_active_ranks().tolist()  # default mode: the hole is applied
    out["world"] = dist.get_world_size()
    out["sum"] = _sum(rank)
    return out


def test_p2p_ops_with_a_dead_peer_complete_and_name_it(pool):
    res = pool.run_raw(job_p2p_lost_peer, world=3, timeout=60)
    assert res[1].status == "dead"
    for r in (0, 2):
        v = res[r].value
        assert res[r].status == "ok", v
        for peer, ok, hint in v["ops"]:
            if peer == 1:
                assert not ok and hint == [0, 1, 0], v
            else:
                assert ok and hint == [0, 0, 0], v
        assert v["got"] == 2 - r and v["mask"] == [1, 0, 1], v
        assert v["world"] == 3 and v["sum"] == 2.0, v


def job_send_to_departed(rank: int, world: int, port: int) -> dict:
    init_group(rank, world, port, pg_options=_opts())
    store = _store(port)
    dist.barrier()
    if rank == 1:
        store.set("pid", str(os.getpid()))
        os._exit(0)
    _wait_gone(int(store.get("pid")))
    # a small message fits any socket buffer: only the receiver's acknowledgement tells
    work = dist.isend(torch.ones(4), 1)
    work.wait()
    out = {"ok": elasticpg.get_local_success(work),
           "hint": elasticpg.get_failed_ranks_hint(work).tolist()}
    dist.send(torch.ones(4), 1)  # blocking form: returns (the failure is the work's, as above)
    out["mask"] = elasticpg.get_active_ranks().tolist()
    return out


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Until process `pid` has exited (gone, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.01)  # the interval of a bounded wait for another process, not a sync
    raise AssertionError(f"process {pid} still running after {timeout:.0f}s")


def test_a_send_to_a_departed_rank_fails_locally(pool):
    res = pool.run_raw(job_send_to_departed, world=2, timeout=60)
    assert res[1].status == "dead"
    assert res[0].value == {"ok": False, "hint": [0, 1], "mask": [1, 0]}, res[0]


# ---- compat: a member leaves alone, destroys its group, and a replacement takes its slot --------

def job_leave_alone_then_replaced(rank: int, world: int, port: int) -> dict:
    store = _store(port)
    if rank == 3:  # the replacement for slot 2 (the highest: the extent shrinks, then grows)
        store.wait(["left"], timedelta(seconds=30))
        init_group(2, 3, port, pg_options=_opts(is_extension=True))
        elasticpg.join_group()
        return {"after": _sum(2), "world": dist.get_world_size()}
    init_group(rank, 3, port, pg_options=_opts())
    first = _sum(rank)
    if rank == 2:
        result = compat.deactivate_ranks(None, [2])  # nobody else calls this
        dist.destroy_process_group()
        store.set("left", "1")
        return {"first": first, "status": result.status.value}
    out = {"first": first, "without": _sum(rank), "world_without": dist.get_world_size(),
           "mask_without": elasticpg.get_active_ranks().tolist()}
    for _ in serving_steps():
        if elasticpg.get_peer_state(None, [2]) == [True]:
            out["status"] = elasticpg.recover_ranks(None, [2]).status.value
            break
        _sum(0)
    out["after"] = _sum(rank)
    out["world"] = dist.get_world_size()
    return out


def test_a_member_leaves_alone_and_is_replaced(pool):
    res = pool.run(job_leave_alone_then_replaced, world=4, timeout=90)
    assert res[2] == {"first": 3.0, "status": "Applied"}, res[2]
    assert res[3] == {"after": 3.0, "world": 3}, res[3]
    for v in res[:2]:
        assert v["first"] == 3.0 and v["without"] == 1.0, v
        assert v["world_without"] == 2 and v["mask_without"] == [1, 1, 0], v
        assert v["status"] == "Applied" and v["after"] == 3.0 and v["world"] == 3, v


# ---- manual mode: a failed member is not reported ready ----------------------------------------

def job_manual_mode_peer_state(rank: int, world: int, port: int) -> dict:
    init_group(rank, world, port, pg_options=_opts(auto_deactivate_on_failure=False,
                                                   auto_sync_on_failure=False))
    dist.barrier()
    if rank == 1:
        os._exit(0)
    work = dist.all_reduce(torch.tensor([1.0]), async_op=True)
    work.wait()
    out = {"ok": elasticpg.get_local_success(work),
           "mask": elasticpg.get_active_ranks().tolist()}
    out["sync"] = elasticpg.sync_after_failure().status.value
    out["ready"] = elasticpg.get_peer_state(None, [0, 1, 2])
    elasticpg.deactivate_ranks(None, [1])
    out["mask_after"] = elasticpg.get_active_ranks().tolist()
    out["sum"] = _sum(1)
    return out


def test_a_failed_member_is_not_ready_in_manual_mode(pool):
    res = pool.run_raw(job_manual_mode_peer_state, world=3, timeout=60)
    for r in (0, 2):
        v = res[r].value
        assert res[r].status == "ok", v
        assert not v["ok"] and v["mask"] == [1, 1, 1], v  # mode (c): membership untouched
        assert v["sync"] in ("Reconciled", "NoPending"), v
        assert v["ready"] == [True, False, True], v
        assert v["mask_after"] == [1, 0, 1] and v["sum"] == 2.0, v


# ---- strided tensors ---------------------------------------------------------------------------

def job_strided(rank: int, world: int, port: int) -> dict:
    init_group(rank, world, port, pg_options=_opts())
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3) * (rank + 1)
    t = base.t()  # a transposed view
    dist.all_reduce(t)
    gathered = torch.full((2, 4), -1.0)
    dist.all_gather([gathered[:, 0], gathered[:, 2]], torch.tensor([rank, 10.0 + rank]))
    inbox = torch.zeros(6)
    if rank == 0:
        dist.send(torch.tensor([7.0, 8.0, 9.0]), 1)
    else:
        dist.recv(inbox[::2], 0)
    return {"reduced": base.tolist(), "gathered": gathered.tolist(), "inbox": inbox.tolist()}


def test_strided_tensors_are_staged(pool):
    res = pool.run(job_strided, world=2, timeout=60)
    expect = (torch.arange(6, dtype=torch.float32).reshape(2, 3) * 3).tolist()
    for v in res:
        assert v["reduced"] == expect, v
        assert v["gathered"] == [[0, -1, 1, -1], [10, -1, 11, -1]], v
    assert res[1]["inbox"] == [7, 0, 8, 0, 9, 0], res[1]


# ---- compat: a group without pg_options has spare slots; a larger declared world scales up ----

def job_legacy_scale_up(rank: int, world: int, port: int) -> dict:
    compat.register_backend()
    from elasticpg.compat.mooncake import extend_group_size_to, get_active_ranks

    store = _store(port)
    if rank >= 2:  # new processes declaring world 4, without any option (nor is_extension)
        store.wait(["extend"], timedelta(seconds=30))
        init_group(rank, 4, port, backend="mooncake-cpu")
        return {"sum": _sum(rank + 1), "world": dist.get_world_size()}
    init_group(rank, 2, port, backend="mooncake-cpu")
    out = {"before": _sum(rank + 1), "world_before": dist.get_world_size(),
           "slots": get_active_ranks(dist.group.WORLD).numel()}
    store.set("extend", "1")
    out["status"] = extend_group_size_to(dist.group.WORLD, 4).status.value
    out["sum"] = _sum(rank + 1)
    out["world"] = dist.get_world_size()
    return out


def test_compat_legacy_scale_up_into_default_spare_slots(pool):
    res = pool.run(job_legacy_scale_up, world=4, timeout=60)
    for v in res[:2]:
        assert v["before"] == 3.0 and v["world_before"] == 2, v
        assert v["slots"] == compat.LEGACY_CAPACITY and v["status"] == "Applied", v
    for v in res:
        assert v["sum"] == 10.0 and v["world"] == 4, v
