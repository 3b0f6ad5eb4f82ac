"""elasticpg.ep.layout in-process: the routing and layout math of dispatch/combine, against a
dense reference, with the exchange simulated by handing each destination its rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticpg.ep import layout as lay


def fn(v: torch.Tensor, e: int) -> torch.Tensor:
    return v * (0.1 * e + 1)


def simulate(xs, idxs, ws, experts, ranks, usable):
    """Dispatch and combine through layout's functions only; each rank's combined output."""
    local = experts // ranks
    plans = [lay.plan_dispatch(i, experts, ranks, usable) for i in idxs]
    n = max(1, max(x.shape[0] for x in xs))
    stride = ranks * n
    outs = []
    expert_out = []
    layouts = []
    for d in range(ranks):  # destination d lays out its rows and runs its experts
        counts = [p.counts[d] if usable[s] else None for s, p in enumerate(plans)]
        lo = lay.recv_layout(counts, local)
        recv = torch.full((local * stride, xs[0].shape[1]), float("nan"))
        for s, p in enumerate(plans):
            if counts[s] is None:
                continue
            a = p.row_offsets[d]
            rows = p.row_token[a:a + p.rank_rows[d]]
            recv.index_copy_(0, lo.flat_rows(s, stride), xs[s][rows])
        recv = recv.view(local, stride, xs[0].shape[1])
        y = torch.full_like(recv, float("nan"))  # rows past recv_count stay NaN: never read
        for lx in range(local):
            c = lo.recv_count[lx]
            y[lx, :c] = fn(recv[lx, :c], d * local + lx)
        expert_out.append(y.view(local * stride, -1))
        layouts.append(lo)
        assert lay.layout_from_range(lo.layout_range()).counts == lo.counts
    for s, p in enumerate(plans):  # source s folds the answers
        if not usable[s]:
            outs.append(None)  # a dead rank has no output
            continue
        rows_total = sum(p.rank_rows)
        answers = {d: expert_out[d][layouts[d].flat_rows(s, stride)]
                   for d in range(ranks) if usable[d] and p.rank_rows[d]}
        combined = torch.zeros(xs[s].shape)
        lay.fold(combined, p, answers, lay.row_weights(p, ws[s], rows_total))
        outs.append(combined)
    return outs


@settings(max_examples=60, deadline=None)
@given(ranks=st.sampled_from([1, 2, 4]), local=st.integers(1, 3), k=st.integers(1, 4),
       n=st.integers(1, 6), seed=st.integers(0, 2**16), dead=st.integers(-1, 3))
def test_dispatch_and_combine_math_equal_the_dense_reference(ranks, local, k, n, seed, dead):
    experts = ranks * local
    g = torch.Generator().manual_seed(seed)
    ts = [int(torch.randint(0, n + 1, (1,), generator=g)) for _ in range(ranks)]
    xs = [torch.randn(t, 4, generator=g) for t in ts]
    idxs = [torch.randint(-1, experts, (t, k), generator=g) for t in ts]
    ws = [torch.rand(t, k, generator=g) for t in ts]
    usable = [r != dead for r in range(ranks)]
    if not any(usable):
        usable[0] = True
    gone = frozenset(r for r in range(ranks) if not usable[r])
    got = simulate(xs, idxs, ws, experts, ranks, usable)
    ref = lay.dense_reference(xs, idxs, ws, experts, ranks, fn, gone)
    for s in range(ranks):
        if usable[s]:
            assert torch.allclose(got[s], ref[s], atol=1e-5), (s, got[s], ref[s])


@pytest.fixture(params=["c", "numpy"])
def plan_path(request, monkeypatch):
    """plan_dispatch by the C helper's counting sort, then by the numpy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(lay, "_c_plan", None)
    elif lay._c_plan is None:
        pytest.skip("the C helper is not built")
    return request.param


def test_rows_are_sorted_by_expert_then_token_and_a_double_pick_is_one_row(plan_path):
    idx = torch.tensor([[3, 3], [1, -1], [3, 0]])
    p = lay.plan_dispatch(idx, 4, 2, [True, True])
    assert p.row_expert.tolist() == [0, 1, 3, 3] and p.row_token.tolist() == [2, 1, 0, 2]
    assert p.counts == [[1, 1], [0, 2]] and p.rank_rows == [2, 2]
    assert p.sel_row.tolist() == [[2, 2], [1, -1], [3, 0]]
    w = lay.row_weights(p, torch.tensor([[0.25, 0.5], [1.0, 9.0], [2.0, 4.0]]), 4)
    assert w.tolist() == [4.0, 1.0, 0.75, 2.0]  # the double pick carries both weights


