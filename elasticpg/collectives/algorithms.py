"""The collectives, as direct exchanges over an OpContext.

Every rank sends its own contribution straight to the ranks that need it and reduces what it
receives in ascending rank order. That makes every result bit-identical across ranks, and makes
failure exclusion exact: a rank's result depends only on raw contributions it received itself,
never on partial sums that may already contain a dead rank's data.

Tensors arriving here are contiguous CPU tensors, already validated by the binding layer.
Outputs are indexed by slot: `slot_of[i]` is where participant i's data goes in a list output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.reduction import WIDENED, Reduce, reduce_into
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


def broadcast(ctx: OpContext, t: torch.Tensor, root: int) -> None:
    if ctx.me == root:
        for p in ctx.peers:
            ctx.send(p, 0, t)
        return
    ctx.expect(root, 0, t)
    x = ctx.recv(root, 0, t.dtype, t.numel())
    if x is not None:
        _into(t, x)


def reduce(ctx: OpContext, t: torch.Tensor, root: int, op: Reduce) -> None:
    if ctx.me != root:
        ctx.send(root, 0, t)
        return
    parts = {ctx.me: t}
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
    outs[idx[ctx.me]].reshape(-1).copy_(t.reshape(-1))
    for p in ctx.peers:
        x = ctx.recv(p, 0, t.dtype, t.numel())
        if x is not None:
            outs[idx[p]].reshape(-1).copy_(x)


def scatter(ctx: OpContext, out: torch.Tensor, ins: Sequence[torch.Tensor], root: int,
            slot_of: Sequence[int]) -> None:
    if ctx.me == root:
        idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
        for p in ctx.peers:
            ctx.send(p, 0, ins[idx[p]])
        out.reshape(-1).copy_(ins[idx[ctx.me]].reshape(-1))
        return
    x = ctx.recv(root, 0, out.dtype, out.numel())
    if x is not None:
        out.reshape(-1).copy_(x)


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
