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

from .harness import error_name, init_group, only_victim_died

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


def job_dense(rank: int, world: int, port: int, transport: str = "shm") -> list:
    from elasticpg.ep import Buffer

    env = {"tcp": {"ELASTICPG_TRANSPORT": "tcp"},
           # 16 KiB windows: some ranks' blocks fit in one window (read in place), others
           # span several (copied out window by window), in the same call
           "shm-16k": {"ELASTICPG_SHM_WINDOW": "16384"}}.get(transport, {})
    init_group(rank, world, port, env=env)
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
    results.append(zero_copy_step(buf, rank, world))
    return results


def zero_copy_step(buf, rank: int, world: int) -> tuple:
    """combine(zero_copy=True) reads the expert outputs written into get_next_combine_buffer;
    async_finish / return_recv_hook give an event and a hook that are harmless on CPU; `out`
    receives the result."""
    x, idx, w = step_inputs(rank, 9, torch.bfloat16)
    active = torch.ones(world, dtype=torch.int32)
    recv, count, handle, event, hook = buf.dispatch(x, idx, active, N, EXPERTS, -1,
                                                    use_fp8=False, async_finish=True,
                                                    return_recv_hook=True)
    hook()
    with event:
        event.current_stream_wait()
    dest = buf.get_next_combine_buffer(handle)
    dest[:] = run_experts(buf, recv, count, rank, EXPERTS, False)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    combined, ev, hook2 = buf.combine(None, idx, w, active, -1, handle, zero_copy=True,
                                      async_finish=True, return_recv_hook=True, out=out)
    hook2()
    ev.current_stream_wait()
    xs, idxs, ws = zip(*(step_inputs(r, 9, torch.bfloat16) for r in range(world)), strict=True)
    ref = lay.dense_reference(list(xs), list(idxs), list(ws), EXPERTS, world, expert_fn)
    return ("zero_copy", _close(combined, ref[rank], TOL[torch.bfloat16]), active.tolist(),
            combined is out, [])


@pytest.mark.parametrize("world, transport", [(2, "shm"), (4, "shm"), (2, "tcp"),
                                              (4, "shm-16k")])
def test_dispatch_combine_equal_the_dense_reference(pool, world, transport):
    if EXPERTS % world:
        pytest.skip("needs num_experts divisible by the ranks")
    for rank_res in pool.run(job_dense, transport, world=world, timeout=60):
        for step, ok, active, dtype_ok, problems in rank_res:
            assert ok, f"step {step} differs from the dense reference"
            assert active == [1] * world and dtype_ok and not problems, (step, problems)


# ---- failures -----------------------------------------------------------------------------------
def _buffer(rank: int, world: int, port: int, **init):
    from elasticpg.ep import Buffer

    init_group(rank, world, port, **init)
    return Buffer(dist.group.WORLD)


def _steps(buf, rank, world, first, count, dead, active, dtype=torch.float32):
    """Steps first..first+count-1 with `dead`'s experts gone; whether each matched."""
    out = []
    for step in range(first, first + count):
        combined, ref, _x, _ = ep_step(buf, rank, world, step, dtype, False, active, dead)
        out.append(_close(combined, ref, TOL[dtype]))
    return out


def job_dies_between_dispatch_and_combine(rank: int, world: int, port: int) -> dict:
    buf = _buffer(rank, world, port)
    active = torch.ones(world, dtype=torch.int32)
    ok = _steps(buf, rank, world, 0, 2, frozenset(), active)

    def victim_exits():
        if rank == 3:
            os._exit(0)  # after its dispatch, before its combine

    combined, ref, _x, _ = ep_step(buf, rank, world, 2, torch.float32, False, active,
                                   frozenset({3}), before_combine=victim_exits)
    ok.append(_close(combined, ref, TOL[torch.float32]))
    after = active.tolist()
    ok += _steps(buf, rank, world, 3, 3, frozenset({3}), active)
    return {"ok": ok, "active": after, "mask": dist.get_world_size()}


def test_a_rank_that_dies_between_dispatch_and_combine(pool):
    res = pool.run_raw(job_dies_between_dispatch_and_combine, world=4, timeout=90)
    assert res[3].status == "dead"
    for r in (0, 1, 2):
        assert res[r].status == "ok", res[r].value
        v = res[r].value
        assert all(v["ok"]), v
        assert v["active"] == [1, 1, 1, 0], v


