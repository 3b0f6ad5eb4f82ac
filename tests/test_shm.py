"""The same-host shared-memory data plane (the default; ELASTICPG_TRANSPORT=tcp turns it off):
windowed for large messages, failure detection as fast as over TCP, no leaks, an idle rank stays
idle. The chaos test runs over both transports.
"""

from __future__ import annotations

import gc
import os
import signal
import threading
import time

import pytest
import torch
import torch.distributed as dist

import elasticpg
from elasticpg.transport import memcopy

from .harness import init_group


def _runtime():
    return dist.group.WORLD.runtime


def _memfds() -> int:
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "memfd:elasticpg" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


def _cpu_seconds() -> float:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def job_windows(rank: int, world: int, port: int, streaming: bool) -> dict:
    """Tiny windows force every collective through several rounds and both buffers;
    `streaming` copies every output with the streaming-store helper (normally only outputs of
    several MiB), at the unaligned offsets these sizes give."""
    saved = memcopy.STREAM_FROM
    memcopy.STREAM_FROM = 0 if streaming else saved
    try:
        return _windows(rank, world, port)
    finally:
        memcopy.STREAM_FROM = saved


def _windows(rank: int, world: int, port: int) -> dict:
    init_group(rank, world, port, env={"ELASTICPG_SHM_WINDOW": "4096"})
    rt = _runtime()
    out = {}
    for n in (3, 1000, 70_000):  # numpy path, direct torch path, reduce-scatter + all-gather
        t = torch.arange(n, dtype=torch.float64) * (rank + 1)
        dist.all_reduce(t)
        want = torch.arange(n, dtype=torch.float64) * (world * (world + 1) // 2)
        out[f"ar{n}"] = bool(torch.equal(t, want))
    g = torch.empty(world * 3000, dtype=torch.int32)
    dist.all_gather_into_tensor(g, torch.full((3000,), rank, dtype=torch.int32))
    out["ag"] = g.view(world, -1).unique(dim=1).flatten().tolist() == list(range(world))
    b = torch.arange(5000) if rank == world - 1 else torch.zeros(5000, dtype=torch.int64)
    dist.broadcast(b, src=world - 1)
    out["bc"] = bool(torch.equal(b, torch.arange(5000)))
    rs = torch.empty(2000)
    dist.reduce_scatter_tensor(rs, torch.arange(world * 2000, dtype=torch.float32))
    out["rs"] = bool(torch.equal(rs, torch.arange(rank * 2000, (rank + 1) * 2000) * world * 1.0))
    splits = [1000 * (rank + 1)] * world  # uneven: rank r sends 1000 * (r + 1) rows to each
    inp = torch.full((sum(splits),), rank, dtype=torch.int16)
    recv = [1000 * (p + 1) for p in range(world)]
    o = torch.empty(sum(recv), dtype=torch.int16)
    dist.all_to_all_single(o, inp, recv, splits)
    out["a2a"] = o.tolist() == sum(([p] * recv[p] for p in range(world)), [])
    outs = [torch.empty(777 * (p + 1), dtype=torch.uint8) for p in range(world)]
    dist.all_to_all(outs, [torch.full((777 * (rank + 1),), 10 * rank + p, dtype=torch.uint8)
                           for p in range(world)])
    out["a2a_list"] = all(bool((o == 10 * p + rank).all()) for p, o in enumerate(outs))
    gathered = [torch.empty(2500, dtype=torch.int16) for _ in range(world)] if rank == 1 else None
    dist.gather(torch.full((2500,), rank, dtype=torch.int16), gathered, dst=1)
    out["gather"] = rank != 1 or all(bool((g == p).all()) for p, g in enumerate(gathered))
    sc = torch.empty(3001, dtype=torch.uint8)
    dist.scatter(sc, [torch.full((3001,), p, dtype=torch.uint8) for p in range(world)]
                 if rank == 0 else None, src=0)
    out["scatter"] = bool((sc == rank).all())
    dist.barrier()
    out["shm_peers"] = sorted(rt.shm._peers)
    return out


@pytest.mark.parametrize("streaming", [False, True])
@pytest.mark.parametrize("world", [4, 2])  # 2 ranks reduce in place, more reduce-scatter
def test_collectives_over_shm_in_many_windows(pool, world, streaming):
    for rank, v in enumerate(pool.run(job_windows, streaming, world=world, timeout=120)):
        assert v.pop("shm_peers") == [r for r in range(world) if r != rank], v
        assert all(v.values()), (rank, v)


def job_mixed_all_to_all_paths(rank: int, world: int, port: int) -> bool:
    """Rank 1 sends 50k int32 to rank 2 and 3 to everyone else: ranks 1 and 2 take the
    windowed path (rank 1's stream spans 4 windows of 64 KiB, its block for rank 3 in the
    last), ranks 0 and 3 the latency path. They must interoperate, round by round."""
    init_group(rank, world, port, env={"ELASTICPG_SHM_WINDOW": str(64 << 10)})

    def n(src: int, dst: int) -> int:
        return 50_000 if (src, dst) == (1, 2) else 3

    ok = True
    for step in range(3):
        splits = [n(rank, p) for p in range(world)]
        recv = [n(p, rank) for p in range(world)]
        inp = torch.cat([torch.full((n(rank, p),), step * 100 + rank * 10 + p,
                                    dtype=torch.int32) for p in range(world)])
        out = torch.empty(sum(recv), dtype=torch.int32)
        dist.all_to_all_single(out, inp, recv, splits)
        want = torch.cat([torch.full((n(p, rank),), step * 100 + p * 10 + rank,
                                     dtype=torch.int32) for p in range(world)])
        ok = ok and bool(torch.equal(out, want))
    dist.barrier()
    return ok


def test_all_to_all_latency_and_windowed_paths_interoperate(pool):
    assert pool.run(job_mixed_all_to_all_paths) == [True] * 4


def job_transport_choice(rank: int, world: int, port: int) -> dict:
    """Rank 0 opts out of shared memory: the default group's collectives must then all run
    over TCP (a decision every participant makes alike), a subgroup without rank 0 over shm."""
    init_group(rank, world, port, env={"ELASTICPG_TRANSPORT": "tcp"} if rank == 0 else {})
    t = torch.full((1000,), float(rank + 1))
    dist.all_reduce(t)
    g = [torch.empty(2) for _ in range(world)]
    dist.all_gather(g, torch.full((2,), float(rank)))
    sub = dist.new_group([1, 2, 3])
    s = torch.full((3,), float(rank))
    if rank != 0:
        dist.all_reduce(s, group=sub)
        dist.barrier(group=sub)
    dist.barrier()
    return {"sum": t.unique().tolist(), "gather": [x[0].item() for x in g],
            "sub": s.unique().tolist(), "shm": _runtime().shm.mine is not None,
            "mapped": len(_runtime().shm._peers),
            "sub_mapped": len(sub.runtime.shm._peers) if rank != 0 else -1}


def test_shm_is_the_default_and_tcp_an_opt_out(pool):
    for rank, v in enumerate(pool.run(job_transport_choice)):
        assert v["sum"] == [10.0] and v["gather"] == [0.0, 1.0, 2.0, 3.0], v
        assert v["shm"] is (rank != 0) and v["mapped"] == 0, v
        assert v["sub"] == ([0.0] if rank == 0 else [6.0]), v
        assert v["sub_mapped"] == (-1 if rank == 0 else 2), v


def job_killed_while_waiting(rank: int, world: int, port: int) -> dict:
    # heartbeats would take 5 s: a faster return proves the closed socket woke the shm wait
    init_group(rank, world, port, pg_options=elasticpg.Options(failure_timeout=5.0))
    dist.barrier()
    if rank == 3:
        time.sleep(0.3)  # the others are asleep on our shared memory by now
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.full((4,), float(rank + 1))
    start = time.monotonic()
    work = dist.all_reduce(t, async_op=True)
    work.wait()
    return {"s": time.monotonic() - start, "vals": t.unique().tolist(),
            "ok": elasticpg.get_local_success(work), "mask": elasticpg.get_active_ranks().tolist()}


def test_sigkilled_peer_detected_fast_over_shm(pool):
    res = pool.run_raw(job_killed_while_waiting, timeout=60)
    for r in (0, 1, 2):
        v = res[r].value
        assert res[r].status == "ok", v
        assert v["vals"] == [6.0] and v["ok"] is False and v["mask"] == [1, 1, 1, 0], v
        assert v["s"] < 2.5, v


def job_leaks_and_idle(rank: int, world: int, port: int) -> dict:
    gc.collect()
    fds_before = _memfds()
    init_group(rank, world, port)
    t = torch.ones(1 << 20)
    dist.all_reduce(t)
    dist.barrier()
    mapped = _memfds()
    cpu0, wall0 = _cpu_seconds(), time.monotonic()
    time.sleep(1.0)  # idle: no operation in flight
    idle = (_cpu_seconds() - cpu0) / (time.monotonic() - wall0)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    threads = [x.name for x in threading.enumerate() if x.name.startswith("elasticpg-")]
    return {"before": fds_before, "mapped": mapped, "after": _memfds(), "idle": idle,
            "threads": threads}


def test_no_leaks_after_destroy_and_idle_cpu(pool):
    for v in pool.run(job_leaks_and_idle):
        assert v["before"] == 0 and v["after"] == 0 and v["threads"] == [], v
        assert v["mapped"] >= 4, v  # our region and the three peers' mappings
        assert v["idle"] < 0.02, v


def test_window_size_from_the_environment(monkeypatch):
    from elasticpg.transport.shm import DEFAULT_WINDOW, window_bytes

    monkeypatch.delenv("ELASTICPG_SHM_WINDOW", raising=False)
    assert window_bytes() == DEFAULT_WINDOW
    monkeypatch.setenv("ELASTICPG_SHM_WINDOW", "10000")
    assert window_bytes() == 8192  # whole pages
    monkeypatch.setenv("ELASTICPG_SHM_WINDOW", "100")
    assert window_bytes() == 4096
    for bad in ("4M", "0", "-4096"):
        monkeypatch.setenv("ELASTICPG_SHM_WINDOW", bad)
        with pytest.raises(ValueError, match="ELASTICPG_SHM_WINDOW"):
            window_bytes()


# ---- the direct all_to_all (zero-copy receive) ----------------------------------------------
def _pattern(src: int, dst: int, nbytes: int) -> bytes:
    return bytes((src * 37 + dst * 11 + i) % 251 for i in range(nbytes))


def job_direct_alltoall_from_a_peer_that_dies(rank: int, world: int, port: int) -> dict:
    """Rank 1 posts its blocks and exits at once; rank 0 reads rank 1's block (a view of its
    window) only after the process is gone: the block is whole and intact() says so, since
    a dead process cannot write. Then the group goes on without it."""
    import select

    import numpy as np

    from elasticpg.collectives.shm_exchange import ShmOp
    from elasticpg.ep.exchange import DISPATCH_ROUND, Exchange

    from .test_ep import _client

    init_group(rank, world, port)
    ex = Exchange(_runtime())
    sizes = [0 if p == rank else 3000 + 100 * p for p in range(world)]
    dist.barrier()  # a serving group: the peers' regions are mapped by now

    def write(stream, offsets):
        for p, o in enumerate(offsets):
            if o >= 0:
                stream[o:o + sizes[p]] = np.frombuffer(_pattern(rank, p, sizes[p]), np.uint8)

    if rank == 1:
        _client(port).set("pid1", str(os.getpid()))
        post = ShmOp.post

        def post_then_die(self, k, *args, **kw):
            b = post(self, k, *args, **kw)
            os._exit(0)  # posted whole: its token is set
            return b

        ShmOp.post = post_then_die
    else:
        pid = int(_client(port).get("pid1"))
    got, failed = ex.alltoall_direct(DISPATCH_ROUND, tuple(range(world)), sizes, write, 10.0)
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        gone = True  # exited and reaped already
    else:
        try:
            gone = bool(select.select([fd], [], [], 10.0)[0])  # readable once it has exited
        finally:
            os.close(fd)
    peek = got.get(1)
    out = {"gone": gone, "failed": sorted(failed), "intact": peek is not None and peek.intact(),
           "whole": peek is not None and peek.data.tobytes() == _pattern(1, 0, 3000),
           "view": peek is not None and peek.data.base is not None and not
           peek.data.flags.owndata}
    _got, failed2 = ex.alltoall_direct(DISPATCH_ROUND, tuple(range(world)), sizes, write, 10.0)
    out["next_failed"] = sorted(failed2)
    return out


def test_a_direct_alltoall_view_of_a_dead_peer_is_whole(pool):
    res = pool.run_raw(job_direct_alltoall_from_a_peer_that_dies, world=2, timeout=60)
    assert res[1].status == "dead"
    v = res[0].value
    assert res[0].status == "ok", v
    assert v["gone"] and v["intact"] and v["whole"] and v["view"], v
    assert v["next_failed"] == [1], v


def test_a_view_is_not_intact_once_its_poster_rewrites_the_window():
    """The seqlock behind Peek.intact: a poster clears its token before it rewrites a buffer,
    so a reader that sees the token changed after reading drops what it read."""
    import numpy as np

    from elasticpg.collectives.shm_algorithms import Peek
    from elasticpg.transport.shm import TOK, Region

    region = Region.create(2, 4096)
    try:
        token = (7 << 20) | 1
        region.raw_bytes(0, 0, 64)[:] = 5
        region.ctl[TOK] = token
        peek = Peek(region.raw_bytes(0, 0, 64), region.ctl, TOK, token)
        assert peek.intact() and peek.data.tolist() == [5] * 64
        region.ctl[TOK] = 0  # what post() does first when it reuses the buffer
        region.raw_bytes(0, 0, 64)[:] = 6
        assert not peek.intact()
        region.ctl[TOK] = (9 << 20) | 1  # and a newer post is no better
        assert not peek.intact()
        assert Peek(np.zeros(3, np.uint8)).intact()  # a private copy is always intact
    finally:
        del peek
        region.close()


def job_direct_alltoall_windows(rank: int, world: int, port: int) -> list:
    """Blocks of very different sizes with a 4 KiB window: some streams fit in one window,
    others span many, so views turn into copies before window 1 is posted; every block
    arrives whole either way, over several rounds."""
    import numpy as np

    from elasticpg.ep.exchange import DISPATCH_ROUND, Exchange

    init_group(rank, world, port, env={"ELASTICPG_SHM_WINDOW": "4096"})
    ex = Exchange(_runtime())
    out = []
    for step, base in enumerate([10, 3000, 9000, 100]):
        sizes = [0 if p == rank else base * (rank + 1) + p for p in range(world)]

        def write(stream, offsets, sizes=sizes, step=step):
            for p, o in enumerate(offsets):
                if o >= 0:
                    stream[o:o + sizes[p]] = np.frombuffer(
                        _pattern(rank + step, p, sizes[p]), np.uint8)

        got, failed = ex.alltoall_direct(DISPATCH_ROUND, tuple(range(world)), sizes, write,
                                         10.0)
        out.append(not failed and sorted(got) == [p for p in range(world) if p != rank] and
                   all(got[p].intact() and got[p].data.tobytes() ==
                       _pattern(p + step, rank, base * (p + 1) + rank) for p in got))
    return out


def test_direct_alltoall_in_one_window_and_in_many(pool):
    for rank, v in enumerate(pool.run(job_direct_alltoall_windows, world=3, timeout=60)):
        assert all(v), (rank, v)
