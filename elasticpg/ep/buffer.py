"""`Buffer`: expert-parallel dispatch/combine with the reference's (Mooncake EP / DeepEP
low-latency) programming model, over elasticpg's own data planes.

Each call is two rounds of the group's all_to_all (see exchange.py): a fixed-size header round
(the call's shape, checked for agreement on every rank, and how many bytes follow for each
destination), then the data round, in which each rank's rows go straight to the rank that owns
their experts. Nothing is gathered on every rank. The routing and layout math is in layout.py.

Failure rules (SPEC section 6): a rank the group's view no longer holds, or whose entry in
`active_ranks` is 0, or that the Buffer has not admitted (see update_ep_member), is never sent
to and its experts are skipped. A source whose bytes do not arrive whole by the timeout counts
as having sent nothing, and its entry is set to 0; entries are never set back to 1. Every
output row a caller may read was written in this call from bytes that arrived whole; rows
past recv_count are never read and are not cleared.

Dispatch's outputs (recv_x, its scales, src_info) live in two buffer sets per shape that
dispatch uses in turn, as DeepEP's low-latency buffers do: they stay valid until the second
dispatch after the one that returned them (clone them to keep them longer).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from ..api import runtime_of
from . import layout as lay
from .exchange import COMBINE_ROUND, DISPATCH_ROUND, MEMBER_ROUND, Exchange, ExchangeLike

DISPATCH_KIND, COMBINE_KIND = 1, 2
HB = lay.HEADER_WORDS * 8  # bytes of the header at the front of every blob
# what a rank's own argument checks and preparation may raise: it still takes part in the
# round (with a rejected header) so that no rank waits for it, then raises
BAD_CALL = (lay.EPConfigError, TypeError, ValueError, RuntimeError)


class EventOverlap:
    """The reference's event wrapper. On CPU every call has completed when it returns, so
    waiting is a no-op; with CUDA tensors the results were copied back synchronously."""

    def __init__(self, event: object = None, extra_tensors: tuple | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        return None

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _done() -> None:
    """The receive hook: the receive is already complete when dispatch/combine return."""


class DispatchHandle(tuple):
    """The reference's 5-tuple (src_info, layout_range, N, hidden, num_experts), which code
    written for it unpacks; it also carries what combine needs from the dispatch (the send
    plan and which destinations were used)."""

    plan: lay.SendPlan
    sent_to: list[bool]
    layout: lay.RecvLayout

    def __new__(cls, items: tuple, plan: lay.SendPlan, sent_to: list[bool],
                layout: lay.RecvLayout) -> DispatchHandle:
        h = super().__new__(cls, items)
        h.plan, h.sent_to, h.layout = plan, sent_to, layout
        return h


class Buffer:
    """One rank's expert-parallel exchange over `group` (an elasticpg ProcessGroup).

    Construction is local (no collective): a replacement rank can build its Buffer while it
    warms up isolated, where dispatch/combine run over itself alone. `update_ep_member()` is
    the collective that admits the group's current members; call it on every member after a
    recovery."""

    def __init__(self, group: object, num_ep_buffer_bytes: int = 0,
                 exchange: ExchangeLike | None = None) -> None:
        """`exchange`: what moves the bytes (default: the group's own data planes; the
        benchmark passes a gloo one to compare transports under identical math)."""
        if not isinstance(num_ep_buffer_bytes, int) or num_ep_buffer_bytes < 0:
            raise lay.EPConfigError(f"num_ep_buffer_bytes must be an int >= 0, got "
                                    f"{num_ep_buffer_bytes!r}")
        self.group = group
        self._exchange = exchange or Exchange(runtime_of(group))
        self.rank = self._exchange.rank
        self.group_size = self._exchange.size
        self.num_ep_buffer_bytes = num_ep_buffer_bytes
        self.members = set(self._exchange.participants())
        self._combine_buffer: torch.Tensor | None = None
        # dispatch outputs, two sets per shape used in turn (DeepEP's double buffering): a
        # fresh recv_x of R*N rows per local expert is tens of MB, and mapping and faulting
        # it in on every call cost more than placing the rows (measured ~2 ms of a 32 MB one)
        self._recv_sets: dict[tuple, list[tuple]] = {}
        self._recv_turn = 0
        self._fold_scratch = torch.empty(0, dtype=torch.float32)  # combine's float32 rows

    # ---- membership -----------------------------------------------------------------------------
    def update_ep_member(self) -> None:
        """Collective on every active member: exchange with exactly the group's current members
        from now on (after a recovery, this is what makes the recovered rank's experts count)."""
        ex = self._exchange
        parts = ex.participants()
        empty = [torch.empty(0, dtype=torch.uint8) for _ in parts]
        _got, failed = ex.alltoall(MEMBER_ROUND, parts, empty, _scratch, self._bound(-1))
        self.members = set(parts) - failed

    @staticmethod
    def get_ep_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                num_ranks: int, num_experts: int) -> int:
        return lay.size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    # ---- helpers --------------------------------------------------------------------------------
    def _bound(self, timeout_us: int) -> float:
        if not isinstance(timeout_us, int) or isinstance(timeout_us, bool) or timeout_us < -1:
            raise lay.EPConfigError(f"timeout_us must be an int >= -1 (-1: the group's "
                                    f"operation timeout), got {timeout_us!r}")
        return self._exchange.timeout if timeout_us < 0 else timeout_us / 1e6

    def _check_buffer(self, n: int, hidden: int, num_experts: int) -> None:
        if self.num_ep_buffer_bytes:
            need = lay.size_hint(n, hidden, self.group_size, num_experts)
            if self.num_ep_buffer_bytes < need:
                raise lay.EPConfigError(
                    f"num_ep_buffer_bytes ({self.num_ep_buffer_bytes}) is smaller than "
                    f"get_ep_buffer_size_hint({n}, {hidden}, {self.group_size}, {num_experts}) "
                    f"= {need}")

    def _usable(self, active: list[int], parts: tuple[int, ...]) -> list[bool]:
        inview = set(parts) & self.members
        return [bool(active[r]) and r in inview for r in range(self.group_size)]

    def _round(self, data_code: int, parts: tuple[int, ...], call: tuple[int, ...],
               sends: dict[int, torch.Tensor], bound: float,
               problem: Exception | None) -> tuple[dict[int, torch.Tensor], set[int]]:
        """One round: every blob carries our header (HB reserved bytes at its front) and its
        data; returns each heard peer's data (its blob past the header) and the ranks whose
        bytes did not arrive whole (failed, timed out, or outside the view).

        `call`: (kind, N, hidden, num_experts, dtype code, tokens), our header's first words
        (built inside the caller's argument checks, so a bad call never skips the round).
        `problem`: this rank's own
        arguments were bad; it still takes part (with a rejected header and no data, so that
        the others raise instead of waiting), then raises it. A peer whose call differs
        (EPMismatchError) or that rejected its arguments makes every rank raise once the round
        is complete, so the group stays in step and usable."""
        def header(nbytes: int) -> list[int]:
            return lay.header_words(*call, nbytes)

        blobs = []
        for p in parts:
            blob = sends.get(p) if problem is None else None
            if blob is None:
                blob = torch.empty(HB, dtype=torch.uint8)
            words = lay.rejected_header() if problem is not None else header(blob.numel() - HB)
            blob[:HB].numpy().view(np.int64)[:] = words  # numpy: cheaper than torch.tensor
            blobs.append(blob)
        got, failed = self._exchange.alltoall(data_code, parts, blobs, _scratch, bound)
        if problem is not None:
            raise problem
        mine = header(0)
        problems, rejected = [], False
        out = {}
        for p, blob in got.items():
            # (a copy: a transport may hand back views at any byte offset)
            theirs = list(struct.unpack(f"={lay.HEADER_WORDS}q", blob[:HB].numpy().tobytes())) \
                if blob.numel() >= HB else None
            why = lay.header_mismatch(mine, theirs, p, self.rank) if theirs else \
                f"rank {p} sent {blob.numel()} bytes, not even a header"
            if why:
                problems.append(why)
                rejected |= bool(theirs) and theirs[0] >> 8 == lay.REJECTED
            out[p] = blob[HB:]
        if problems:
            cls = lay.EPConfigError if rejected else lay.EPMismatchError
            raise cls("expert-parallel call refused: " + "; ".join(problems))
        return out, failed | (set(range(self.group_size)) - set(parts))

    # ---- dispatch -------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, active_ranks: torch.Tensor,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, timeout_us: int,
                 use_fp8: bool = True, async_finish: bool = False,
                 return_recv_hook: bool = False) -> tuple:
        n, r = num_max_dispatch_tokens_per_rank, self.group_size
        parts = self._exchange.participants()
        problem, bound = None, self._exchange.timeout
        try:
            if not isinstance(x, torch.Tensor):
                raise lay.EPConfigError(f"x must be a torch.Tensor, got {type(x).__name__}")
            device = x.device
            xc = _cpu(x.detach()).contiguous()
            idx = _cpu(topk_idx).contiguous() if isinstance(topk_idx, torch.Tensor) \
                else topk_idx
            lay.check_dispatch(xc, idx, n, num_experts, r, use_fp8)
            lay.check_active(active_ranks, r)
            t, hidden = xc.shape
            self._check_buffer(n, hidden, num_experts)
            bound = self._bound(timeout_us)
            local = num_experts // r
            usable = self._usable(active_ranks.tolist(), parts)
            plan = lay.plan_dispatch(idx, num_experts, r, usable)
            sends, own = self._pack_dispatch(xc, plan, use_fp8, local)
            code = lay.FP8_CODE if use_fp8 else lay.DTYPE_CODES[xc.dtype]
            esize = xc.element_size()
            rb = lay.row_bytes(hidden, use_fp8, esize)
            call = (DISPATCH_KIND, n, hidden, num_experts, code, t)
        except BAD_CALL as exc:  # raised once the round is complete, on every rank
            problem, sends, call, own = exc, {}, (), None

        got, failed = self._round(DISPATCH_ROUND, parts, call, sends, bound, problem)
        counts: list[list[int] | None] = [None] * r
        for s, blob in got.items():
            if usable[s] and blob.numel():
                c = blob[:4 * local].view(torch.int32).tolist()
                if lay.dispatch_blob_bytes(local, sum(c), hidden, use_fp8, esize) != \
                        blob.numel():
                    raise lay.EPMismatchError(f"rank {s} sent {blob.numel()} bytes for "
                                              f"{sum(c)} rows of {rb} bytes")
                counts[s] = c
        me = self.rank
        if usable[me] and plan.rank_rows[me]:
            counts[me] = plan.counts[me]  # our own rows never left: see _pack_dispatch
        layout = lay.recv_layout(counts, local)
        recv_x, scales, src_info = self._unpack_dispatch(got, counts, layout, local, n, hidden,
                                                         xc.dtype, use_fp8, plan, own)
        self._mark_inactive(active_ranks, usable, failed)
        handle = DispatchHandle((src_info, layout.layout_range(), n, hidden, num_experts),
                                plan, usable, layout)
        recv_count = torch.tensor(layout.recv_count, dtype=torch.int32)
        if device.type != "cpu":
            recv_x, recv_count = recv_x.to(device), recv_count.to(device)
            scales = scales.to(device) if scales is not None else None
        out_x = (recv_x, scales) if use_fp8 else recv_x
        return out_x, recv_count, handle, EventOverlap(), _done

    def _pack_dispatch(self, x: torch.Tensor, plan: lay.SendPlan, fp8: bool,
                       local: int) -> tuple[dict[int, torch.Tensor], tuple]:
        """One blob per other destination: room for the header, counts per local expert
        (int32 [L]), the rows' token indices (int32), the rows' data, then (fp8) their scales.
        Rows for our own experts are not packed (the round carries only our header to
        ourselves): _unpack_dispatch places them straight from the returned (rows, scales),
        which saves a pack and a copy of up to 1/R of the data."""
        if fp8:
            data, sc = lay.quantize_fp8(x)
            data = data.view(torch.uint8)
        else:
            data, sc = x, None
        hidden = x.shape[1]
        sends = {}
        for d, c in enumerate(plan.rank_rows):
            if not c or d == self.rank:
                continue
            a = plan.row_offsets[d]
            rows = plan.row_token[a:a + c]
            dbytes = c * hidden * data.element_size()
            o = lay.data_offset(local, c)
            blob = torch.empty(HB + lay.dispatch_blob_bytes(local, c, hidden, fp8,
                                                            x.element_size()),
                               dtype=torch.uint8)
            sends[d] = blob
            blob = blob[HB:]
            blob[:4 * local].view(torch.int32).copy_(torch.tensor(plan.counts[d],
                                                                  dtype=torch.int32))
            blob[4 * local:4 * (local + c)].view(torch.int32).copy_(rows)
            src, dst = lay.wide_rows(data, blob[o:o + dbytes].view(data.dtype).view(c, hidden))
            torch.index_select(src, 0, rows, out=dst)
            if sc is not None:
                sb = c * sc.shape[1] * 4
                torch.index_select(sc, 0, rows, out=blob[o + dbytes:o + dbytes + sb]
                                   .view(torch.float32).view(c, -1))
        return sends, (data, sc)

    def _recv_set(self, local: int, stride: int, hidden: int, dtype: torch.dtype,
                  fp8: bool) -> tuple:
        """(recv_x, scales or None, src_info) for this dispatch: the set not handed out by
        the previous dispatch, so a dispatch's outputs stay valid until the second dispatch
        after it."""
        key = (local, stride, hidden, dtype, fp8)
        sets = self._recv_sets.get(key)
        if sets is None:
            sets = self._recv_sets[key] = [self._new_recv_set(*key) for _ in range(2)]
        self._recv_turn ^= 1
        return sets[self._recv_turn]

    @staticmethod
    def _new_recv_set(local: int, stride: int, hidden: int, dtype: torch.dtype,
                      fp8: bool) -> tuple:
        recv_x = torch.empty(local, stride, hidden, dtype=torch.float8_e4m3fn if fp8 else dtype)
        scales = None
        if fp8:
            # column-major, as the reference's fast path lays it out: [L, hidden/128, R*N]
            scales = torch.empty(local, hidden // lay.FP8_BLOCK, stride,
                                 dtype=torch.float32).transpose(1, 2)
        return recv_x, scales, torch.empty(local, stride, dtype=torch.int32)

    def _unpack_dispatch(self, got: dict[int, torch.Tensor], counts: list[list[int] | None],
                         layout: lay.RecvLayout, local: int, n: int, hidden: int,
                         dtype: torch.dtype, fp8: bool, plan: lay.SendPlan, own: tuple):
        r = self.group_size
        stride = r * n
        recv_x, scales, src_info = self._recv_set(local, stride, hidden, dtype, fp8)
        src_info.fill_(-1)
        flat_x = recv_x.view(local * stride, hidden)
        flat_x = flat_x.view(torch.uint8) if fp8 else flat_x
        esize = 1 if fp8 else recv_x.element_size()
        for s in range(r):
            c = counts[s]
            if c is None or not sum(c):
                continue
            rows = sum(c)
            idx = layout.flat_rows(s, stride)
            if s == self.rank:  # our own rows, straight from x (or its fp8 form)
                a = plan.row_offsets[s]
                tok = plan.row_token[a:a + rows]
                src_info.view(-1).index_copy_(0, idx, tok.to(torch.int32))
                data, sc = own
                lay.place_rows(flat_x, idx, lay.wide_rows(data)[0].index_select(0, tok))
                if fp8:
                    scales.index_put_((idx // stride, idx % stride), sc.index_select(0, tok))
                continue
            blob = got[s]
            src_info.view(-1).index_copy_(0, idx, blob[4 * local:4 * (local + rows)]
                                          .view(torch.int32))
            o = lay.data_offset(local, rows)
            nb = rows * hidden * esize
            data = blob[o:o + nb].view(torch.uint8 if fp8 else recv_x.dtype).view(rows, hidden)
            lay.place_rows(flat_x, idx, data)
            if fp8:
                sc = blob[o + nb:o + nb + rows * hidden // lay.FP8_BLOCK * 4] \
                    .view(torch.float32).view(rows, -1)
                scales.index_put_((idx // stride, idx % stride), sc)
        return recv_x, scales, src_info

    def _mark_inactive(self, active_ranks: torch.Tensor, usable: list[bool],
                       failed: set[int]) -> None:
        """Set to 0 every rank whose experts this call could not use; never set a 1."""
        off = [i for i in range(self.group_size) if not usable[i] or i in failed]
        if off:
            active_ranks[off] = 0

    # ---- combine --------------------------------------------------------------------------------
    def get_next_combine_buffer(self, handle: tuple) -> torch.Tensor:
        """The tensor [L, R*N, hidden] (bfloat16) that combine(..., zero_copy=True) reads the
        expert outputs from: write them here instead of passing x."""
        _src, _lr, n, hidden, num_experts = handle
        shape = (num_experts // self.group_size, self.group_size * n, hidden)
        if self._combine_buffer is None or tuple(self._combine_buffer.shape) != shape:
            self._combine_buffer = torch.empty(shape, dtype=torch.bfloat16)
        return self._combine_buffer

    def combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                active_ranks: torch.Tensor, timeout_us: int, handle: tuple,
                zero_copy: bool = False, async_finish: bool = False,
                return_recv_hook: bool = False, out: torch.Tensor | None = None) -> tuple:
        r = self.group_size
        parts = self._exchange.participants()
        problem, bound = None, self._exchange.timeout
        try:
            if not isinstance(handle, DispatchHandle):
                raise lay.EPConfigError("combine needs the handle that this Buffer's dispatch "
                                        "returned")
            _src, _lr, n, hidden, num_experts = handle
            local = num_experts // r
            plan, layout = handle.plan, handle.layout
            if zero_copy and self._combine_buffer is None:
                raise lay.EPConfigError("combine(zero_copy=True) before "
                                        "get_next_combine_buffer")
            xs = self._combine_buffer if zero_copy else x
            device = topk_idx.device if isinstance(topk_idx, torch.Tensor) \
                else torch.device("cpu")
            xs = _cpu(xs.detach()).contiguous() if isinstance(xs, torch.Tensor) else xs
            idx = _cpu(topk_idx) if isinstance(topk_idx, torch.Tensor) else topk_idx
            w = _cpu(topk_weights) if isinstance(topk_weights, torch.Tensor) \
                else topk_weights
            t = plan.sel_row.shape[0]
            lay.check_combine(xs, idx, w, local, r, n, hidden, num_experts, t)
            lay.check_active(active_ranks, r)
            if out is not None and (tuple(out.shape) != (t, hidden)):
                raise lay.EPConfigError(f"out must have shape {(t, hidden)}, got "
                                        f"{tuple(out.shape)}")
            bound = self._bound(timeout_us)
            stride = r * n
            flat = xs.view(local * stride, hidden)
            sends = {}
            for s in range(r):
                rows = sum(layout.counts[s])
                if rows and s != self.rank:  # our own answers never leave (see below)
                    blob = torch.empty(HB + rows * hidden * xs.element_size(), dtype=torch.uint8)
                    src, dst = lay.wide_rows(flat, blob[HB:].view(xs.dtype).view(rows, hidden))
                    torch.index_select(src, 0, layout.flat_rows(s, stride), out=dst)
                    sends[s] = blob
            row_b = hidden * xs.element_size()
            call = (COMBINE_KIND, n, hidden, num_experts, lay.DTYPE_CODES[xs.dtype], t)
        except BAD_CALL as exc:  # raised once the round is complete, on every rank
            problem, sends, call = exc, {}, ()

        got, failed = self._round(COMBINE_ROUND, parts, call, sends, bound, problem)
        active = active_ranks.tolist()
        answers = {}
        for d in range(r):  # in rank order: the fold's order of float additions
            if not handle.sent_to[d] or not active[d] or not plan.rank_rows[d]:
                continue
            if d == self.rank:  # our own rows' answers, straight from the expert outputs
                answers[d] = flat.index_select(0, layout.flat_rows(d, r * n))
            elif d in got and got[d].numel() == plan.rank_rows[d] * row_b:
                answers[d] = got[d].view(xs.dtype).view(plan.rank_rows[d], hidden)
            else:
                failed.add(d)  # it did not answer (whole): its experts count as inactive
        weights = lay.row_weights(plan, w, sum(plan.rank_rows))
        combined = torch.zeros(t, hidden, dtype=torch.float32)
        if self._fold_scratch.shape[1:] != (hidden,):
            self._fold_scratch = torch.empty(lay.fold_chunk_rows(hidden), hidden,
                                             dtype=torch.float32)
        lay.fold(combined, plan, answers, weights, self._fold_scratch)
        self._mark_inactive(active_ranks, [True] * r, failed)
        result = combined.to(xs.dtype)
        if out is not None:
            out.copy_(result)
            result = out
        elif device.type != "cpu":
            result = result.to(device)
        return result, EventOverlap(), _done


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU; a no-op .to("cpu") still costs microseconds of dispatch per call."""
    return t if t.device.type == "cpu" else t.to("cpu")


def _scratch(_src: int, nbytes: int) -> torch.Tensor:
    """Receive buffers: fresh, uninitialised (every byte read is written by the exchange)."""
    return torch.empty(nbytes, dtype=torch.uint8)
