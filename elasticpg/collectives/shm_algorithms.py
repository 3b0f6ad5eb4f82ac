"""The collectives over shared memory (all participants on one host), in windows.

Data movement copies straight from the peers' mapped windows into the outputs. Reductions run
torch ops over views of the windows, in ascending rank order, so results are bit-identical on
every rank and equal to the TCP path's. With more than two ranks, large all_reduce is
reduce-scatter + all-gather: each
rank reduces its slice of the window and posts it; a rank that misses a slice (its reducer
failed, or included a different set of ranks) reduces that slice itself from the raw windows,
which stay valid until it posts again. Each rank's result so covers exactly the ranks whose
window it saw whole.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..core.reduction import Reduce, reduce_into
from ..core.schedules import even_splits
from ..transport.memcopy import copy_bytes, streams
from ..transport.shm import TOK
from .shm_exchange import ShmOp, byte_view

SMALL_NUMPY = 64 << 10  # bytes: below, all_reduce runs in numpy (lower fixed cost per call)
LARGE_ALLREDUCE = 256 << 10  # bytes: above (and > 2 ranks), reduce-scatter + all-gather beats
# every rank reducing everything; with 2 ranks the direct reduction moves less memory

# (stream offset, destination bytes) a rank copies out of a peer's stream
Needs = Callable[[int], list[tuple[int, torch.Tensor]]]


def _rounds(sx: ShmOp, nbytes: int) -> int:
    return max(1, -(-nbytes // sx.window))


def _copy_window(src: torch.Tensor, lo: int, needs: list[tuple[int, torch.Tensor]],
                 streaming: bool) -> None:
    hi = lo + src.numel()
    for off, dest in needs:
        a, c = max(off, lo), min(off + dest.numel(), hi)
        if a < c:
            copy_bytes(dest[a - off:c - off], src[a - lo:c - lo], streaming)


def exchange(sx: ShmOp, segments: list[tuple[int, torch.Tensor]], stream_len: int,
             rounds: int, needs: Needs, streaming: bool = False,
             positional: bool = False) -> None:
    """Post our stream window by window; copy what `needs(peer)` asks for out of each peer's
    (`streaming`: see memcopy.streams; `positional`: see ShmOp.wait_post). Every
    participant's stream spans `rounds` windows (all_to_all, whose streams differ in length,
    has its own loop)."""
    ctx = sx.ctx
    wanted: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for k in range(rounds):
        sx.post(k, segments, stream_len)
        for p in ctx.peers:
            region = sx.wait_post(p, k, positional)
            if region is None:
                continue
            if k == 0:
                wanted[p] = needs(p)
            if wanted[p]:
                _copy_window(region.raw(sx.bufs[p]), k * sx.window, wanted[p], streaming)


def _reduce_window(sx: ShmOp, k: int, b: int, order: list[int], a: int, c: int,
                   out: torch.Tensor, dtype: torch.dtype, op: Reduce) -> None:
    """out = reduction over `order` of stream bytes [a, c) of window k (window-relative).

    Through numpy where it computes exactly what torch does (_np_ufunc): on one thread it
    reduces a window faster than torch, and numpy views of the windows cost less to make."""
    me = sx.ctx.me
    fn = _np_ufunc(dtype, op) if len(order) > 1 else None
    if fn is None:
        reduce_into(out.view(dtype), [(sx.me.raw(b) if r == me else sx.regions[r].raw(
            sx.bufs[r]))[a:c].view(dtype) for r in order], op)
        return
    o = out.view(dtype).numpy()
    _np_fold(fn, o, [(sx.me.raw_bytes(b, a, c) if r == me else sx.regions[r].raw_bytes(
        sx.bufs[r], a, c)).view(o.dtype) for r in order])


_FP_REPORTS = (RuntimeWarning, FloatingPointError)  # how numpy reports float overflow / NaN
warnings.filterwarnings("ignore", category=RuntimeWarning, module=re.escape(__name__) + "$")


def _np_fold(fn: np.ufunc, out: np.ndarray, parts: list[np.ndarray]) -> None:
    """out = fn(...fn(fn(parts[0], parts[1]), parts[2])...), in this order; out may alias
    parts[0].

    Float overflow and NaNs stay silent, as in torch. numpy reports them only after writing the
    whole result: as a RuntimeWarning, which this module's warning filter ignores, or as an
    exception where the caller turned warnings into errors or set np.seterr(all="raise"),
    which is dropped here. (np.errstate would do the same, but costs about 2 us in situ, an
    eighth of a small all_reduce.)"""
    acc = parts[0]
    for x in parts[1:]:
        try:
            fn(acc, x, out=out)
        except _FP_REPORTS:
            pass
        acc = out


def _small_ufunc(t: torch.Tensor, op: Reduce, window: int) -> np.ufunc | None:
    """The numpy ufunc for _allreduce_small, if `t` is small enough and numpy can reduce it."""
    n = t.nbytes
    if 0 < n <= SMALL_NUMPY and n <= window:
        return _np_ufunc(t.dtype, op)
    return None


def _np_ufunc(dtype: torch.dtype, op: Reduce) -> np.ufunc | None:
    """A numpy ufunc that computes exactly what torch's op does for this dtype, or None."""
    key = (dtype, op)
    if key not in _UFUNCS:
        fn = _NP_OPS.get(op)
        try:
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        except TypeError:
            fn = None  # bfloat16, float8, complex32: no numpy dtype
        else:
            if np_dtype.kind in "bc":  # bool ops and complex products differ in detail
                fn = None
        _UFUNCS[key] = fn
    return _UFUNCS[key]


