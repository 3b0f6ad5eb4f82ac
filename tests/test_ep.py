"""SPEC scenario 7: elasticpg.ep dispatch/combine against a dense single-process reference,
with real processes over the real data planes: routing with -1 selections, uneven token
counts, a token that picks one expert twice, several steps, bf16/fp32/fp8; a rank that dies
between dispatch and combine, one that dies inside a dispatch, and a recovered rank."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from elasticpg.ep import layout as lay

from .harness import error_name, init_group

HIDDEN, N, EXPERTS, TOPK = 256, 16, 8, 3


def expert_fn(v: torch.Tensor, e: int) -> torch.Tensor:
    return v * (0.1 * e + 1)


def step_inputs(rank: int, step: int, dtype: torch.dtype, hidden: int = HIDDEN, n: int = N,
                experts: int = EXPERTS, k: int = TOPK):
    """Rank `rank`'s tokens, routing and weights at `step`: the same on every process, so each
    can compute the dense reference for its own tokens."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    t = int(torch.randint(1, n + 1, (1,), generator=g))  # uneven, never more than N
    x = torch.randn(t, hidden, generator=g).to(dtype)
    idx = torch.randint(-1, experts, (t, k), generator=g)  # -1: masked selections
    if t > 1:
        idx[0, 1] = idx[0, 0] = 3  # a token that picks the same expert twice
    w = torch.rand(t, k, generator=g)
    return x, idx, w


def run_experts(buf, recv, recv_count, rank: int, experts: int, fp8: bool) -> torch.Tensor:
    local = experts // buf.group_size
    if fp8:
        data, scales = recv
        vals = lay.dequantize_fp8(data, scales)
    else:
        vals = recv.float()
    out = torch.empty(vals.shape, dtype=torch.bfloat16 if fp8 else recv.dtype)
    for lx in range(local):
        c = int(recv_count[lx])
        out[lx, :c] = expert_fn(vals[lx, :c], rank * local + lx).to(out.dtype)
    return out


def ep_step(buf, rank: int, world: int, step: int, dtype, fp8: bool, active, dead=frozenset(),
            before_combine=None):
    """One dispatch -> experts -> combine; (combined, dense reference without `dead`)."""
    x, idx, w = step_inputs(rank, step, dtype)
    recv, count, handle, event, hook = buf.dispatch(x, idx, active, N, EXPERTS, -1,
                                                    use_fp8=fp8)
    event.current_stream_wait()
    hook()
    if before_combine is not None:
        before_combine()
    y = run_experts(buf, recv, count, rank, EXPERTS, fp8)
    combined, _ev, _hook = buf.combine(y, idx, w, active, -1, handle)
    xs, idxs, ws = zip(*(step_inputs(r, step, dtype) for r in range(world)), strict=True)
    ref = lay.dense_reference(list(xs), list(idxs), list(ws), EXPERTS, world, expert_fn, dead)
    return combined, ref[rank], x, idx


TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, "fp8": 1.5e-1}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool(torch.isfinite(a).all()) and \
        float((a.float() - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def layout_problems(rank: int, world: int, step: int, dtype, recv, count, handle) -> list:
    """Every expert's rows are exactly its (source, token) pairs, grouped by source rank then
    in token order, each carrying its token's data; src_info and layout_range say so."""
    src_info, layout_range, n, hidden, experts = handle
    local = experts // world
    problems = []
    for lx in range(local):
        e = rank * local + lx
        want = []
        for s in range(world):
            x, idx, _w = step_inputs(s, step, dtype)
            toks = [t for t in range(x.shape[0]) if e in idx[t].tolist()]
            begin = len(want)
            want += [(s, t, x[t]) for t in toks]
            if int(layout_range[lx, s]) != (begin << 32 | len(toks)):
                problems.append(f"layout_range[{lx},{s}]")
        if int(count[lx]) != len(want):
            problems.append(f"recv_count[{lx}] {int(count[lx])} != {len(want)}")
            continue
        for row, (_s, t, xt) in enumerate(want):
            if int(src_info[lx, row]) != t or not torch.equal(recv[lx, row], xt):
                problems.append(f"expert {e} row {row}")
    return problems


def job_dense(rank: int, world: int, port: int) -> list:
    from elasticpg.ep import Buffer

    init_group(rank, world, port)
    buf = Buffer(dist.group.WORLD, Buffer.get_ep_buffer_size_hint(N, HIDDEN, world, EXPERTS))
    results = []
    for step, (dtype, fp8) in enumerate([(torch.float32, False), (torch.bfloat16, False),
                                         (torch.bfloat16, True), (torch.float32, False)] * 2):
        active = torch.ones(world, dtype=torch.int32)
        x, idx, _w = step_inputs(rank, step, dtype)
        recv, count, handle, _e, _h = buf.dispatch(x, idx, active, N, EXPERTS, -1,
                                                   use_fp8=fp8)
        problems = [] if fp8 else layout_problems(rank, world, step, dtype, recv, count, handle)
        combined, ref, _x, _ = ep_step(buf, rank, world, step, dtype, fp8, active)
        results.append((step, _close(combined, ref, TOL["fp8" if fp8 else dtype]),
                        active.tolist(), combined.dtype == dtype, problems))
    return results


@pytest.mark.parametrize("world", [2, 4])
def test_dispatch_combine_equal_the_dense_reference(pool, world):
    for rank_res in pool.run(job_dense, world=world, timeout=60):
        for step, ok, active, dtype_ok, problems in rank_res:
            assert ok, f"step {step} differs from the dense reference"
            assert active == [1] * world and dtype_ok and not problems, (step, problems)
