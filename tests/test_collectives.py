"""SPEC scenario 1: 4 real processes; every collective and P2P gives the arithmetically expected
result for every dtype and reduce op, and async Works behave as torch documents.

Each job runs many cases inside the same processes and returns a list of failures, so a test
fails with every wrong case listed, and the suite pays process start-up once.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from elasticpg.core.dtypes import SUPPORTED_DTYPES

from .harness import init_group

W = 4
SKIP = {torch.complex32}  # torch's own view_as_real has no complex32 support in collectives
DTYPES = [d for d in SUPPORTED_DTYPES if d not in SKIP]
OPS = {
    "SUM": dist.ReduceOp.SUM, "AVG": dist.ReduceOp.AVG, "PRODUCT": dist.ReduceOp.PRODUCT,
    "MIN": dist.ReduceOp.MIN, "MAX": dist.ReduceOp.MAX, "BAND": dist.ReduceOp.BAND,
    "BOR": dist.ReduceOp.BOR, "BXOR": dist.ReduceOp.BXOR,
}


def _valid(op: str, dtype: torch.dtype) -> bool:
    integral = not (dtype.is_floating_point or dtype.is_complex)
    if op in ("BAND", "BOR", "BXOR"):
        return integral
    if op in ("MIN", "MAX"):
        return not dtype.is_complex
    if op == "PRODUCT" and dtype.is_complex:
        return False  # torch refuses complex PRODUCT before reaching any backend
    return True


def _input(rank: int, dtype: torch.dtype, n: int = 6) -> torch.Tensor:
    """Small exact values (1..3) that differ per rank and per element."""
    base = (torch.arange(n, dtype=torch.float64) + rank) % 3 + 1
    if dtype == torch.bool:
        return base.remainder(2) == 0
    if dtype.is_complex:
        return torch.complex(base, base - rank).to(dtype)
    return base.to(dtype)


def _reference(op: str, dtype: torch.dtype, world: int, n: int = 6) -> torch.Tensor:
    """The expected reduction, computed independently of elasticpg (float64 / python ints)."""
    xs = [_input(r, dtype, n) for r in range(world)]
    if dtype == torch.bool:
        acc = xs[0].clone()
        for x in xs[1:]:
            if op in ("SUM", "MAX", "BOR", "AVG"):
                acc = acc | x
            elif op in ("PRODUCT", "MIN", "BAND"):
                acc = acc & x
            else:
                acc = acc ^ x
        return acc
    integral = not (dtype.is_floating_point or dtype.is_complex)
    wide = torch.complex128 if dtype.is_complex else (torch.int64 if integral else torch.float64)
    v = [x.to(wide) for x in xs]
    acc = v[0].clone()
    for x in v[1:]:
        acc = {"SUM": lambda a, b: a + b, "AVG": lambda a, b: a + b,
               "PRODUCT": lambda a, b: a * b, "MIN": torch.minimum, "MAX": torch.maximum,
               "BAND": lambda a, b: a & b, "BOR": lambda a, b: a | b,
               "BXOR": lambda a, b: a ^ b}[op](acc, x)
    if op == "AVG":
        acc = torch.div(acc, world, rounding_mode="trunc") if integral else acc / world
    return acc.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point and a.dtype.itemsize == 1:
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def job_all_reduce_every_dtype_and_op(rank: int, world: int, port: int,
                                      transport: str) -> list[str]:
    # 4 KiB shared-memory windows: 6 elements take the latency path, 5000 the windowed one,
    # 70000 (of 4 bytes and more, with 4 ranks) reduce-scatter + all-gather
    init_group(rank, world, port, env={"ELASTICPG_TRANSPORT": transport,
                                       "ELASTICPG_SHM_WINDOW": "4096"})
    root = min(2, world - 1)
    bad = []
    for dtype, n in itertools.product(DTYPES, (6, 5000, 70_000)):
        for name, op in OPS.items():
            if not _valid(name, dtype):
                continue
            t = _input(rank, dtype, n)
            dist.all_reduce(t, op=op)
            want = _reference(name, dtype, world, n)
            if not _same(t, want):
                bad.append(f"all_reduce {name} {dtype} x{n}: got {t[:8].tolist()}... want "
                           f"{want[:8].tolist()}...")
            t = _input(rank, dtype, n)
            dist.reduce(t, dst=root, op=op)
            if rank == root and not _same(t, want):
                bad.append(f"reduce {name} {dtype} x{n}: got {t[:8].tolist()}... want "
                           f"{want[:8].tolist()}...")
            if rank != root and not _same(t, _input(rank, dtype, n)):
                bad.append(f"reduce {name} {dtype} x{n}: non-root tensor changed")
    # the last op is rooted: non-roots return first, and leaving (destroying the group) before
    # the root has run its part would rightly exclude them there
    dist.barrier()
    return bad


def job_data_movement_every_dtype(rank: int, world: int, port: int) -> list[str]:
    init_group(rank, world, port)
    bad: list[str] = []

    def check(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
        if not _same(got, want):
            bad.append(f"{what}: got {got.tolist()} want {want.tolist()}")

    for dtype in DTYPES:
        mine = _input(rank, dtype, 5)
        # broadcast from every root
        for root in range(world):
            t = mine.clone()
            dist.broadcast(t, src=root)
            check(f"broadcast root={root} {dtype}", t, _input(root, dtype, 5))
        # all_gather (list) and all_gather_into_tensor
        outs = [torch.zeros(5, dtype=dtype) for _ in range(world)]
        dist.all_gather(outs, mine)
        for r in range(world):
            check(f"all_gather[{r}] {dtype}", outs[r], _input(r, dtype, 5))
        flat = torch.zeros(world * 5, dtype=dtype)
        dist.all_gather_into_tensor(flat, mine)
        check(f"all_gather_into_tensor {dtype}", flat,
              torch.cat([_input(r, dtype, 5) for r in range(world)]))
        # all_to_all (list): rank r sends block (r, j) to rank j
        def block(src: int, dst: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return _input(src * world + dst, dtype, 3)
        ins = [block(rank, j) for j in range(world)]
        outs = [torch.zeros(3, dtype=dtype) for _ in range(world)]
        dist.all_to_all(outs, ins)
        for j in range(world):
            check(f"all_to_all from {j} {dtype}", outs[j], block(j, rank))
        # all_to_all_single, even and uneven splits
        inp = torch.cat(ins)
        out = torch.zeros(world * 3, dtype=dtype)
        dist.all_to_all_single(out, inp)
        check(f"all_to_all_single even {dtype}", out, torch.cat([block(j, rank)
                                                                 for j in range(world)]))
        # uneven: rank r sends (j + 1) rows to rank j; receives (r + 1) rows from each
        def rows(src: int, dst: int, dtype: torch.dtype = dtype) -> torch.Tensor:
            return _input(10 * src + dst, dtype, (dst + 1) * 2).reshape(dst + 1, 2)
        send = torch.cat([rows(rank, j) for j in range(world)])
        recv = torch.zeros(world * (rank + 1), 2, dtype=dtype)
        dist.all_to_all_single(recv, send, output_split_sizes=[rank + 1] * world,
                               input_split_sizes=[j + 1 for j in range(world)])
        check(f"all_to_all_single uneven {dtype}", recv,
              torch.cat([rows(j, rank) for j in range(world)]))
        # gather / scatter to and from a non-zero root
        root = 1
        gl = [torch.zeros(5, dtype=dtype) for _ in range(world)] if rank == root else None
        dist.gather(mine, gather_list=gl, dst=root)
        if rank == root:
            for r in range(world):
                check(f"gather[{r}] {dtype}", gl[r], _input(r, dtype, 5))
        sl = [_input(100 + r, dtype, 5) for r in range(world)] if rank == root else None
        t = torch.zeros(5, dtype=dtype)
        dist.scatter(t, scatter_list=sl, src=root)
        check(f"scatter {dtype}", t, _input(100 + rank, dtype, 5))
    dist.barrier()  # the last op is rooted (see job_all_reduce_every_dtype_and_op)
    return bad


def job_reduce_scatter(rank: int, world: int, port: int) -> list[str]:
    init_group(rank, world, port)
    bad = []
    for dtype in DTYPES:
        for name in ("SUM", "MAX", "AVG", "BXOR"):
            if not _valid(name, dtype):
                continue
            # chunk j of rank r is _input(r + 7 * j); result on rank j = reduce over r
            ins = [_input(rank + 7 * j, dtype, 4) for j in range(world)]
            xs = [[_input(r + 7 * j, dtype, 4) for j in range(world)] for r in range(world)]
            out = torch.zeros(4, dtype=dtype)
            dist.reduce_scatter(out, ins, op=OPS[name])
            out2 = torch.zeros(4, dtype=dtype)
            dist.reduce_scatter_tensor(out2, torch.cat(ins), op=OPS[name])
            # reference: reduce column `rank` over r, via the all_reduce reference machinery
            col = [xs[r][rank] for r in range(world)]
            want = _reduce_list(name, dtype, col)
            for what, got in (("reduce_scatter", out), ("reduce_scatter_tensor", out2)):
                if not _same(got, want):
                    bad.append(f"{what} {name} {dtype}: got {got.tolist()} want {want.tolist()}")
    return bad


def _reduce_list(op: str, dtype: torch.dtype, xs: list[torch.Tensor]) -> torch.Tensor:
    if dtype == torch.bool:
        acc = xs[0].clone()
        for x in xs[1:]:
            acc = (acc | x) if op in ("SUM", "MAX", "AVG") else (acc ^ x)
        return acc
    integral = not (dtype.is_floating_point or dtype.is_complex)
    wide = torch.complex128 if dtype.is_complex else (torch.int64 if integral else torch.float64)
    acc = xs[0].to(wide)
    for x in xs[1:]:
        x = x.to(wide)
        acc = {"SUM": acc + x, "AVG": acc + x, "BXOR": (acc ^ x) if integral else None,
               "MAX": torch.maximum(acc, x) if not dtype.is_complex else None}[op]
    if op == "AVG":
        acc = torch.div(acc, len(xs), rounding_mode="trunc") if integral else acc / len(xs)
    return acc.to(dtype)


def job_async_and_futures(rank: int, world: int, port: int) -> list[str]:
    init_group(rank, world, port)
    bad = []
    t = torch.full((3,), float(rank))
    work = dist.all_reduce(t, async_op=True)
    fut = work.get_future()
    work.wait()
    if not work.is_completed() or not work.is_success():
        bad.append("work not completed/successful after wait()")
    got = fut.wait()
    if not torch.equal(got[0], torch.full((3,), 6.0)):
        bad.append(f"future value {got}")
    # a chained future callback sees the result
    t2 = torch.ones(2)
    chained = dist.all_reduce(t2, async_op=True).get_future().then(lambda f: f.value()[0] * 2)
    if not torch.equal(chained.wait(), torch.full((2,), 8.0)):
        bad.append(f"then() gave {chained.wait()}")
    # barrier, async barrier, coalesced all_reduce
    dist.barrier()
    dist.barrier(async_op=True).wait()
    ts = [torch.full((2,), float(rank)), torch.full((3,), 1.0)]
    dist.all_reduce_coalesced(ts)
    if not (torch.equal(ts[0], torch.full((2,), 6.0))
            and torch.equal(ts[1], torch.full((3,), 4.0))):
        bad.append(f"all_reduce_coalesced gave {ts}")
    # zero-element and 0-dim tensors
    z = torch.empty(0)
    dist.all_reduce(z)
    s = torch.tensor(float(rank))
    dist.all_reduce(s)
    if s.item() != 6.0:
        bad.append(f"0-dim all_reduce gave {s}")
    # large tensor (several MB) exercises the big-payload path
    big = torch.full((1 << 20,), float(rank + 1))
    dist.all_reduce(big)
    if not torch.equal(big, torch.full((1 << 20,), 10.0)):
        bad.append("large all_reduce wrong")
    # parameters and tensors that require grad (broadcasting the initial weights, as DDP
    # does): communication is outside autograd, on the data in place, small and large
    for n in (5, 1 << 20):
        w = torch.nn.Parameter(torch.full((n,), float(rank)))
        dist.broadcast(w, src=2)
        g = torch.full((n,), float(rank), requires_grad=True)
        dist.all_reduce(g)
        out = torch.zeros(world * n)
        dist.all_gather_into_tensor(out, g)
        if not (torch.equal(w.detach(), torch.full((n,), 2.0)) and w.requires_grad
                and torch.equal(g.detach(), torch.full((n,), 6.0))
                and torch.equal(out, torch.full((world * n,), 6.0))):
            bad.append(f"collectives on tensors that require grad ({n} elements)")
    return bad


def job_float_specials(rank: int, world: int, port: int) -> list[str]:
    """Overflow to inf and NaNs reduce silently, as torch computes them: no warning shows, and
    nothing raises where warnings are errors or numpy is set to raise, on the latency path and
    the windowed one."""
    init_group(rank, world, port)
    bad = []

    def reduce_specials(n: int) -> None:
        big = torch.full((n,), 3e38)
        dist.all_reduce(big)
        nan = torch.full((n,), float("nan") if rank == 1 else float(rank))
        dist.all_reduce(nan, op=dist.ReduceOp.MIN)
        if not (big.isinf().all() and nan.isnan().all()):
            bad.append(f"{n} elements: {big[0].item()}, {nan[0].item()}")

    for n in (1, 2 << 20):  # 8 MiB: several windows, reduce-scatter + all-gather
        with warnings.catch_warnings(record=True) as shown:
            reduce_specials(n)
        bad.extend(f"{n} elements: warned {w.message}" for w in shown)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            reduce_specials(n)
        with np.errstate(all="raise"):
            reduce_specials(n)
    return bad


def job_p2p(rank: int, world: int, port: int) -> list[str]:
    init_group(rank, world, port)
    bad = []
    # ring: send to the right, receive from the left, with blocking calls ordered to not deadlock
    right, left = (rank + 1) % world, (rank - 1) % world
    out = torch.tensor([rank * 10.0])
    got = torch.zeros(1)
    if rank % 2 == 0:
        dist.send(out, right)
        dist.recv(got, left)
    else:
        dist.recv(got, left)
        dist.send(out, right)
    if got.item() != left * 10.0:
        bad.append(f"ring recv {got.item()} from {left}")
    # ordering: rank 0 sends 4 messages to rank 1 with the same tag; they arrive in order
    if rank == 0:
        for i in range(4):
            dist.send(torch.tensor([i], dtype=torch.int64), 1, tag=7)
    elif rank == 1:
        seen = []
        for _ in range(4):
            x = torch.zeros(1, dtype=torch.int64)
            dist.recv(x, 0, tag=7)
            seen.append(int(x.item()))
        if seen != [0, 1, 2, 3]:
            bad.append(f"messages out of order: {seen}")
    # two senders to one receiver: named sources, then ANY_SOURCE
    if rank in (1, 2):
        dist.send(torch.tensor([rank * 1.0]), 3, tag=1)
        dist.send(torch.tensor([rank * 2.0]), 3, tag=2)
    elif rank == 3:
        a, b = torch.zeros(1), torch.zeros(1)
        w2 = dist.irecv(b, src=2, tag=1)
        w1 = dist.irecv(a, src=1, tag=1)
        w1.wait()
        w2.wait()
        if (a.item(), b.item()) != (1.0, 2.0):
            bad.append(f"named sources gave {a.item()}, {b.item()}")
        vals = set()
        for _ in range(2):
            x = torch.zeros(1)
            src = dist.recv(x, tag=2)
            vals.add((src, x.item()))
        if vals != {(1, 2.0), (2, 4.0)}:
            bad.append(f"ANY_SOURCE gave {vals}")
    # batch_isend_irecv ring of two tags, posting receives before sends
    x = torch.zeros(2)
    ops = [dist.P2POp(dist.irecv, x, left, tag=5),
           dist.P2POp(dist.isend, torch.tensor([rank, -rank], dtype=torch.float32), right,
                      tag=5)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    if x.tolist() != [left, -left]:
        bad.append(f"batch_isend_irecv gave {x.tolist()}")
    # bfloat16 over P2P, and P2P interleaved with a collective
    if rank == 0:
        dist.isend(torch.tensor([1.5, 2.5], dtype=torch.bfloat16), 2)
    t = torch.ones(1)
    dist.all_reduce(t)
    if rank == 2:
        y = torch.zeros(2, dtype=torch.bfloat16)
        dist.recv(y, 0)
        if y.tolist() != [1.5, 2.5]:
            bad.append(f"bf16 p2p {y.tolist()}")
    dist.barrier()
    return bad


def job_subgroups(rank: int, world: int, port: int) -> list[str]:
    init_group(rank, world, port)
    bad = []
    evens = dist.new_group([0, 2], backend="elasticpg")
    odds = dist.new_group([1, 3], backend="elasticpg")
    mine = evens if rank % 2 == 0 else odds
    t = torch.tensor([float(rank)])
    dist.all_reduce(t, group=mine)
    want = 2.0 if rank % 2 == 0 else 4.0
    if t.item() != want:
        bad.append(f"subgroup all_reduce {t.item()} want {want}")
    # broadcast inside a subgroup uses the global rank of the root
    b = torch.tensor([float(rank)])
    dist.broadcast(b, src=2 if rank % 2 == 0 else 3, group=mine)
    if b.item() != (2.0 if rank % 2 == 0 else 3.0):
        bad.append(f"subgroup broadcast {b.item()}")
    # subgroups have names and can be destroyed on their own; the others keep working
    if not mine.group_name or mine.group_name == dist.group.WORLD.group_name:
        bad.append(f"group names {mine.group_name!r} {dist.group.WORLD.group_name!r}")
    # destroying a group is a graceful leave: wait until the partner is done with it too
    dist.barrier(group=mine)
    dist.destroy_process_group(mine)
    t = torch.tensor([1.0])
    dist.all_reduce(t)
    if t.item() != 4.0:
        bad.append(f"world all_reduce after destroying a subgroup: {t.item()}")
    # a gloo subgroup beside elasticpg ones in the same process
    g = dist.new_group([0, 1, 2, 3], backend="gloo")
    t = torch.tensor([1.0])
    dist.all_reduce(t, group=g)
    if t.item() != 4.0:
        bad.append("gloo subgroup")
    return bad


@pytest.mark.parametrize(("transport", "world"), [("shm", W), ("shm", 2), ("tcp", W)])
def test_all_reduce_and_reduce_every_dtype_and_op(pool, transport, world):
    assert pool.run(job_all_reduce_every_dtype_and_op, transport, world=world,
                    timeout=120) == [[]] * world


def test_data_movement_every_dtype(pool):
    assert pool.run(job_data_movement_every_dtype, timeout=120) == [[]] * W


def test_reduce_scatter_every_dtype(pool):
    assert pool.run(job_reduce_scatter, timeout=120) == [[]] * W


def test_async_works_futures_and_sizes(pool):
    assert pool.run(job_async_and_futures) == [[]] * W


def test_float_overflow_and_nan_are_silent(pool):
    assert pool.run(job_float_specials) == [[]] * W


def test_point_to_point(pool):
    assert pool.run(job_p2p) == [[]] * W


def test_subgroups(pool):
    assert pool.run(job_subgroups) == [[]] * W
