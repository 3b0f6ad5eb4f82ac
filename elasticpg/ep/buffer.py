"""`Buffer`: expert-parallel dispatch/combine with the reference's (Mooncake EP / DeepEP
low-latency) programming model, over elasticpg's own data planes.

Each call is one round of the group's all_to_all (see exchange.py), in its direct form: every
block starts with a fixed-size header (the call's shape, checked for agreement on every
rank), then its data, and each rank's rows go straight to the rank that owns their experts.
Over shared memory there is one copy per direction and no staging buffer: a sender gathers its
rows (index_select from x, or from its fp8 form) straight into its own posted window, and a
receiver copies each (source, local expert) block straight from the source's window into
recv_x; combine's answers go back the same way and are folded straight from the windows
(shm_algorithms.Peek says how long such a view stays valid, and how a reader confirms that
nothing it read was rewritten). Nothing is gathered on every rank. The routing and layout
math is in layout.py.

Failure rules (SPEC section 6): a rank the group's view no longer holds, or whose entry in
`active_ranks` is 0, or that the Buffer has not admitted (see update_ep_member), is never sent
to and its experts are skipped. A source whose bytes do not arrive whole by the timeout (or
whose window was rewritten while we read it) counts as having sent nothing, and its entry is
set to 0; entries are never set back to 1. Every output row a caller may read was written in
this call from bytes that arrived whole; rows past recv_count are never read and are not
cleared.

Dispatch's outputs (recv_x, its scales, src_info) live in two buffer sets per shape that
dispatch uses in turn, as DeepEP's low-latency buffers do: they stay valid until the second
dispatch after the one that returned them (clone them to keep them longer).
"""

from __future__ import annotations

import numpy as np
import torch