def test_unusable_ranks_get_no_rows(plan_path):
    idx = torch.tensor([[0, 2], [3, 1]])
    p = lay.plan_dispatch(idx, 4, 2, [True, False])
    assert p.rank_rows == [2, 0] and p.sel_row.tolist() == [[0, -1], [-1, 1]]


def test_layout_range_packs_begin_and_count_and_round_trips():
    lo = lay.recv_layout([[2, 0], None, [1, 3]], 2)
    assert lo.begin == [[0, 0], [2, 0], [2, 0]] and lo.recv_count == [3, 3]
    lr = lo.layout_range()
    assert lr.shape == (2, 3) and int(lr[0, 2]) == (2 << 32 | 1)
    back = lay.layout_from_range(lr)
    assert back.counts == [[2, 0], [0, 0], [1, 3]] and back.recv_count == [3, 3]
    assert lo.flat_rows(2, 10).tolist() == [2, 10, 11, 12]


def test_fp8_scales_follow_the_reference_formula():
    x = torch.randn(5, 256) * torch.logspace(-3, 3, 5).unsqueeze(1)
    x[0, :128] = 0  # an all-zero block: scale floors at 1e-4 / 448
    data, scales = lay.quantize_fp8(x)
    assert data.dtype == torch.float8_e4m3fn and scales.shape == (5, 2)
    amax = x.view(5, 2, 128).abs().amax(2)
    assert torch.allclose(scales, amax.clamp(min=1e-4) / 448)
    back = lay.dequantize_fp8(data, scales)
    assert torch.allclose(back, x, rtol=0.07, atol=1e-6)


@pytest.mark.parametrize("call, msg", [
    (lambda: lay.check_shape(4, 8, 3, 8), "divisible"),
    (lambda: lay.check_shape(0, 8, 2, 8), "positive"),
    (lambda: lay.check_dispatch(torch.randn(5, 8), torch.zeros(5, 1, dtype=torch.int64), 4,
                                8, 2, False), "more than"),
    (lambda: lay.check_dispatch(torch.randn(2, 200), torch.zeros(2, 1, dtype=torch.int64), 4,
                                8, 2, True), "divisible by 128"),
    (lambda: lay.check_dispatch(torch.randn(2, 8).half(), torch.zeros(2, 1, dtype=torch.int64),
                                4, 8, 2, False), "bfloat16 or float32"),
    (lambda: lay.check_topk(torch.full((2, 1), 8), 2, 8), "outside"),
    (lambda: lay.check_topk(torch.zeros(3, 1, dtype=torch.int64), 2, 8), "rows"),
    (lambda: lay.check_active(torch.ones(2), 2), "int32"),
])
def test_bad_arguments_are_named(call, msg):
    with pytest.raises(lay.EPConfigError, match=msg):
        call()


def test_header_mismatch_names_the_difference():
    a = lay.header_words(1, 16, 256, 8, 1, 3, 100)
    assert lay.header_mismatch(a, lay.header_words(1, 16, 256, 8, 1, 9, 7), 1, 0) == ""
    assert "num_experts 16" in lay.header_mismatch(a, lay.header_words(1, 16, 256, 16, 1, 3, 0),
                                                   1, 0)
    assert "combine" in lay.header_mismatch(a, lay.header_words(2, 16, 256, 8, 1, 3, 0), 1, 0)
    assert "rejected" in lay.header_mismatch(a, lay.rejected_header(), 1, 0)
    assert "fp8" in lay.header_mismatch(a, lay.header_words(1, 16, 256, 8, 3, 3, 0), 1, 0)


def test_size_hint_grows_with_every_argument():
    base = lay.size_hint(16, 256, 2, 8)
    assert base > 0
    for args in [(32, 256, 2, 8), (16, 512, 2, 8), (16, 256, 2, 16)]:
        assert lay.size_hint(*args) > base


