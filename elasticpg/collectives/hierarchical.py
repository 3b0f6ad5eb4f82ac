"""Hierarchical all_reduce for participants on several hosts with several ranks on some:
shared memory inside each host, TCP between the host leaders only (plan: core/hierarchy.py).

Rounds at a rank of host group G with leader L:

1. the one-host shared-memory all_reduce over G, unchanged (same tokens, same descriptor),
   so every rank of G holds the host's partial result. A rank that already applied a one-host
   failure view runs exactly these rounds as its whole operation, so the two still read each
   other (README, "Across hosts", constraint 1);
2. L sends its partial, with a table of whom it covers (included / seen failed / missing, and
   their readiness digests), to every other leader, and combines what it receives in
   ascending leader order (so every rank ends with the same bits);
3. L posts the result and the table in shared memory in the rounds after step 1's; every
   member posts an empty window in the same rounds (the full exchange that makes buffer reuse
   safe) and copies the result.

The exclusion rule, through partial results: a result covers exactly the ranks its table says
were included, every one of them received whole by someone on the way. A member hears remote
ranks only through L: if L fails or runs another form, the member keeps its host's partial and
reports the remote ranks as missing (local_success False, view lag: nobody excluded; constraint
2), except those that L reported, or this process itself saw, failed. A rank that waits in
shared memory for a peer that already posted a later collective stops waiting: that peer runs
another form (another view), which is lag too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..core.hierarchy import (
    FAILED,
    INCLUDED,
    MISSING,
    HierPlan,
    classify,
    reduces_hierarchically,
    result_rounds,
    windows,
)
from ..core.reduction import Reduce, reduce_into
from ..errors import CollectiveMismatchError
from ..transport.shm import TOK, Region
from . import algorithms, shm_algorithms
from .context import OpContext
from .shm_exchange import ShmOp, byte_view

log = logging.getLogger("elasticpg.hierarchical")

# TCP steps of the leaders' exchange: apart from the flat forms' (0..4), so a frame of the
# flat form from a rank on another view is never taken for one of these (see _recv)
STEP_META, STEP_DATA = 16, 17
FLAT_STEP = 0


@dataclass
class HierOp:
    """One collective's hierarchical state: the plan, the whole op's context, and (when this
    host has other participants) a ShmOp over the host group that shares the context's sets."""

    ctx: OpContext
    plan: HierPlan
    sx: ShmOp | None


def hier_op(ctx: OpContext) -> HierOp | None:
    """The hierarchical form of `ctx`'s collective, or None where the flat ones run."""
    plan = ctx.link.hier_plan(ctx.participants)
    if plan is None:
        return None
    sx = None
    if len(plan.mine) > 1:
        shm = ctx.link.shm
        regions = shm.regions_for(plan.mine, ctx.link.timeout)
        if regions is None:  # published host ids say one host, mapping says otherwise
            return None
        sub = OpContext(ctx.link, ctx.me, plan.mine, ctx.seq, ctx.epoch, ctx.spec, ctx.deadline,
                        ready=ctx.ready, failed=ctx.failed, heard_ready=ctx.heard_ready,
                        lagged=ctx.lagged, give_up_on_timeout=ctx.give_up_on_timeout,
                        timed_out=ctx.timed_out)
        sx = ShmOp(sub, shm, regions)
    return HierOp(ctx, plan, sx)


def allreduce(ctx: OpContext, t: torch.Tensor, op: Reduce) -> None:
    """The TCP-side all_reduce: hierarchical where the plan says so, else the flat one."""
    h = hier_op(ctx) if reduces_hierarchically(op, t.dtype) else None
    if h is None:
        algorithms.allreduce(ctx, t, op)
        return
    try:
        _allreduce(h, t, op)
    except CollectiveMismatchError as exc:
        # the host group's ShmOp told only its own ranks: tell the other hosts too
        ctx.link.report_mismatch(ctx.seq, [p for p in ctx.participants if p not in h.plan.mine],
                                 str(exc))
        raise