from ..api import runtime_of
from ..collectives.shm_algorithms import Peek
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
        # reused per-call buffers (fresh megabyte tensors cost page faults on every call):
        # fp8 quantisation, combine's float32 accumulator and chunk
        self._quant_key: tuple | None = None
        self._quant: tuple = ()
        self._fold_key: tuple | None = None
        self._fold: tuple = ()

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

    def _exchange_blocks(self, data_code: int, parts: tuple[int, ...], call: tuple[int, ...],
                         sizes: dict[int, int], fill, bound: float,
                         problem: Exception | None) -> tuple[dict[int, Peek], set[int]]:
        """One round: every block carries our header (HB bytes at its front), then `sizes[p]`
        bytes that `fill(p, block)` writes (straight into our shared-memory window where the
        transport allows); returns each heard peer's block (a Peek: see
        shm_algorithms.Peek) and the ranks whose bytes did not arrive whole (failed, timed
        out, or outside the view).

        `call`: (kind, N, hidden, num_experts, dtype code, tokens), our header's first words
        (built inside the caller's argument checks, so a bad call never skips the round).
        `problem`: this rank's own arguments were bad; it still takes part (with a rejected
        header and no data, so that the others raise instead of waiting), then raises it. A
        peer whose call differs (EPMismatchError) or that rejected its arguments makes every
        rank raise once the round is complete, so the group stays in step and usable."""
        me = self.rank
        nbytes = [0 if p == me else HB + (sizes.get(p, 0) if problem is None else 0)
                  for p in parts]
        # the header words once per call (only the byte count differs per destination)
        hdr = np.array(lay.rejected_header() if problem is not None
                       else lay.header_words(*call, 0), dtype=np.int64)

        def write(stream: np.ndarray, offsets: list[int]) -> None:
            for i, p in enumerate(parts):
                o = offsets[i]
                if o < 0:
                    continue
                words = stream[o:o + HB].view(np.int64)
                words[:] = hdr
                if problem is None:
                    words[lay.NBYTES_WORD] = nbytes[i] - HB
                    if nbytes[i] > HB:
                        fill(p, stream[o + HB:o + nbytes[i]])

        got, failed = self._exchange.alltoall_direct(data_code, parts, nbytes, write, bound)
        if problem is not None:
            raise problem
        mine = hdr.tolist()
        agreed = hdr[:lay.AGREED_WORDS].tobytes()  # what every rank's header must repeat
        problems, rejected = [], False
        for p, peek in list(got.items()):
            blob = peek.data
            if blob.size >= HB and blob[:8 * lay.AGREED_WORDS].tobytes() == agreed:
                continue  # the common case: the same call (header_mismatch would say "")
            theirs = blob[:HB].view(np.int64).tolist() if blob.size >= HB else None
            why = lay.header_mismatch(mine, theirs, p, me) if theirs else \
                f"rank {p} sent {blob.size} bytes, not even a header"
            if why and not peek.intact():  # rewritten under us: it sent nothing we can use
                del got[p]
                failed.add(p)
            elif why:
                problems.append(why)
                rejected |= bool(theirs) and theirs[0] >> 8 == lay.REJECTED
        if problems:
            cls = lay.EPConfigError if rejected else lay.EPMismatchError
            raise cls("expert-parallel call refused: " + "; ".join(problems))
        return got, failed | (set(range(self.group_size)) - set(parts))

    # ---- dispatch -------------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, active_ranks: torch.Tensor,
                 num_max_dispatch_tokens_per_rank: int, num_experts: int, timeout_us: int,
                 use_fp8: bool = True, async_finish: bool = False,
                 return_recv_hook: bool = False) -> tuple:
        n, r = num_max_dispatch_tokens_per_rank, self.group_size
        parts = self._exchange.participants()
        problem, bound = None, self._exchange.timeout
        sizes: dict[int, int] = {}
        fill = None
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
            own = self._own_rows(xc, use_fp8, n)
            esize = xc.element_size()
            for d, c in enumerate(plan.rank_rows):
                if c and d != self.rank:
                    sizes[d] = lay.dispatch_blob_bytes(local, c, hidden, use_fp8, esize)
            fill = self._dispatch_filler(plan, own, local, hidden)
            code = lay.FP8_CODE if use_fp8 else lay.DTYPE_CODES[xc.dtype]
            rb = lay.row_bytes(hidden, use_fp8, esize)
            call = (DISPATCH_KIND, n, hidden, num_experts, code, t)
        except BAD_CALL as exc:  # raised once the round is complete, on every rank
            problem, call = exc, ()

        got, failed = self._exchange_blocks(DISPATCH_ROUND, parts, call, sizes, fill, bound,
                                            problem)
        stride = r * n
        recv_x, scales, src_info, views = self._recv_set(local, stride, hidden, xc.dtype,
                                                         use_fp8)
        while True:  # once, unless a source's window was rewritten while we read it
            counts: list[list[int] | None] = [None] * r
            for s, peek in got.items():
                blob = peek.data
                if usable[s] and blob.size > HB:
                    c = blob[HB:HB + 4 * local].view(np.int32).tolist()
                    rows = sum(c)
                    if not lay.check_counts(c, local, n) or HB + lay.dispatch_blob_bytes(
                            local, rows, hidden, use_fp8, esize) != blob.size:
                        if not peek.intact():
                            continue  # rewritten under us: dropped below
                        raise lay.EPMismatchError(f"rank {s} sent {blob.size} bytes for "
                                                  f"{rows} rows of {rb} bytes")
                    counts[s] = c
            me = self.rank
            if usable[me] and plan.rank_rows[me]:
                counts[me] = plan.counts[me]  # our own rows never leave: see _own_rows
            layout = lay.recv_layout(counts, local)
            self._place_dispatch(got, counts, layout, local, stride, hidden, use_fp8, plan,
                                 own, views)
            torn = [s for s, peek in got.items() if not peek.intact()]
            if not torn:
                break
            for s in torn:  # it counted us out and moved on: its rows may be torn; none count
                del got[s]
                failed.add(s)
        self._mark_inactive(active_ranks, usable, failed)
        handle = DispatchHandle((src_info, layout.layout_range(), n, hidden, num_experts),
                                plan, usable, layout)
        recv_count = torch.tensor(layout.recv_count, dtype=torch.int32)
        if device.type != "cpu":
            recv_x, recv_count = recv_x.to(device), recv_count.to(device)
            scales = scales.to(device) if scales is not None else None
        out_x = (recv_x, scales) if use_fp8 else recv_x
        return out_x, recv_count, handle, EventOverlap(), _done

    def _own_rows(self, x: torch.Tensor, fp8: bool, n: int) -> tuple:
        """(data, scales or None) of this call's tokens as they travel: x itself, or its fp8
        form in reused buffers (quantised once per token, whatever number of experts it
        goes to). Our own experts' rows are placed from here (they never enter the
        exchange), the others are gathered from here straight into the outgoing window."""
        if not fp8:
            return x, None
        t, hidden = x.shape
        key = (n, hidden)
        if self._quant_key != key:
            self._quant = (torch.empty(n, hidden, dtype=torch.float8_e4m3fn),
                           torch.empty(n, hidden // lay.FP8_BLOCK, dtype=torch.float32),
                           torch.empty(n * hidden, dtype=torch.float32))
            self._quant_key = key
        data, sc, work = self._quant
        data, sc = lay.quantize_fp8(x, (data[:t], sc[:t]), work)
        return data.view(torch.uint8), sc

    @staticmethod
    def _dispatch_filler(plan: lay.SendPlan, own: tuple, local: int, hidden: int):
        """fill(destination, block): the destination's dispatch block past the header:
        counts per local expert (int32 [L]), the rows' token indices (int32), the rows' data
        gathered from `own` (lay.copy_rows: byte rows), then (fp8) their scales."""
        data, sc = own
        raw = data.view(torch.uint8)
        raw_sc = sc.view(torch.uint8) if sc is not None else None
        offsets = plan.row_offsets

        def fill(d: int, blob: np.ndarray) -> None:
            c, a = plan.rank_rows[d], offsets[d]
            rows = plan.row_token[a:a + c]
            blob[:4 * local].view(np.int32)[:] = plan.counts[d]
            blob[4 * local:4 * (local + c)].view(np.int32)[:] = rows.numpy()
            o = lay.data_offset(local, c)
            dbytes = c * hidden * data.element_size()
            seq = np.arange(c, dtype=np.int64)
            tok = rows.numpy()
            # byte rows both sides (one C call each; see lay.copy_rows)
            lay.copy_rows(torch.from_numpy(blob[o:o + dbytes]).view(c, -1), seq, raw, tok)
            if sc is not None:
                sb = c * sc.shape[1] * 4
                lay.copy_rows(torch.from_numpy(blob[o + dbytes:o + dbytes + sb]).view(c, -1),
                              seq, raw_sc, tok)
        return fill

    def _recv_set(self, local: int, stride: int, hidden: int, dtype: torch.dtype,
                  fp8: bool) -> tuple:
        """(recv_x, scales or None, src_info, their views for _place_dispatch) for this
        dispatch: the set not handed out by the previous dispatch, so a dispatch's outputs
        stay valid until the second dispatch after it."""
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
        src_info = torch.empty(local, stride, dtype=torch.int32)
        # the numpy views _place_dispatch writes through, made once per set (a few us each)
        flat_x = recv_x.view(local * stride, hidden)
        flat_x = flat_x.view(torch.uint8) if fp8 else flat_x
        np_x = _np_rows(lay.wide_rows(flat_x)[0])
        np_sc = scales.transpose(1, 2).numpy() if fp8 else None  # [L, hidden/128, R*N]
        views = (flat_x, np_x, src_info.view(-1).numpy(), np_sc)
        return recv_x, scales, src_info, views

    def _place_dispatch(self, got: dict[int, Peek], counts: list[list[int] | None],
                        layout: lay.RecvLayout, local: int, stride: int, hidden: int,
                        fp8: bool, plan: lay.SendPlan, own: tuple, views: tuple) -> None:
        """Every row that arrived, straight from the source's window into recv_x: one copy
        per (source, local expert) block, as 8-byte words where the row allows; our own
        rows gathered from x (or its fp8 form) into their blocks."""
        flat_x, np_x, np_src, np_sc = views
        words = np_x.shape[1]
        np_src.fill(-1)
        nb = hidden // lay.FP8_BLOCK
        rb = hidden * flat_x.element_size()
        for s in range(self.group_size):
            c = counts[s]
            if c is None:
                continue
            rows = sum(c)
            if not rows:
                continue
            blocks = lay.blocks(c, layout.begin[s], stride)
            if s == self.rank:  # our own rows, from x (or its fp8 form): one copy in all
                data, sc = own
                a = plan.row_offsets[s]
                tok = plan.row_token[a:a + rows].numpy()
                lay.copy_rows(flat_x, lay.block_rows(blocks), data, tok)
                np_sc_own = sc.numpy() if sc is not None else None
                for at, o, m in blocks:  # slices per block, as for the other sources
                    np_src[at:at + m] = tok[o:o + m]
                    if np_sc_own is not None:
                        e, b = divmod(at, stride)
                        np_sc[e, :, b:b + m] = np_sc_own[tok[o:o + m]].T
                continue
            blob = got[s].data[HB:]
            tokens = blob[4 * local:4 * (local + rows)].view(np.int32)
            o0 = lay.data_offset(local, rows)
            rowdata = blob[o0:o0 + rows * rb].view(np_x.dtype).reshape(rows, words)
            sdata = blob[o0 + rows * rb:o0 + rows * rb + rows * nb * 4].view(
                np.float32).reshape(rows, nb) if fp8 else None
            for at, o, m in blocks:  # slices, not index arrays: a block is contiguous
                np_x[at:at + m] = rowdata[o:o + m]
                np_src[at:at + m] = tokens[o:o + m]
                if sdata is not None:  # at = e * stride + b: column-major scales
                    e, b = divmod(at, stride)
                    np_sc[e, :, b:b + m] = sdata[o:o + m].T

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
        sizes: dict[int, int] = {}
        fill = None
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
            row_b = hidden * xs.element_size()
            for s in range(r):
                rows = sum(layout.counts[s])
                if rows and s != self.rank:  # our own answers never leave (see below)
                    sizes[s] = rows * row_b
            fill = _combine_filler(flat, layout, stride)
            call = (COMBINE_KIND, n, hidden, num_experts, lay.DTYPE_CODES[xs.dtype], t)
        except BAD_CALL as exc:  # raised once the round is complete, on every rank
            problem, call = exc, ()

        got, failed = self._exchange_blocks(COMBINE_ROUND, parts, call, sizes, fill, bound,
                                            problem)
        active = active_ranks.tolist()
        weights = lay.row_weights(plan, w, sum(plan.rank_rows))
        scratch = self._fold_buffers(n, hidden)
        combined = scratch[0][:t]
        own = None
        if handle.sent_to[self.rank] and active[self.rank] and plan.rank_rows[self.rank]:
            # our own rows' answers, straight from the expert outputs: a block per local
            # expert, in the order we "sent" them
            own = [flat[at:at + c] for at, _o, c in lay.blocks(
                layout.counts[self.rank], layout.begin[self.rank], r * n)]
        while True:  # once, unless a peer's window was rewritten while we read it
            answers = {}
            for d in range(r):  # in rank order: the fold's order of float additions
                if not handle.sent_to[d] or not active[d] or not plan.rank_rows[d] or \
                        d in failed:
                    continue
                if d == self.rank:
                    answers[d] = own
                elif d in got and got[d].data.size == HB + plan.rank_rows[d] * row_b:
                    answers[d] = torch.from_numpy(got[d].data[HB:]).view(xs.dtype).view(
                        plan.rank_rows[d], hidden)
                else:
                    failed.add(d)  # it did not answer (whole): its experts count as inactive
            combined.zero_()
            lay.fold(combined, plan, answers, weights, scratch[1])
            torn = [d for d in answers if d != self.rank and not got[d].intact()]
            if not torn:
                break
            failed.update(torn)  # rewritten under us (it counted us out): fold without it
        self._mark_inactive(active_ranks, [True] * r, failed)
        if out is not None:
            out.copy_(combined)
            result = out
        else:
            result = combined.to(xs.dtype, copy=True)  # (combined is a reused buffer)
            if device.type != "cpu":
                result = result.to(device)
        return result, EventOverlap(), _done

    def _fold_buffers(self, n: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(float32 [N, hidden] accumulator, float32 chunk rows), reused across calls."""
        if self._fold_key != (n, hidden):
            self._fold = (torch.empty(n, hidden, dtype=torch.float32),
                          torch.empty(lay.fold_chunk_rows(hidden), hidden,
                                      dtype=torch.float32))
            self._fold_key = (n, hidden)
        return self._fold


def _combine_filler(flat: torch.Tensor, layout: lay.RecvLayout, stride: int):
    """fill(source, block): the expert outputs of the source's rows, in the order it sent
    them (local expert, then token), one copy per (source, local expert) block."""
    wide = lay.wide_rows(flat)[0]
    np_y = _np_rows(wide)

    def fill(s: int, blob: np.ndarray) -> None:
        dst = blob.view(np_y.dtype).reshape(-1, np_y.shape[1])
        for at, o, m in lay.blocks(layout.counts[s], layout.begin[s], stride):
            dst[o:o + m] = np_y[at:at + m]
    return fill


def _np_rows(t: torch.Tensor) -> np.ndarray:
    """A 2-D integer (or float32) tensor's rows as a numpy array (a view: writes land in t)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """t on the CPU; a no-op .to("cpu") still costs microseconds of dispatch per call."""
    return t if t.device.type == "cpu" else t.to("cpu")


def _scratch(_src: int, nbytes: int) -> torch.Tensor:
    """Receive buffers: fresh, uninitialised (every byte read is written by the exchange)."""
    return torch.empty(nbytes, dtype=torch.uint8)