def job_window_rewritten_while_read(rank: int, world: int, port: int) -> dict:
    """Rank 0 finds every peer's dispatch window rewritten after it read it (Peek.intact()
    false: what happens when a peer that counted rank 0 out has moved on): none of those rows
    count, so rank 0's result is its own experts' only, and the peers, which get no answers
    from rank 0 for the rows they sent it, count rank 0's experts out."""
    from elasticpg.collectives.shm_algorithms import Peek

    buf = _buffer(rank, world, port)
    active = torch.ones(world, dtype=torch.int32)
    ok = _steps(buf, rank, world, 0, 1, frozenset(), active)
    intact = Peek.intact
    if rank == 0:
        Peek.intact = lambda self: False

    def restore():
        Peek.intact = intact

    dead = frozenset(range(1, world)) if rank == 0 else frozenset({0})
    combined, ref, _x, _ = ep_step(buf, rank, world, 1, torch.float32, False, active, dead,
                                   before_combine=restore)
    ok.append(_close(combined, ref, TOL[torch.float32]))
    return {"ok": ok, "active": active.tolist()}


def test_a_window_rewritten_while_read_contributes_no_rows(pool):
    res = pool.run(job_window_rewritten_while_read, world=4, timeout=60)
    assert all(res[0]["ok"]) and res[0]["active"] == [1, 0, 0, 0], res[0]
    for r in (1, 2, 3):
        assert all(res[r]["ok"]) and res[r]["active"] == [0, 1, 1, 1], res[r]


def job_dies_inside_a_dispatch(rank: int, world: int, port: int) -> dict:
    """Rank 2 dies after posting the first window of its dispatch data (a 4 KiB window, so
    its rows span several): the others hold part of its rows, and must use none of them."""
    from elasticpg.collectives.shm_exchange import ShmOp
    from elasticpg.ep.exchange import DISPATCH_ROUND

    buf = _buffer(rank, world, port, env={"ELASTICPG_SHM_WINDOW": "4096"})
    active = torch.ones(world, dtype=torch.int32)
    ok = _steps(buf, rank, world, 0, 1, frozenset(), active)
    if rank == 2:
        post = ShmOp.post

        def post_then_die(self, k, *args, **kw):
            if self.ctx.spec.root == DISPATCH_ROUND and k == 1:
                os._exit(0)
            return post(self, k, *args, **kw)

        ShmOp.post = post_then_die
    ok += _steps(buf, rank, world, 1, 4, frozenset({2}), active)
    return {"ok": ok, "active": active.tolist()}


def test_a_rank_that_dies_inside_a_dispatch(pool):
    res = pool.run_raw(job_dies_inside_a_dispatch, world=4, timeout=90)
    assert res[2].status == "dead"
    for r in (0, 1, 3):
        assert res[r].status == "ok", res[r].value
        assert all(res[r].value["ok"]) and res[r].value["active"] == [1, 1, 0, 1], res[r].value


def job_hung_rank_times_out(rank: int, world: int, port: int) -> dict:
    """A SIGSTOPped rank: dispatch gives up on it after timeout_us, marks it 0, and the step's
    results are those without its experts."""
    import signal

    buf = _buffer(rank, world, port)
    active = torch.ones(world, dtype=torch.int32)
    ok = _steps(buf, rank, world, 0, 1, frozenset(), active)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    x, idx, w = step_inputs(rank, 1, torch.float32)
    import time as _t

    t0 = _t.monotonic()
    recv, count, handle, _e, _h = buf.dispatch(x, idx, active, N, EXPERTS, 500_000,
                                               use_fp8=False)
    waited = _t.monotonic() - t0
    y = run_experts(buf, recv, count, rank, EXPERTS, False)
    combined, _ev, _hk = buf.combine(y, idx, w, active, 500_000, handle)
    xs, idxs, ws = zip(*(step_inputs(r, 1, torch.float32) for r in range(world)), strict=True)
    ref = lay.dense_reference(list(xs), list(idxs), list(ws), EXPERTS, world, expert_fn,
                              frozenset({1}))
    ok.append(_close(combined, ref[rank], TOL[torch.float32]))
    ok += _steps(buf, rank, world, 2, 2, frozenset({1}), active)
    return {"ok": ok, "active": active.tolist(), "waited": waited}


def test_a_hung_rank_is_given_up_after_timeout_us(pool):
    res = pool.run_raw(job_hung_rank_times_out, world=4, timeout=90, victim=1)
    for r in (0, 2, 3):
        assert res[r].status == "ok", res[r].value
        v = res[r].value
        assert all(v["ok"]) and v["active"] == [1, 0, 1, 1], v
        assert 0.4 < v["waited"] < 5.0, v  # bounded by timeout_us, not by the group's 10 s


