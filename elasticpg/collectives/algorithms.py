"""The collectives, as direct exchanges over an OpContext.

Every rank sends its own contribution straight to the ranks that need it and reduces what it
receives in ascending rank order. That makes every result bit-identical across ranks, and makes
failure exclusion exact: a rank's result depends only on raw contributions it received itself,
never on partial sums that may already contain a dead rank's data.

Tensors arriving here are contiguous CPU tensors, already validated by the binding layer.
Outputs are indexed by slot: `slot_of[i]` is where participant i's data goes in a list output.

Large all_reduce at more than two ranks is the one exception (see _allreduce_split): partial
sums travel, but a rank keeps them only when they cover every participant, and otherwise falls
back to the direct exchange, so the rule above still holds for the result. Large broadcast at
more than two ranks (see _broadcast_split) passes the root's slices on among the other ranks,
with the root standing by to send the whole tensor to any rank that missed a slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.reduction import WIDENED, Reduce, reduce_into
from ..core.schedules import pipeline_chunks, split_allreduce, split_broadcast
from .context import OpContext

# Reductions whose two operands may be swapped without changing a bit (IEEE addition and
# multiplication are commutative), for dtypes reduced in their own precision (not WIDENED).
_SWAPPABLE = frozenset({Reduce.SUM, Reduce.AVG, Reduce.PRODUCT, Reduce.BAND, Reduce.BOR,
                        Reduce.BXOR})


def _reduce_ordered(ctx: OpContext, out: torch.Tensor, parts: dict[int, torch.Tensor],
                    op: Reduce) -> None:
    """out = reduction of `parts` in ascending rank order. `out` may be parts[me]."""
    if out.numel() == 0:
        return
    order = sorted(parts)
    ordered = [parts[r] for r in order]
    if len(ordered) == 2 and op in _SWAPPABLE and out.dtype not in WIDENED \
            and ordered[1].data_ptr() == out.data_ptr():
        ordered.reverse()  # the same bits, reduced in place: no copy of a received buffer
    first = ordered[0]
    if first.data_ptr() == out.data_ptr():
        reduce_into(out, ordered, op)
    elif out.data_ptr() in {p.data_ptr() for p in ordered}:
        acc = first.reshape(-1)  # a received buffer: ours to overwrite
        reduce_into(acc, ordered, op)
        out.reshape(-1).copy_(acc)
    else:
        reduce_into(out, ordered, op)


def _into(dest: torch.Tensor, x: torch.Tensor) -> None:
    """dest = x, unless x was received straight into dest (OpContext.expect)."""
    if x.data_ptr() != dest.data_ptr():
        dest.reshape(-1).copy_(x)


def allreduce(ctx: OpContext, t: torch.Tensor, op: Reduce) -> None:
    slices = split_allreduce(t.numel() * t.element_size(), t.numel(), len(ctx.participants))
    if slices is not None:
        _allreduce_split(ctx, t, op, slices)
        return
    for p in ctx.peers:
        ctx.expect(p, 0, ctx.scratch(p, t))
    for p in ctx.peers:
        ctx.send(p, 0, t)
    parts = {ctx.me: t}
    for p in ctx.peers:
        x = ctx.recv(p, 0, t.dtype, t.numel())
        if x is not None:
            parts[p] = x
    _reduce_ordered(ctx, t, parts, op)


# steps of the split all_reduce: two of its own, then raw and reduced chunk k at 2+2k, 3+2k
_WHOLE, _FALLBACK = 0, 1


def _raw_step(k: int) -> int:
    return 2 + 2 * k


def _reduced_step(k: int) -> int:
    return 3 + 2 * k


_INCOMPLETE = torch.empty(0, dtype=torch.uint8)  # "I have no complete data for this step"


def _allreduce_split(ctx: OpContext, t: torch.Tensor, op: Reduce,
                     slices: list[tuple[int, int]]) -> None:
    """Reduce-scatter + all-gather, directly and pipelined: each rank sends its raw slice j to
    participant j in chunks; j reduces chunk k (ascending rank order, so the bits equal the
    direct exchange's) while chunk k+1 is on the wire, and sends it to everyone at once. A
    rank sends 2(n-1)/n of the tensor instead of (n-1) copies, and reduces only its slice.

    The exclusion rule: a reduced chunk is sent only if its reducer received that chunk of
    every participant's raw slice whole; otherwise the reducer sends an empty frame instead
    and nothing more. A rank that lacks any complete chunk (a reducer failed, or missed
    someone's raw chunk) has no exact partial result, so it asks everyone for their raw
    tensors and reduces those received whole: the direct exchange. Every rank therefore keeps
    its input intact until each peer has said it needs nothing (the result is assembled apart
    and copied in at the end), and each rank's result covers either every participant or
    exactly the ranks it received whole."""
    flat = t.reshape(-1)
    pos = {r: i for i, r in enumerate(ctx.participants)}
    chunks = pipeline_chunks(slices, t.element_size())
    nchunks = len(chunks[0])
    mo, mc = slices[pos[ctx.me]]
    mine = chunks[pos[ctx.me]]
    out = ctx.scratch(ctx.me, t).reshape(-1)  # the result, apart from our raw input

    raw: dict[int, torch.Tensor] = {}  # where each peer's raw chunks of our slice land
    for p in ctx.peers:
        raw[p] = ctx.scratch(p, flat[mo:mo + mc])
        for k, (o, c) in enumerate(mine):
            ctx.expect(p, _raw_step(k), raw[p][o - mo:o - mo + c])
        for k, (o, c) in enumerate(chunks[pos[p]]):
            ctx.expect(p, _reduced_step(k), out[o:o + c])

    def send_raw(k: int) -> None:
        for p in ctx.peers:
            o, c = chunks[pos[p]][k]
            ctx.send(p, _raw_step(k), flat[o:o + c])

    send_raw(0)
    complete = True
    for k, (o, c) in enumerate(mine):
        if k + 1 < nchunks:
            send_raw(k + 1)  # on the wire while we reduce chunk k
        if not complete:
            continue
        parts = {ctx.me: flat[o:o + c]}
        for p in ctx.peers:
            x = ctx.recv(p, _raw_step(k), t.dtype, c)
            if x is not None:
                parts[p] = x
        complete = len(parts) == len(ctx.participants)
        if complete:
            reduce_into(out[o:o + c], [parts[r] for r in sorted(parts)], op)
        for p in ctx.peers:
            ctx.send(p, _reduced_step(k), out[o:o + c] if complete else _INCOMPLETE)
    whole = complete
    for p in ctx.peers:
        for k, (o, c) in enumerate(chunks[pos[p]]):
            x = ctx.recv(p, _reduced_step(k), t.dtype, -1)
            if x is None or x.numel() == 0:
                whole = False
                break
            if x.numel() != c:
                ctx._mismatch(f"rank {p} sent a reduced chunk of {x.numel()} elements, "
                             f"rank {ctx.me} expected {c}")
            _into(out[o:o + c], x)
    # keep the raw input until every peer has said whether it needs it
    flag = torch.tensor([int(whole)], dtype=torch.uint8)
    for p in ctx.peers:
        ctx.send(p, _WHOLE, flag)
    for p in ctx.peers:
        w = ctx.recv(p, _WHOLE, torch.uint8, 1)
        if w is not None and not int(w[0]):
            ctx.send(p, _FALLBACK, t)
    if whole:
        flat.copy_(out)
        return
    contributions = {ctx.me: t}
    for p in ctx.peers:
        x = ctx.recv(p, _FALLBACK, t.dtype, t.numel())
        if x is not None:
            contributions[p] = x
    _reduce_ordered(ctx, t, contributions, op)


def broadcast(ctx: OpContext, t: torch.Tensor, root: int) -> None:
    slices = split_broadcast(t.numel() * t.element_size(), t.numel(), len(ctx.participants))
    if slices is not None:
        _broadcast_split(ctx, t, root, slices)
        return
    if ctx.me == root:
        for p in ctx.peers:
            ctx.send(p, 0, t)
        return
    ctx.expect(root, 0, t)
    x = ctx.recv(root, 0, t.dtype, t.numel())
    if x is not None:
        _into(t, x)


# steps of the split broadcast
_BC_SLICE, _BC_RELAY, _BC_DONE, _BC_FALLBACK = range(1, 5)


def _broadcast_split(ctx: OpContext, t: torch.Tensor, root: int,
                     slices: list[tuple[int, int]]) -> None:
    """Scatter + all-gather: the root sends slice j to non-root j, which passes it to every
    other non-root (an empty frame if the root's slice never came). The root sends the tensor
    once instead of once per rank; each other rank sends (n-2)/(n-1) of it.

    A rank that misses a slice (its relay failed) says so in its 1-byte DONE frame to the
    root, which then sends it the whole tensor: every rank that does not see the root fail
    ends with the root's tensor. The root returns once every rank has said it is done (or
    failed)."""
    flat = t.reshape(-1)
    others = [r for r in ctx.participants if r != root]
    where = {r: slices[i] for i, r in enumerate(others)}

    def part(r: int) -> torch.Tensor:
        o, c = where[r]
        return flat[o:o + c]

    if ctx.me == root:
        for p in ctx.peers:
            ctx.send(p, _BC_SLICE, part(p))
        for p in ctx.peers:
            done = ctx.recv(p, _BC_DONE, torch.uint8, 1)
            if done is not None and not int(done[0]):
                ctx.send(p, _BC_FALLBACK, t)
        return
    relays = [p for p in ctx.peers if p != root]
    mine = part(ctx.me)
    ctx.expect(root, _BC_SLICE, mine)
    for p in relays:
        ctx.expect(p, _BC_RELAY, part(p))
    x = ctx.recv(root, _BC_SLICE, t.dtype, mine.numel())
    if x is not None:
        _into(mine, x)
    for p in relays:
        ctx.send(p, _BC_RELAY, mine if x is not None else _INCOMPLETE)
    whole = x is not None
    for p in relays:
        y = ctx.recv(p, _BC_RELAY, t.dtype, -1)
        if y is None or y.numel() == 0:
            whole = False
            continue
        if y.numel() != where[p][1]:
            ctx._mismatch(f"rank {p} passed on a slice of {y.numel()} elements, rank "
                          f"{ctx.me} expected {where[p][1]}")
        _into(part(p), y)
    ctx.send(root, _BC_DONE, torch.tensor([int(whole)], dtype=torch.uint8))
    if not whole:
        z = ctx.recv(root, _BC_FALLBACK, t.dtype, t.numel())
        if z is not None:
            _into(t, z)


def reduce(ctx: OpContext, t: torch.Tensor, root: int, op: Reduce) -> None:
    if ctx.me != root:
        ctx.send(root, 0, t)
        return
    parts = {ctx.me: t}
    for p in ctx.peers:
        ctx.expect(p, 0, ctx.scratch(p, t))
    for p in ctx.peers:
        x = ctx.recv(p, 0, t.dtype, t.numel())
        if x is not None:
            parts[p] = x
    _reduce_ordered(ctx, t, parts, op)


def allgather(ctx: OpContext, outs: Sequence[torch.Tensor], t: torch.Tensor,
              slot_of: Sequence[int]) -> None:
    """outs[slot_of[i]] = participant i's t."""
    idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
    for p in ctx.peers:
        if outs[idx[p]].is_contiguous():
            ctx.expect(p, 0, outs[idx[p]])
    for p in ctx.peers:
        ctx.send(p, 0, t)
    outs[idx[ctx.me]].reshape(-1).copy_(t.reshape(-1))
    for p in ctx.peers:
        x = ctx.recv(p, 0, t.dtype, t.numel())
        if x is not None:
            _into(outs[idx[p]], x)


def gather(ctx: OpContext, outs: Sequence[torch.Tensor], t: torch.Tensor, root: int,
           slot_of: Sequence[int]) -> None:
    if ctx.me != root:
        ctx.send(root, 0, t)
        return
    idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
    for p in ctx.peers:
        if outs[idx[p]].is_contiguous():
            ctx.expect(p, 0, outs[idx[p]])
    outs[idx[ctx.me]].reshape(-1).copy_(t.reshape(-1))
    for p in ctx.peers:
        x = ctx.recv(p, 0, t.dtype, t.numel())
        if x is not None:
            _into(outs[idx[p]], x)


def scatter(ctx: OpContext, out: torch.Tensor, ins: Sequence[torch.Tensor], root: int,
            slot_of: Sequence[int]) -> None:
    if ctx.me == root:
        idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
        for p in ctx.peers:
            ctx.send(p, 0, ins[idx[p]])
        out.reshape(-1).copy_(ins[idx[ctx.me]].reshape(-1))
        return
    if out.is_contiguous():
        ctx.expect(root, 0, out)
    x = ctx.recv(root, 0, out.dtype, out.numel())
    if x is not None:
        _into(out, x)


def reduce_scatter(ctx: OpContext, out: torch.Tensor, ins: Sequence[torch.Tensor], op: Reduce,
                   slot_of: Sequence[int]) -> None:
    """out = reduction over participants of their ins[slot of me]."""
    idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
    for p in ctx.peers:
        ctx.send(p, 0, ins[idx[p]])
    parts = {ctx.me: ins[idx[ctx.me]]}
    for p in ctx.peers:
        x = ctx.recv(p, 0, out.dtype, out.numel())
        if x is not None:
            parts[p] = x
    _reduce_ordered(ctx, out, parts, op)


def alltoall(ctx: OpContext, outs: Sequence[torch.Tensor], ins: Sequence[torch.Tensor],
             slot_of: Sequence[int]) -> None:
    """outs[slot of p] = what p sent me; ins[slot of p] goes to p. Sizes may differ per pair."""
    idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
    for p in ctx.peers:
        if outs[idx[p]].is_contiguous():
            ctx.expect(p, 0, outs[idx[p]])
    for p in ctx.peers:
        ctx.send(p, 0, ins[idx[p]])
    mine = idx[ctx.me]
    outs[mine].reshape(-1).copy_(ins[mine].reshape(-1))
    for p in ctx.peers:
        o = outs[idx[p]]
        x = ctx.recv(p, 0, o.dtype, o.numel(), msg_numel=o.numel())
        if x is not None:
            _into(o, x)


def barrier(ctx: OpContext) -> None:
    for p in ctx.peers:
        ctx.send(p, 0)
    for p in ctx.peers:
        ctx.recv(p, 0, torch.uint8, 0)