def _allreduce(h: HierOp, t: torch.Tensor, op: Reduce) -> None:
    ctx, plan, sx = h.ctx, h.plan, h.sx
    tb = byte_view(t)
    base = 0
    if sx is not None:
        shm_algorithms.allreduce(sx, t, op)
        base = result_rounds(tb.numel(), sx.window).start
    status = {r: INCLUDED if r not in ctx.failed else
              FAILED if r not in ctx.lagged else MISSING for r in plan.mine}
    digests = {r: ctx.ready if r == ctx.me else ctx.heard_ready.get(r, 0) for r in plan.mine}
    if plan.is_leader:
        _leaders_exchange(ctx, plan, t, op, status, digests)
        _answer_flat_peers(ctx, plan)
        if sx is not None:
            _post_result(sx, base, t, tb, status, digests)
    else:
        _take_result(ctx, plan, sx, base, t, tb, status, digests)
        _answer_flat_peers(ctx, plan)


def _leaders_exchange(ctx: OpContext, plan: HierPlan, t: torch.Tensor, op: Reduce,
                      status: dict[int, int], digests: dict[int, int]) -> None:
    """Step 2 (at a leader): partials and tables to and from the other leaders; t becomes
    the combination of every partial received whole; status/digests gain the remote ranks."""
    remote = plan.remote_leaders
    meta = torch.tensor([x for r in plan.mine for x in (r, status[r], digests[r])],
                        dtype=torch.int64)
    for p in remote:
        ctx.expect(p, STEP_DATA, ctx.scratch(p, t))
    for p in remote:
        if ctx.send(p, STEP_META, meta):
            ctx.send(p, STEP_DATA, t)
    parts = {ctx.me: t}
    for p in remote:
        group = plan.group_of(p)
        m = _recv(ctx, p, STEP_META, torch.int64, 3 * len(group))
        x = _recv(ctx, p, STEP_DATA, t.dtype, t.numel()) if m is not None else None
        if x is None:
            for r in group:
                status[r] = FAILED if r in ctx.failed_peers or ctx.link.mailbox.is_failed(r) \
                    else MISSING
            continue
        rows = m.view(-1, 3).tolist()
        if sorted(r for r, _s, _d in rows) != list(group):  # it runs another view's plan
            ctx.lagged.add(p)
            ctx.failed.add(p)
            continue
        for r, s, d in rows:
            status[r], digests[r] = s, d
        parts[p] = x
    if len(parts) > 1:
        order = [parts[r] for r in sorted(parts)]
        if order[0].data_ptr() == t.data_ptr():
            reduce_into(t, order, op)
        else:  # the first part is a received buffer: ours to reduce into
            acc = order[0].reshape(-1)
            reduce_into(acc, order, op)
            t.reshape(-1).copy_(acc)
    _adopt(ctx, plan, status, digests)


def _recv(ctx: OpContext, peer: int, step: int, dtype: torch.dtype,
          numel: int) -> torch.Tensor | None:
    """ctx.recv for a leader's frame, that also ends (as view lag) when `peer` runs the flat
    form of this collective (its step-0 frame is here): its frames for us will never come."""
    coll = ctx.link.mailbox._coll  # read-only membership test, as shm_exchange does
    flat_key = (peer, ctx.seq, FLAT_STEP)
    return ctx.recv(peer, step, dtype, numel, probe=lambda: flat_key in coll)


def _answer_flat_peers(ctx: OpContext, plan: HierPlan) -> None:
    """A remote rank that runs the flat form (it applied a view where that is the plan)
    waits for our step-0 frame: send it an empty one, which it takes as view lag (another
    epoch, another size) instead of waiting until the timeout. We skip it as lag too."""
    coll = ctx.link.mailbox._coll
    for p in ctx.participants:
        if p not in plan.mine and (p, ctx.seq, FLAT_STEP) in coll:
            ctx.send(p, FLAT_STEP)
            if p not in ctx.failed:
                ctx.lagged.add(p)
                ctx.failed.add(p)


def _adopt(ctx: OpContext, plan: HierPlan, status: dict[int, int],
           digests: dict[int, int]) -> None:
    """Make the context say what the result covers (core.hierarchy.classify): failed ones
    named, missing ones skipped as view lag (incomplete, nobody excluded); included ones'
    readiness digests count as heard (runtime._agree_ready)."""
    mb = ctx.link.mailbox
    included, failed, missing = classify(ctx.me, ctx.participants, status,
                                         [r for r in ctx.participants if mb.is_failed(r)])
    for r in included:
        ctx.heard_ready[r] = digests[r]
    for r in failed:
        ctx.lagged.discard(r)
        ctx.failed.add(r)
    for r in missing:
        if r not in ctx.failed:
            ctx.lagged.add(r)
            ctx.failed.add(r)