# ---- recovery -----------------------------------------------------------------------------------
REPLACEMENT = 4  # the pool worker that plays rank 1's replacement


def job_recovered_rank(rank: int, world: int, port: int) -> dict:
    """Rank 1 dies; the survivors keep serving without its experts; its replacement builds its
    Buffer while isolated (its dispatch then covers itself only), joins (deferred join), and
    after update_ep_member on every member the full exchange is back: rank 1's experts count."""
    import elasticpg

    from .harness import serving_steps

    if rank == REPLACEMENT:
        return _ep_replacement(port)
    buf = _buffer(rank, 4, port)
    active = torch.ones(4, dtype=torch.int32)
    ok = _steps(buf, rank, 4, 0, 1, frozenset(), active)
    if rank == 1:
        os._exit(0)
    ok += _steps(buf, rank, 4, 1, 1, frozenset({1}), active)
    out = {"active_dead": active.tolist()}
    _client(port).set(f"survivor{rank}-ready", "1")
    step = 2
    for _ in serving_steps():
        ok += _steps(buf, rank, 4, step, 1, frozenset({1}), active)
        step += 1
        if elasticpg.get_peer_state(None, [1]) == [True]:
            out["status"] = elasticpg.recover_ranks(None, [1]).status.value
            break
    buf.update_ep_member()
    active.fill_(1)  # the caller restores the entry; the layer never does
    out["after"] = _steps(buf, rank, 4, 100, 3, frozenset(), active)
    out["ok"], out["active_after"] = ok, active.tolist()
    return out


def _client(port: int) -> dist.TCPStore:
    from datetime import timedelta

    from .harness import HOST

    return dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))


def _ep_replacement(port: int) -> dict:
    from datetime import timedelta

    import elasticpg
    from elasticpg.ep import Buffer

    store = _client(port)
    store.wait([f"survivor{r}-ready" for r in (0, 2, 3)], timedelta(seconds=30))
    dist.init_process_group("elasticpg", store=store, rank=1, world_size=4,
                            timeout=timedelta(seconds=30),
                            pg_options=elasticpg.Options(is_extension=True))
    buf = Buffer(dist.group.WORLD)
    active = torch.ones(4, dtype=torch.int32)
    iso = _steps(buf, 1, 4, 50, 2, frozenset({0, 2, 3}), active)  # warm-up, isolated
    out = {"isolated": iso, "isolated_active": active.tolist()}
    elasticpg.join_group()
    buf.update_ep_member()
    active.fill_(1)
    out["after"] = _steps(buf, 1, 4, 100, 3, frozenset(), active)
    out["active_after"] = active.tolist()
    return out


def test_recovered_rank_counts_again_after_update_ep_member(pool):
    res = pool.run_raw(job_recovered_rank, world=5, timeout=120)
    only_victim_died(res, 1)
    j = res[REPLACEMENT].value
    assert all(j["isolated"]) and j["isolated_active"] == [0, 1, 0, 0], j
    assert all(j["after"]) and j["active_after"] == [1, 1, 1, 1], j
    for r in (0, 2, 3):
        v = res[r].value
        assert all(v["ok"]) and v["active_dead"] == [1, 0, 1, 1], v
        assert v["status"] == "Applied", v
        assert all(v["after"]) and v["active_after"] == [1, 1, 1, 1], v


