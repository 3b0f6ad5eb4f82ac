"""Bad input gets a clear exception at the caller, on every rank involved, never a hang."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import elasticpg

from .harness import HOST, init_group
from .harness import error_name as _err


def job_mismatch(rank: int, world: int, port: int, case: str) -> tuple[str, str]:
    """Run one mismatched call, then a barrier; report what each raised."""
    init_group(rank, world, port, timeout=20)
    if case == "numel":
        first = lambda: dist.all_reduce(torch.ones(4 if rank == 1 else 3))
    elif case == "dtype":
        first = lambda: dist.all_reduce(torch.ones(3, dtype=torch.float64 if rank == 2
                                                   else torch.float32))
    elif case == "op":
        first = lambda: dist.all_reduce(torch.ones(3), op=dist.ReduceOp.MAX if rank == 0
                                        else dist.ReduceOp.SUM)
    elif case == "kind":
        first = lambda: (dist.broadcast(torch.ones(3), src=0) if rank == 0
                         else dist.all_reduce(torch.ones(3)))
    elif case == "root":
        first = lambda: dist.broadcast(torch.ones(3), src=1 if rank == 3 else 0)
    else:
        raise AssertionError(case)
    return _err(first), _err(dist.barrier)


@pytest.mark.parametrize("case", ["numel", "dtype", "op", "kind", "root"])
def test_mismatched_calls_raise_on_every_rank(pool, case):
    results = pool.run(job_mismatch, case, timeout=60)
    for rank, (first, then) in enumerate(results):
        # every rank learns: either from the call itself, or (a rank whose part finished
        # before anyone could object, e.g. a broadcast root) from its next call
        assert first == "CollectiveMismatchError" or then in (
            "GroupStateError", "CollectiveMismatchError"), (rank, results)
        assert then != "ok", (rank, results)
    assert any(first == "CollectiveMismatchError" for first, _ in results)


def job_local_errors(rank: int, world: int, port: int) -> dict[str, str]:
    init_group(rank, world, port)
    out = {}
    nc = torch.ones(4, 4).t()
    out["non_contiguous"] = _err(lambda: dist.all_reduce(nc))
    out["bad_dst"] = _err(lambda: dist.send(torch.ones(1), dst=99))
    out["bitwise_float"] = _err(lambda: dist.all_reduce(torch.ones(2),
                                                        op=dist.ReduceOp.BAND))
    out["bad_root"] = _err(lambda: dist.broadcast(torch.ones(1), src=7))
    out["gather_list_len"] = _err(lambda: dist.all_gather([torch.zeros(1)] * 3, torch.ones(1)))
    out["gather_dtype"] = _err(lambda: dist.all_gather([torch.zeros(1, dtype=torch.int32)] * 4,
                                                       torch.ones(1)))
    out["agit_size"] = _err(lambda: dist.all_gather_into_tensor(torch.zeros(5), torch.ones(2)))
    out["a2a_splits"] = _err(lambda: dist.all_to_all_single(
        torch.zeros(4), torch.zeros(4), input_split_sizes=[1, 1, 1, 2]))
    out["a2a_uneven_default"] = _err(lambda: dist.all_to_all_single(torch.zeros(5),
                                                                    torch.zeros(5)))
    out["bad_pg_options"] = "n/a"
    # the group still works after all those were rejected locally
    t = torch.ones(1)
    dist.all_reduce(t)
    out["still_works"] = str(t.item())
    # recv with a mismatched size fails that Work clearly
    if rank == 0:
        dist.send(torch.ones(3), 1)
    if rank == 1:
        out["recv_size"] = _err(lambda: dist.recv(torch.zeros(2), 0))
    dist.barrier()
    pg = dist.group.WORLD
    dist.destroy_process_group()
    out["after_destroy"] = _err(lambda: pg.allreduce([torch.ones(1)]))
    return out


def test_local_errors_are_clear_and_harmless(pool):
    results = pool.run(job_local_errors)
    for rank, out in enumerate(results):
        assert out["non_contiguous"] == "ok"  # staged through a dense copy
        assert out["bad_dst"] in ("ValueError",), out
        assert out["bitwise_float"] == "ValueError"
        assert out["bad_root"] == "ValueError"
        assert out["gather_list_len"] == "ValueError"
        assert out["gather_dtype"] == "ValueError"
        assert out["agit_size"] == "ValueError"
        assert out["a2a_splits"] == "ValueError"
        assert out["a2a_uneven_default"] == "ValueError"
        assert out["still_works"] == "4.0"
        assert out["after_destroy"] == "GroupStateError"
        if rank == 1:
            assert out["recv_size"] == "ElasticPGError"


def job_timeout(rank: int, world: int, port: int) -> str:
    """Rank 1 stays alive but never calls the collective: rank 0 times out within the bound."""
    init_group(rank, world, port, timeout=2)
    store = dist.distributed_c10d._get_default_store()
    if rank == 1:
        store.wait(["rank0-done"], timedelta(seconds=20))
        return "skipped"
    res = _err(lambda: dist.all_reduce(torch.ones(1)))
    store.set("rank0-done", "1")
    return res


def test_collective_wait_is_bounded(pool):
    res = pool.run(job_timeout, world=2, timeout=30)
    assert res == ["OperationTimeoutError", "skipped"]


def job_bad_options(rank: int, world: int, port: int) -> str:
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=10))
    opts = elasticpg.Options(auto_deactivate_on_failure=False, auto_sync_on_failure=True)
    return _err(lambda: dist.init_process_group("elasticpg", store=store, rank=rank,
                                                world_size=world, pg_options=opts))


def test_invalid_mode_combination_rejected(pool):
    assert pool.run(job_bad_options, world=1) == ["ValueError"]


def job_forged_peer(rank: int, world: int, port: int) -> dict:
    """A process without the group secret cannot inject data into the group."""
    import socket

    init_group(rank, world, port)
    host, p, _ = dist.group.WORLD.runtime.control.endpoint(1 - rank)
    res = {}
    if rank == 0:
        with socket.create_connection((host, p), timeout=5) as s:
            s.recv(16)
            # hello (magic, rank 1, incarnation 0), a made-up proof, our challenge
            s.sendall(b"EPG2" + b"\x01\x00\x00\x00" + b"\x00" * 8 + b"\x00" * 32 + b"\x00" * 16)
            s.settimeout(5)
            res["forged"] = s.recv(1)  # b"" = closed without acknowledging
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    res["sum"] = t.item()
    return res


def test_unauthenticated_connection_is_rejected(pool):
    res = pool.run(job_forged_peer, world=2)
    assert res[0]["forged"] == b""
    assert res[0]["sum"] == res[1]["sum"] == 3.0