def _table(ctx: OpContext, status: dict[int, int], digests: dict[int, int]) -> list[int]:
    table = [0] * (2 * ctx.link.slots)
    for r, s in status.items():
        table[2 * r], table[2 * r + 1] = s, digests.get(r, 0)
    return table


def _post_result(sx: ShmOp, base: int, t: torch.Tensor, tb: torch.Tensor,
                 status: dict[int, int], digests: dict[int, int]) -> None:
    """Step 3 at the leader: the result, window by window, the table with the first."""
    ctx = sx.ctx
    nbytes = tb.numel()
    table = _table(ctx, status, digests)
    # post copies the stream bytes of window k from [k * window, ...): shift our stream so
    # that window base + j carries bytes [j * window, ...) of the result
    segments = [(base * sx.window, tb)]
    for j in range(windows(nbytes, sx.window)):
        sx.post(base + j, segments, nbytes, table if j == 0 else None)
        for p in ctx.peers:
            _await(sx, p, base + j)


def _take_result(ctx: OpContext, plan: HierPlan, sx: ShmOp | None, base: int,
                 t: torch.Tensor, tb: torch.Tensor, local: dict[int, int],
                 local_digests: dict[int, int]) -> None:
    """Step 3 at a member: the leader's result, or (leader gone, or on another form) the
    host's partial already in t (covering `local`, step 1's statuses), with the remote ranks
    reported missing."""
    assert sx is not None  # a member shares its host with its leader
    leader, nbytes = plan.leader, tb.numel()
    rounds = windows(nbytes, sx.window)
    # several windows: assemble apart, so that a leader lost half-way leaves t whole
    dest = tb if rounds == 1 else byte_view(ctx.scratch(leader, t))
    status: dict[int, int] = {}
    digests: dict[int, int] = {}
    got = True
    for j in range(rounds):
        k = base + j
        sx.post(k, [], 0)
        region = _await(sx, leader, k) if got else None
        if region is None:
            got = False
            continue
        b = sx.bufs[leader]
        if region.ctl[TOK + 8 * b + 4] != nbytes:  # its post is not a result (another form)
            ctx.lagged.add(leader)
            ctx.failed.add(leader)
            got = False
            continue
        if j == 0:
            row = region.table(b)
            for r in ctx.participants:
                status[r], digests[r] = int(row[2 * r]), int(row[2 * r + 1])
        lo = j * sx.window
        c = min(nbytes - lo, sx.window)
        if c > 0:
            dest[lo:lo + c].copy_(region.raw(b)[:c])
    if got:
        if dest.data_ptr() != tb.data_ptr():
            tb.copy_(dest)
        _adopt(ctx, plan, status, digests)
        return
    # the host's partial stays: locals as step 1 left them, remote ranks missing (or failed,
    # where this process saw it)
    _adopt(ctx, plan, local, local_digests)


def _await(sx: ShmOp, peer: int, k: int) -> Region | None:
    """The peer's region once it posted window k of this collective, or None: it failed, or
    it already posted a later collective (it runs another form: lag, recorded as such)."""
    ctx = sx.ctx
    region = sx.regions.get(peer)
    if region is None or peer in ctx.failed:
        return None
    token, seq, ctl = sx.token(k), ctx.seq, region.ctl

    def posted() -> bool:
        return ctl[TOK] == token or ctl[TOK + 8] == token

    def done() -> bool:
        return posted() or region.newest_seq() > seq

    if not done() and not sx._wait(peer, region, done, token, f"window {k}"):
        return None
    if not posted():
        ctx.lagged.add(peer)
        ctx.failed.add(peer)
        return None
    sx.bufs[peer] = 0 if ctl[TOK] == token else 1
    return region


def covered(ctx: OpContext) -> Iterable[int]:
    """The participants whose contributions this rank's result holds (for tests and logs)."""
    return [r for r in ctx.participants if r not in ctx.failed]