# ---- bad input ----------------------------------------------------------------------------------
def job_bad_input(rank: int, world: int, port: int) -> dict:
    """Each bad call gets a clear error on every rank (the bad rank's own, the others' from its
    rejected header), none hangs, and the group stays usable for a good step afterwards."""
    from elasticpg.ep import Buffer

    buf = _buffer(rank, world, port)
    x, idx, w = step_inputs(rank, 0, torch.float32)
    act = torch.ones(world, dtype=torch.int32)
    mine = rank == 0

    def disp(xx=x, ii=idx, a=act, n=N, e=EXPERTS, t=-1, fp8=False, b=buf):
        return lambda: b.dispatch(xx, ii, a, n, e, t, use_fp8=fp8)

    too_many = torch.randn(N + 1, HIDDEN)
    cases = {
        "hidden_not_128": disp(xx=torch.randn(4, 200), ii=idx[:1].repeat(4, 1), fp8=True),
        "experts_not_divisible": disp(e=EXPERTS + 1),
        "too_many_tokens": disp(xx=too_many if mine else x,
                                ii=torch.zeros(N + 1, TOPK, dtype=torch.int64) if mine else idx),
        "expert_out_of_range": disp(ii=torch.full_like(idx, EXPERTS) if mine else idx),
        "expert_below_minus_one": disp(ii=torch.full_like(idx, -2) if mine else idx),
        "buffer_too_small": disp(b=Buffer(dist.group.WORLD, 1000)),
        "x_float16": disp(xx=x.half() if mine else x),
        "topk_int32": disp(ii=idx.int() if mine else idx),
        "active_int64": disp(a=act.long() if mine else act),
        "bad_timeout": disp(t=-5 if mine else -1),
        "mismatched_n": disp(n=N * 2 if mine else N),
        "mismatched_experts": disp(e=EXPERTS * 2 if mine else EXPERTS),
    }
    out = {name: error_name(fn) for name, fn in cases.items()}
    recv, count, handle, _e, _h = buf.dispatch(x, idx, act, N, EXPERTS, -1, use_fp8=False)
    y = run_experts(buf, recv, count, rank, EXPERTS, False)
    bad_y = y[:, :-1] if mine else y
    out["combine_bad_shape"] = error_name(lambda: buf.combine(bad_y, idx, w, act, -1, handle))
    out["combine_bad_handle"] = error_name(
        lambda: buf.combine(y, idx, w, act, -1, tuple(handle) if mine else handle))
    out["good_after"] = _steps(buf, rank, world, 1, 2, frozenset(), act)
    return out


def test_bad_input_is_a_clear_error_on_every_rank(pool):
    for rank, v in enumerate(pool.run(job_bad_input, world=2, timeout=90)):
        good = v.pop("good_after")
        assert all(good), (rank, good)
        for name, err in v.items():
            want = "EPMismatchError" if name.startswith("mismatched") else "EPConfigError"
            assert err == want, (rank, name, err)


def test_the_reference_import_paths_reach_the_buffer():
    from elasticpg.compat import mooncake as compat
    from elasticpg.ep import Buffer

    if not compat.install_alias():
        pytest.skip("a real mooncake package is installed")
    try:
        from mooncake import ep
        from mooncake.mooncake_ep_buffer import Buffer as RefBuffer

        assert RefBuffer is Buffer and ep.Buffer is Buffer
        assert ep.get_ep_buffer_size_hint(16, 256, 2, 8) == Buffer.get_ep_buffer_size_hint(
            16, 256, 2, 8)
        assert callable(ep.get_active_ranks)
    finally:
        compat.uninstall_alias()
    import sys

    assert "mooncake.ep" not in sys.modules and "mooncake.mooncake_ep_buffer" not in sys.modules


def job_spin(rank: int, world: int, port: int) -> dict:
    """The spins the EP rounds wait with, and the group's own spin (for those participants)
    before and after them."""
    from elasticpg.collectives import shm_algorithms
    from elasticpg.ep import exchange

    buf = _buffer(rank, world, port)
    seen, ops = [], []
    real = shm_algorithms.alltoall_direct

    def spy(sx, *args):
        seen.append(sx.spin)
        ops.append(sx)
        return real(sx, *args)

    shm_algorithms.alltoall_direct = spy  # restored below: pool workers may be reused
    try:
        active = torch.ones(world, dtype=torch.int32)
        combined, ref, _x, _ = ep_step(buf, rank, world, 0, torch.float32, False, active)
        dist.barrier()
    finally:
        shm_algorithms.alltoall_direct = real
    return {"ok": _close(combined, ref, TOL[torch.float32]), "seen": seen,
            "group": [sx.host.spin_for(sx.ctx.participants) for sx in ops],
            "after": [sx.spin for sx in ops], "ep_spin": exchange.EP_SPIN_SECONDS}


@pytest.mark.parametrize("world", [2, 4])
def test_ep_rounds_spin_longer_only_where_every_rank_has_a_core(pool, world):
    """Spinning, not sleeping, where the group spins (ranks <= cores); the group's own
    yielding poll where ranks outnumber cores; the lane's spin restored for other collectives."""
    for v in pool.run(job_spin, world=world, timeout=60):
        assert v["ok"] and len(v["seen"]) == 2 and v["after"] == v["group"], v
        assert v["seen"] == [max(g, v["ep_spin"]) if g > 0 else g for g in v["group"]], v
        assert (v["group"][0] > 0) == (world <= len(os.sched_getaffinity(0))), v