_NP_OPS = {Reduce.SUM: np.add, Reduce.PRODUCT: np.multiply, Reduce.MIN: np.minimum,
           Reduce.MAX: np.maximum, Reduce.BAND: np.bitwise_and, Reduce.BOR: np.bitwise_or,
           Reduce.BXOR: np.bitwise_xor}
_UFUNCS: dict[tuple[torch.dtype, Reduce], np.ufunc | None] = {}


def _allreduce_small(sx: ShmOp, t: torch.Tensor, fn: np.ufunc) -> None:
    """Latency path: numpy over the mapped windows (a torch call costs several times more)."""
    ctx = sx.ctx
    a, a8 = sx.host.numpy_of(t)
    b = sx.post(0, a8, a8.size)
    for p in ctx.peers:
        sx.wait_post(p, 0)
    failed, dt, n = ctx.failed, a.dtype, a.size
    parts = [(sx.me.np_raw(b, n, dt) if r == ctx.me else sx.regions[r].np_raw(sx.bufs[r], n, dt))
             for r in ctx.participants if r not in failed]  # participants are ascending
    if len(parts) > 1:  # else a already holds our own contribution
        _np_fold(fn, a, parts)


def allreduce(sx: ShmOp, t: torch.Tensor, op: Reduce) -> None:
    fn = _small_ufunc(t, op, sx.window)
    if fn is not None:
        _allreduce_small(sx, t, fn)
        return
    tb = byte_view(t)
    nbytes = tb.numel()
    if nbytes > LARGE_ALLREDUCE and len(sx.ctx.participants) > 2:
        _allreduce_rs_ag(sx, t, tb, op)
        return
    ctx = sx.ctx
    fold = _np_ufunc(t.dtype, op)  # numpy where it can, as in _reduce_window
    flat = sx.host.numpy_of(t)[0] if fold is not None else None
    for k in range(_rounds(sx, nbytes)):
        b = sx.post(k, [(0, tb)], nbytes)
        for p in ctx.peers:
            sx.wait_post(p, k)
        order = [r for r in ctx.participants if r not in ctx.failed]
        lo = k * sx.window
        c = min(nbytes - lo, sx.window)
        if c <= 0 or len(order) == 1:
            continue  # our own contribution is already in place
        out = tb[lo:lo + c]
        if len(order) == 2:
            # Every reduce op is commutative for two operands (same bits either way round),
            # so fold the peer's window into ours in place: one pass instead of copy + pass.
            (peer,) = (r for r in order if r != ctx.me)
            if flat is not None:
                n = t.element_size()
                mine = flat[lo // n:(lo + c) // n]
                _np_fold(fold, mine, [mine, sx.regions[peer].np_raw(sx.bufs[peer], c // n,
                                                                    flat.dtype)])
            else:
                other = sx.regions[peer].raw(sx.bufs[peer])[:c]
                reduce_into(out.view(t.dtype), [out.view(t.dtype), other.view(t.dtype)], op)
        else:
            _reduce_window(sx, k, b, order, 0, c, out, t.dtype, op)


def _allreduce_rs_ag(sx: ShmOp, t: torch.Tensor, tb: torch.Tensor, op: Reduce) -> None:
    ctx, size = sx.ctx, t.element_size()
    nbytes = tb.numel()
    pos = {r: i for i, r in enumerate(ctx.participants)}
    for k in range(_rounds(sx, nbytes)):
        lo = k * sx.window
        c = min(nbytes - lo, sx.window)
        b = sx.post(k, [(0, tb)], nbytes)
        for p in ctx.peers:
            sx.wait_post(p, k)
        order = sorted(r for r in ctx.participants if r not in ctx.failed)
        mask = sum(1 << r for r in order)
        slices = [(o * size, (o + n) * size)
                  for o, n in even_splits(c // size, len(ctx.participants))]
        a, e = slices[pos[ctx.me]]
        mine = sx.me.reduced(b)[a:e]
        _reduce_window(sx, k, b, order, a, e, mine, t.dtype, op)
        sx.post_reduced(b, k, mask)
        copy_bytes(tb[lo + a:lo + e], mine)
        for p in ctx.peers:
            a, e = slices[pos[p]]
            if a == e:
                continue
            # a peer over other participants slices otherwise (or does not slice at all)
            got = sx.wait_reduced(p, k) if p in order and sx.same_participants(p) else None
            if got == mask:
                copy_bytes(tb[lo + a:lo + e], sx.regions[p].reduced(sx.bufs[p])[a:e])
            else:  # its reducer is gone or counted other ranks: reduce the slice here
                _reduce_window(sx, k, b, order, a, e, tb[lo + a:lo + e], t.dtype, op)


def reduce(sx: ShmOp, t: torch.Tensor, root: int, op: Reduce) -> None:
    ctx, tb = sx.ctx, byte_view(t)
    nbytes = tb.numel()
    for k in range(_rounds(sx, nbytes)):
        b = sx.post(k, [(0, tb)], nbytes)
        for p in ctx.peers:
            sx.wait_post(p, k)
        lo = k * sx.window
        c = min(nbytes - lo, sx.window)
        if ctx.me == root and c > 0:
            order = sorted(r for r in ctx.participants if r not in ctx.failed)
            _reduce_window(sx, k, b, order, 0, c, tb[lo:lo + c], t.dtype, op)


def reduce_scatter(sx: ShmOp, out: torch.Tensor, ins: Sequence[torch.Tensor], op: Reduce,
                   slot_of: Sequence[int]) -> None:
    """out = reduction over participants of their ins[slot of me]."""
    ctx = sx.ctx
    ob = byte_view(out)
    cb = ob.numel()
    segs = [(i * cb, byte_view(ins[slot_of[i]])) for i in range(len(ctx.participants))]
    stream = cb * len(ctx.participants)
    mine = ctx.participants.index(ctx.me) * cb
    for k in range(_rounds(sx, stream)):
        b = sx.post(k, segs, stream)
        for p in ctx.peers:
            sx.wait_post(p, k, positional=True)
        lo = k * sx.window
        a, c = max(mine, lo), min(mine + cb, lo + sx.window)
        if a < c:
            order = sorted(r for r in ctx.participants if r not in ctx.failed)
            _reduce_window(sx, k, b, order, a - lo, c - lo, ob[a - mine:c - mine], out.dtype,
                           op)


def allgather(sx: ShmOp, outs: Sequence[torch.Tensor], t: torch.Tensor,
              slot_of: Sequence[int]) -> None:
    ctx, tb = sx.ctx, byte_view(t)
    idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
    streaming = streams(tb.numel() * len(idx))
    copy_bytes(byte_view(outs[idx[ctx.me]]), tb, streaming)
    exchange(sx, [(0, tb)], tb.numel(), _rounds(sx, tb.numel()),
             lambda p: [(0, byte_view(outs[idx[p]]))], streaming)


def gather(sx: ShmOp, outs: Sequence[torch.Tensor], t: torch.Tensor, root: int,
           slot_of: Sequence[int]) -> None:
    ctx, tb = sx.ctx, byte_view(t)
    streaming = ctx.me == root and streams(tb.numel() * len(ctx.participants))
    if ctx.me == root:
        idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
        copy_bytes(byte_view(outs[idx[ctx.me]]), tb, streaming)
        needs: Needs = lambda p: [(0, byte_view(outs[idx[p]]))]  # noqa: E731
    else:
        needs = lambda p: []  # noqa: E731
    exchange(sx, [(0, tb)], tb.numel(), _rounds(sx, tb.numel()), needs, streaming)


def broadcast(sx: ShmOp, t: torch.Tensor, root: int) -> None:
    tb = byte_view(t)
    mine = sx.ctx.me == root
    exchange(sx, [(0, tb)] if mine else [], tb.numel() if mine else 0,
             _rounds(sx, tb.numel()), lambda p: [(0, tb)] if p == root and not mine else [],
             streams(tb.numel()))


def scatter(sx: ShmOp, out: torch.Tensor, ins: Sequence[torch.Tensor], root: int,
            slot_of: Sequence[int]) -> None:
    ctx, ob = sx.ctx, byte_view(out)
    cb, n = ob.numel(), len(ctx.participants)
    segs: list[tuple[int, torch.Tensor]] = []
    if ctx.me == root:
        segs = [(i * cb, byte_view(ins[slot_of[i]])) for i in range(n)]
        copy_bytes(ob, byte_view(ins[slot_of[ctx.participants.index(root)]]))
    at = ctx.participants.index(ctx.me) * cb
    exchange(sx, segs, cb * n if ctx.me == root else 0, _rounds(sx, cb * n),
             lambda p: [(at, ob)] if p == root and ctx.me != root else [], streams(cb),
             positional=True)


def _flat_bytes(t: torch.Tensor) -> np.ndarray:
    return byte_view(t).numpy()


def alltoall_bytes(out: torch.Tensor, t: torch.Tensor, recv: list[tuple[int, int]],
                   send: list[tuple[int, int]], sx: ShmOp) -> None:
    """all_to_all_single: recv/send are (byte offset, length) of each participant's block in
    the two flat buffers; the blocks stay views of them (no tensor per block)."""
    o8, i8 = _flat_bytes(out), _flat_bytes(t)
    alltoall(sx, [o8[a:a + n] for a, n in recv], [i8[a:a + n] for a, n in send])


def alltoall_list(sx: ShmOp, outs: Sequence[torch.Tensor], ins: Sequence[torch.Tensor],
                  slot_of: Sequence[int]) -> None:
    """all_to_all with tensor lists: participant i's blocks are outs/ins[slot_of[i]]."""
    alltoall(sx, [_flat_bytes(outs[i]) for i in slot_of], [_flat_bytes(ins[i]) for i in slot_of])


def alltoall(sx: ShmOp, outs: Sequence[np.ndarray] | Callable[[int, int], np.ndarray],
             ins: Sequence[np.ndarray]) -> None:
    """outs[i] = what participant i sent us, ins[i] = what we send it (byte arrays, one per
    participant; sizes may differ per pair and are checked per message), copied with numpy.
    `outs` may instead be `alloc(i, nbytes)`, called once per participant heard from with the
    size it posted (a sized all_to_all: no size agreed beforehand, none checked).

    Our stream is the blocks for the others in participant order (our own block never enters
    it: it is copied in slices between posting and waiting, using time a round would spend
    waiting); the table in our post says where each destination's block starts."""
    ctx, me = sx.ctx, sx.ctx.me
    pos = ctx.participants.index(me)
    alloc = outs if callable(outs) else None
    if alloc is not None:
        outs = {pos: alloc(pos, ins[pos].size)}
    if ins[pos].size != outs[pos].size:
        raise ValueError(f"all_to_all: rank {me} sends itself {ins[pos].size} bytes but "
                         f"expects {outs[pos].size}")
    table = [0] * (2 * sx.me.slots)
    segs, off = [], 0
    for i, r in enumerate(ctx.participants):
        if r != me:
            table[2 * r], table[2 * r + 1] = off, ins[i].size
            segs.append((off, ins[i]))
            off += ins[i].size
    own_in, own_out, nb = ins[pos], outs[pos], ins[pos].size
    streaming = streams(sum(o.size for o in (ins if alloc is not None else outs)))
    want: dict[int, tuple[int, np.ndarray]] = {}  # peer -> (stream offset, destination)
    k, total = 0, _rounds(sx, off)
    step = -(-nb // total)
    while k < total:
        lo, hi = k * sx.window, (k + 1) * sx.window
        sx.post(k, segs, off, table)
        x, y = min(k * step, nb), nb if k == total - 1 else min((k + 1) * step, nb)
        copy_bytes(own_out[x:y], own_in[x:y], streaming)
        for i, p in enumerate(ctx.participants):
            if p == me:
                continue
            region = sx.wait_post(p, k)
            if region is None:
                continue
            b = sx.bufs[p]
            if k == 0:
                at, got = region.table(b)[2 * me:2 * me + 2].tolist()
                if alloc is not None:
                    outs[i] = alloc(i, got)
                if got != outs[i].size:
                    if ctx.lag(p, sx.epoch_of(p)):
                        continue
                    ctx._mismatch(f"rank {p} sent {got} bytes, rank {me} expected "
                                  f"{outs[i].size} bytes")
                want[p] = (at, outs[i])
                total = max(total, _rounds(sx, sx.stream_len(p)))
            at, dest = want[p]
            x, y = max(at, lo), min(at + dest.size, hi)
            if x < y:
                copy_bytes(dest[x - at:y - at], region.np_raw(b, y - lo)[x - lo:], streaming)
        k += 1


class Peek:
    """One source's bytes from a direct all_to_all (alltoall_direct): `data`, a numpy byte
    array that is either a view of the source's posted window (zero-copy) or a private copy.

    A view stays valid until this rank posts again in the group (its next collective): the
    source overwrites that buffer only after it has seen our post of a later round. A source
    that has counted us out does not wait for that, so a reader confirms with `intact()` after
    it has read what it needs: the source clears its token before it rewrites a buffer, and
    on x86 loads are not reordered with older loads, so an unchanged token means that nothing
    read was overwritten. A source that died cannot write: what it posted whole stays whole."""

    __slots__ = ("data", "_ctl", "_at", "_token")

    def __init__(self, data: np.ndarray, ctl=None, at: int = 0, token: int = 0) -> None:
        self.data, self._ctl, self._at, self._token = data, ctl, at, token

    def intact(self) -> bool:
        return self._ctl is None or self._ctl[self._at] == self._token

    def __len__(self) -> int:
        return self.data.size


def alltoall_direct(sx: ShmOp, sizes: Sequence[int],
                    write: Callable[[np.ndarray, list[int]], None],
                    alloc: Callable[[int, int], np.ndarray]) -> dict[int, Peek]:
    """A sized all_to_all without staging copies: {participant index: Peek} for every peer
    heard from whole.

    `sizes[i]`: bytes for participant i (our own entry is ignored: nothing is sent to
    ourselves). `write(stream, offsets)` writes the block for participant i at
    stream[offsets[i]:offsets[i] + sizes[i]]; when the stream fits in one window, `stream` is
    that window itself (the sender gathers straight into shared memory), else a private array
    that is posted window by window. A peer's block that lies in a single-round exchange is
    handed out as a view of its window (see Peek); otherwise it is copied out (into
    `alloc(i, nbytes)`) as the rounds go, as alltoall does."""
    ctx, me = sx.ctx, sx.ctx.me
    parts = ctx.participants
    table = [0] * (2 * sx.me.slots)
    offsets, off = [-1] * len(parts), 0
    for i, r in enumerate(parts):
        if r != me:
            table[2 * r], table[2 * r + 1] = off, sizes[i]
            offsets[i] = off
            off += sizes[i]
    segs: list[tuple[int, np.ndarray]] | None = None
    if off > sx.window:
        stream = np.empty(off, dtype=np.uint8)
        write(stream, offsets)
        segs = [(0, stream)]
    out: dict[int, Peek] = {}
    views: dict[int, Peek] = {}  # blocks in window 0, while the exchange is one round
    want: dict[int, tuple[int, np.ndarray]] = {}  # peer -> (stream offset, destination)
    k, total = 0, _rounds(sx, off)
    while k < total:
        lo, hi = k * sx.window, (k + 1) * sx.window
        if segs is None:
            sx.post(k, [], off, table, writer=(lambda raw: write(raw, offsets)) if k == 0
                    else None)
        else:
            sx.post(k, segs, off, table)
        for i, p in enumerate(parts):
            if p == me:
                continue
            region = sx.wait_post(p, k)
            if region is None:
                continue
            b = sx.bufs[p]
            if k == 0:
                at, got = region.table(b)[2 * me:2 * me + 2].tolist()
                total = max(total, _rounds(sx, sx.stream_len(p)))
                if at + got <= sx.window:
                    views[i] = Peek(region.raw_bytes(b, at, at + got), region.ctl,
                                    TOK + 8 * b, sx.token(0))
                    continue
                want[p] = (at, alloc(i, got))
                out[i] = Peek(want[p][1])
            if p in want:
                at, dest = want[p]
                x, y = max(at, lo), min(at + dest.size, hi)
                if x < y:
                    copy_bytes(dest[x - at:y - at], region.np_raw(sx.bufs[p], y - lo)[x - lo:])
        if total > 1 and views:  # window 0 is rewritten once we post window 1: copy out now
            for i, v in views.items():
                mine = alloc(i, v.data.size)
                mine[:] = v.data
                if v.intact():
                    out[i] = Peek(mine)
                else:  # it counted us out and moved on: what we copied may be torn
                    ctx.failed.add(parts[i])
            views = {}
        k += 1
    out.update(views)
    return out


def barrier(sx: ShmOp) -> None:
    exchange(sx, [], 0, 1, lambda p: [])