@pytest.mark.parametrize("helper", ["c-tokens", "c-rows", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fold_adds_in_the_same_order_and_unsent_weights_are_ignored(monkeypatch, helper, dtype):
    """fold (the C helper, or torch ops in chunks of its scratch) must be bit-identical to one
    index_add_ per destination (the order of float additions per token is the rows' order),
    also when a destination's answers come as blocks. A NaN weight on a -1 (unsent)
    selection must not reach any row."""
    if helper == "torch":
        monkeypatch.setattr(lay, "_c_fold", None)
    elif lay._c_fold is None:
        pytest.skip("built without the optional C helper elasticpg.ep._fold")
    if helper != "c-tokens":
        monkeypatch.setattr(lay, "_c_fold_tokens", None)
    g = torch.Generator().manual_seed(5)
    t, k, experts, ranks, hidden = 40, 6, 16, 4, 64
    idx = torch.randint(-1, experts, (t, k), generator=g)
    w = torch.randn(t, k, generator=g)
    w[idx < 0] = float("nan")
    plan = lay.plan_dispatch(idx, experts, ranks, [True] * ranks)
    rows = sum(plan.rank_rows)
    weights = lay.row_weights(plan, w, rows)
    assert not weights.isnan().any()
    answers = {d: torch.randn(c, hidden, generator=g).to(dtype)
               for d, c in enumerate(plan.rank_rows) if c}
    whole = torch.zeros(t, hidden)
    offs = plan.row_offsets
    for d, ans in answers.items():
        a, c = offs[d], plan.rank_rows[d]
        whole.index_add_(0, plan.row_token[a:a + c], ans.float() * weights[a:a + c, None])
    for scratch_rows in (1, 3, 1000):
        got = torch.zeros(t, hidden)
        lay.fold(got, plan, answers, weights, torch.empty(scratch_rows, hidden))
        assert torch.equal(got, whole)
    blocks = {d: [a[:2], a[2:5], a[5:]] for d, a in answers.items()}
    got = torch.zeros(t, hidden)
    lay.fold(got, plan, blocks, weights, torch.empty(7, hidden))
    assert torch.equal(got, whole)


def test_the_c_fold_refuses_tokens_outside_the_output():
    if lay._c_fold is None:
        pytest.skip("built without the optional C helper elasticpg.ep._fold")
    acc = torch.zeros(3, 8)
    rows = torch.ones(2, 8)
    with pytest.raises(IndexError, match="outside"):
        lay.fold_rows(acc, rows, torch.tensor([0, 3]), torch.ones(2), None)
    with pytest.raises(IndexError, match="outside"):
        lay._c_fold_tokens(acc.numpy(), torch.tensor([[0], [2], [-1]]).numpy(),
                           torch.tensor([rows.data_ptr(), 0]).numpy(),
                           torch.ones(2).numpy(), 8, 4)
    assert not acc.any()


def test_fp8_quantisation_into_reused_buffers_equals_the_fresh_one():
    x = torch.randn(9, 256).to(torch.bfloat16)
    x[2, :128] = 0  # an all-zero block: the scale floor
    d1, s1 = lay.quantize_fp8(x)
    d2 = torch.empty(16, 256, dtype=torch.float8_e4m3fn)[:9]
    s2 = torch.empty(9, 2)
    lay.quantize_fp8(x, (d2, s2), torch.empty(16 * 256))
    assert torch.equal(d1.view(torch.uint8), d2.view(torch.uint8)) and torch.equal(s1, s2)
    xf = x.float()
    before = xf.clone()
    lay.quantize_fp8(xf)
    assert torch.equal(xf, before)  # the input is never scaled in place


def test_blocks_cover_a_sources_rows_once_in_order():
    lo = lay.recv_layout([[2, 0, 1], [1, 3, 0]], 3)
    stride = 10
    for s in (0, 1):
        flat = lo.flat_rows(s, stride).tolist()
        got = []
        for at, o, m in lay.blocks(lo.counts[s], lo.begin[s], stride):
            assert o == len(got)
            got += range(at, at + m)
        assert got == flat
    assert lay.check_counts([0, 5], 2, 5) and not lay.check_counts([6, 0], 2, 5)
    assert not lay.check_counts([1], 2, 5) and not lay.check_counts([-1, 0], 2, 5)


def test_wide_rows_views_share_one_element_type():
    a = torch.zeros(4, 8, dtype=torch.bfloat16)  # 16-byte rows at offset 0: int64
    b = torch.zeros(42, dtype=torch.bfloat16)[2:].view(5, 8)  # starts 4 bytes in: int32
    c = torch.zeros(41, dtype=torch.bfloat16)[1:].view(5, 8)  # 2 bytes in: as it is
    assert lay.wide_rows(a)[0].dtype == torch.int64
    assert {v.dtype for v in lay.wide_rows(a, b)} == {torch.int32}
    assert {v.dtype for v in lay.wide_rows(a, b, c)} == {torch.bfloat16}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_c_fp8_quantisation_is_bit_identical_to_the_torch_ops(dtype, monkeypatch):
    if lay._c_quantize_fp8 is None:
        pytest.skip("the C helper is not built")
    g = torch.Generator().manual_seed(11)
    for trial in range(120):
        t, hidden = 1 + trial % 17, 128 * (1 + trial % 4)
        scale = 10.0 ** (trial % 25 - 12)  # tiny (the 1e-4 floor, denormal fp8) to huge
        x = torch.randn(t, hidden, generator=g) * scale
        x[torch.rand(t, hidden, generator=g) < 0.2] = 0
        x[0, :128] = 0  # an all-zero block
        x = x.to(dtype)
        outs = []
        for c in (lay._c_quantize_fp8, None):
            monkeypatch.setattr(lay, "_c_quantize_fp8", c)
            d = torch.empty(t, hidden, dtype=torch.float8_e4m3fn)
            s = torch.empty(t, hidden // 128)
            lay.quantize_fp8(x, (d, s), torch.empty(t * hidden))
            outs.append((d.view(torch.uint8), s.view(torch.int32)))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_the_c_plan_equals_the_numpy_one(monkeypatch):
    if lay._c_plan is None:
        pytest.skip("the C helper is not built")
    rng = np.random.default_rng(5)
    for trial in range(400):
        ranks, local = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        experts, t, k = ranks * local, int(rng.integers(0, 40)), int(rng.integers(1, 9))
        idx = torch.from_numpy(rng.integers(-1, experts, size=(t, k)))  # repeats included
        usable = [bool(u) for u in rng.integers(0, 2, size=ranks)] if trial % 2 else \
            [True] * ranks
        plans = []
        for c in (lay._c_plan, None):
            monkeypatch.setattr(lay, "_c_plan", c)
            plans.append(lay.plan_dispatch(idx, experts, ranks, usable))
        a, b = plans
        assert a.counts == b.counts and a.rank_rows == b.rank_rows
        for name in ("row_token", "row_expert", "sel_row", "token_rows"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and torch.equal(x, y), (trial, name)


def test_the_c_plan_refuses_an_expert_out_of_range():
    if lay._c_plan is None:
        pytest.skip("the C helper is not built")
    idx = np.array([[0, 4]], dtype=np.int64)
    out = [np.empty(2, dtype=np.int64) for _ in range(2)]
    with pytest.raises(ValueError, match="outside"):
        lay._c_plan(idx, np.ones(2, np.uint8), out[0], out[1], np.empty((1, 2), np.int64),
                    np.empty(4, np.int64), np.empty((1, 2), np.int64), 1, 2, 4, 2)


def test_the_c_fp8_quantisation_leaves_non_finite_rows_to_torch():
    x = torch.zeros(2, 128)
    x[1, 3] = float("nan")
    d, s = torch.empty(2, 128, dtype=torch.float8_e4m3fn), torch.empty(2, 1)
    lay.quantize_fp8(x, (d, s), torch.empty(256))
    d0, s0 = lay.quantize_fp8(x)
    assert torch.equal(d.view(torch.uint8), d0.view(torch.uint8))
    assert torch.equal(s.isnan(), s0.isnan())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.uint8])
def test_copy_rows_c_and_torch_write_the_same_bytes(dtype, monkeypatch):
    src = torch.randn(20, 256).to(dtype) if dtype != torch.uint8 else \
        torch.randint(0, 255, (20, 384), dtype=torch.uint8)
    dst_rows = np.array([7, 3, 30, 0, 12], dtype=np.int64)
    src_rows = np.array([19, 0, 4, 4, 11], dtype=np.int64)
    outs = []
    for c in (lay._c_copy_rows, None):
        monkeypatch.setattr(lay, "_c_copy_rows", c)
        dst = torch.zeros(32, src.shape[1], dtype=dtype)
        lay.copy_rows(dst, dst_rows, src, src_rows)
        outs.append(dst.view(torch.uint8))
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[1].view(dtype)[dst_rows], src[src_rows])


def test_the_c_copy_rows_refuses_rows_outside_the_buffers():
    if lay._c_copy_rows is None:
        pytest.skip("the C helper is not built")
    dst = np.zeros((4, 8), dtype=np.uint8)
    with pytest.raises(IndexError):
        lay._c_copy_rows(dst, np.array([4], dtype=np.int64), np.zeros((2, 8), np.uint8),
                         np.array([0], dtype=np.int64), 8)
    assert not dst.any()


def test_block_rows_lists_the_blocks_rows_in_order():
    lo = lay.recv_layout([[2, 0, 1], [1, 3, 0]], 3)
    for s in (0, 1):
        got = lay.block_rows(lay.blocks(lo.counts[s], lo.begin[s], 10)).tolist()
        assert got == lo.flat_rows(s, 10).tolist()
