"""Hierarchical collectives for participants on several hosts with several ranks on some:
shared memory inside each host, TCP between hosts only (plans: core/hierarchy.py). all_reduce,
broadcast and all_gather have hierarchical forms, where core.hierarchy.pays says they pay.

all_reduce, at a rank of host group G with leader L:

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

all_gather runs the same three steps with blocks instead of partials: (1) the one-host
all_gather over G; (2) L sends every other leader the blocks of G it holds whole, one frame
each, after the table; (3) L posts the remote ranks' blocks, the members copy those the table
says arrived. broadcast from root R: R sends its tensor to every other host's leader over TCP
(the flat form's frame), then each host runs the one-host broadcast from its source (R, or the
leader, which posts with the table a word on whether R's tensor came).

The exclusion rule, through partial results: a result covers exactly the ranks its table says
were included, every one of them received whole by someone on the way. A member hears remote
ranks only through L: if L fails or runs another form, the member keeps what its host has
(the host's partial or blocks; for broadcast nothing) and reports the remote ranks as missing
(local_success False, view lag: nobody excluded; constraint 2), except those that L reported,
or this process itself saw, failed. A rank that waits in shared memory for a peer that already
posted a later collective stops waiting: that peer runs another form (another view), which is
lag too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from ..core.hierarchy import (
    FAILED,
    INCLUDED,
    MISSING,
    HierPlan,
    broadcast_targets,
    classify,
    reduces_hierarchically,
    remote_ranks,
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

# TCP steps of the leaders' exchange: far from the flat forms' (0..4, and 2 + 2k for the
# chunks of a split all_reduce), so a frame of the flat form from a rank on another view is
# never taken for one of these (see _recv). all_gather's blocks: STEP_DATA + position in host.
STEP_META, STEP_DATA = 1 << 20, (1 << 20) + 1
FLAT_STEP = 0

Status = dict[int, int]  # participant -> MISSING / INCLUDED / FAILED (core.hierarchy)


@dataclass
class HierOp:
    """One collective's hierarchical state: the plan, the whole op's context, and (when this
    host has other participants) a ShmOp over the host group that shares the context's sets."""

    ctx: OpContext
    plan: HierPlan
    sx: ShmOp | None


def hier_op(ctx: OpContext, nbytes: int) -> HierOp | None:
    """The hierarchical form of `ctx`'s collective (`nbytes` per rank), or None where the
    flat ones run."""
    plan = ctx.link.hier_plan(ctx.participants, ctx.spec.kind, nbytes)
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


def _guarded(h: HierOp, body: Callable[..., None], *args) -> None:
    try:
        body(h, *args)
    except CollectiveMismatchError as exc:
        # the host group's ShmOp told only its own ranks: tell the other hosts too
        h.ctx.link.report_mismatch(h.ctx.seq, [p for p in h.ctx.participants
                                               if p not in h.plan.mine], str(exc))
        raise


def allreduce(ctx: OpContext, t: torch.Tensor, op: Reduce) -> None:
    """The TCP-side all_reduce: hierarchical where the plan says so, else the flat one."""
    h = hier_op(ctx, t.numel() * t.element_size()) \
        if reduces_hierarchically(op, t.dtype) else None
    if h is None:
        algorithms.allreduce(ctx, t, op)
        return
    _guarded(h, _allreduce, t, op)


def broadcast(ctx: OpContext, t: torch.Tensor, root: int) -> None:
    """The TCP-side broadcast: hierarchical where the plan says so, else the flat one."""
    h = hier_op(ctx, t.numel() * t.element_size())
    if h is None:
        algorithms.broadcast(ctx, t, root)
        return
    _guarded(h, _broadcast, t, root)


def allgather(ctx: OpContext, outs: Sequence[torch.Tensor], t: torch.Tensor,
              slot_of: Sequence[int]) -> None:
    """The TCP-side all_gather (list and into-tensor forms): hierarchical where the plan says
    so, else the flat one."""
    h = hier_op(ctx, t.numel() * t.element_size())
    if h is None:
        algorithms.allgather(ctx, outs, t, slot_of)
        return
    _guarded(h, _allgather, outs, t, slot_of)


def _local_status(ctx: OpContext, plan: HierPlan) -> tuple[Status, dict[int, int]]:
    """What step 1 left: the host's ranks included, seen failed or missing (lag), and their
    readiness digests."""
    status = {r: INCLUDED if r not in ctx.failed else
              FAILED if r not in ctx.lagged else MISSING for r in plan.mine}
    digests = {r: ctx.ready if r == ctx.me else ctx.heard_ready.get(r, 0) for r in plan.mine}
    return status, digests


def _allreduce(h: HierOp, t: torch.Tensor, op: Reduce) -> None:
    ctx, plan, sx = h.ctx, h.plan, h.sx
    tb = byte_view(t)
    nbytes = tb.numel()
    base = 0
    if sx is not None:
        shm_algorithms.allreduce(sx, t, op)
        base = result_rounds(nbytes, sx.window).start
    status, digests = _local_status(ctx, plan)
    if plan.is_leader:
        _leaders_exchange(ctx, plan, t, op, status, digests)
        _answer_flat_peers(ctx, plan)
        if sx is not None:
            _post_stream(sx, base, [(0, tb)], nbytes, _table(ctx, status, digests))
        return
    assert sx is not None  # a member shares its host with its leader
    # several windows: assemble apart, so that a leader lost half-way leaves t whole
    dest = tb if windows(nbytes, sx.window) == 1 else byte_view(ctx.scratch(plan.leader, t))
    got = _take_stream(ctx, sx, plan.leader, base, nbytes, lambda _s: [(0, dest)])
    _answer_flat_peers(ctx, plan)
    if got is None:
        # the host's partial stays: locals as step 1 left them, remote ranks missing (or
        # failed, where this process saw it)
        _adopt(ctx, status, digests)
        return
    if dest.data_ptr() != tb.data_ptr():
        tb.copy_(dest)
    _adopt(ctx, *got)


def _broadcast(h: HierOp, t: torch.Tensor, root: int) -> None:
    """The root's tensor to the other hosts' leaders over TCP, then inside every host from its
    source (core.hierarchy.broadcast_source) over shared memory."""
    ctx, plan, sx = h.ctx, h.plan, h.sx
    if root in plan.mine:  # the root's host: the one-host form (root first to the others)
        for p in broadcast_targets(plan, root):
            ctx.send(p, FLAT_STEP, t)
        if sx is not None:
            shm_algorithms.broadcast(sx, t, root)
        return
    tb = byte_view(t)
    nbytes = tb.numel()
    if plan.is_leader:
        ctx.expect(root, FLAT_STEP, t)
        x = _recv(ctx, root, FLAT_STEP, t.dtype, t.numel(), flat=False)
        if x is not None:
            algorithms._into(t, x)
        if sx is not None:
            came = INCLUDED if x is not None else FAILED if root in ctx.failed_peers else MISSING
            table = _table(ctx, {root: came}, {root: ctx.heard_ready.get(root, 0)})
            _post_stream(sx, 0, [(0, tb)] if x is not None else [], nbytes, table)
        return
    assert sx is not None
    got = _take_stream(ctx, sx, plan.leader, 0, nbytes,
                       lambda st: [(0, tb)] if st.get(root) == INCLUDED else [])
    _adopt(ctx, *(got or ({}, {})), among=(root,))


def _allgather(h: HierOp, outs: Sequence[torch.Tensor], t: torch.Tensor,
               slot_of: Sequence[int]) -> None:
    ctx, plan, sx = h.ctx, h.plan, h.sx
    idx = {r: slot_of[i] for i, r in enumerate(ctx.participants)}
    blk = t.numel() * t.element_size()
    base = 0
    if sx is not None:
        shm_algorithms.allgather(sx, outs, t, [idx[r] for r in plan.mine])
        base = result_rounds(blk, sx.window).start
    else:
        outs[idx[ctx.me]].reshape(-1).copy_(t.reshape(-1))
    status, digests = _local_status(ctx, plan)
    remote = remote_ranks(plan)

    def blocks(st: Status) -> list[tuple[int, torch.Tensor]]:
        """(offset in the step-3 stream, bytes) of the remote blocks that `st` includes."""
        return [(j * blk, byte_view(outs[idx[r]])) for j, r in enumerate(remote)
                if st.get(r) == INCLUDED]

    if plan.is_leader:
        _leaders_gather(ctx, plan, outs, idx, t, status, digests)
        _answer_flat_peers(ctx, plan)
        if sx is not None:
            _post_stream(sx, base, blocks(status), len(remote) * blk,
                         _table(ctx, status, digests))
        return
    assert sx is not None
    got = _take_stream(ctx, sx, plan.leader, base, len(remote) * blk, blocks)
    _answer_flat_peers(ctx, plan)
    _adopt(ctx, *(got or (status, digests)))


def _meta(plan: HierPlan, status: Status, digests: dict[int, int]) -> torch.Tensor:
    """A leader's table for the other leaders: (rank, status, digest) per rank of its host."""
    return torch.tensor([x for r in plan.mine for x in (r, status[r], digests[r])],
                        dtype=torch.int64)


def _seen_failed(ctx: OpContext, r: int) -> int:
    return FAILED if r in ctx.failed_peers or ctx.link.mailbox.is_failed(r) else MISSING


def _their_rows(ctx: OpContext, plan: HierPlan, p: int,
                status: Status) -> list[list[int]] | None:
    """Leader p's table, or None (its host's ranks then failed or missing in `status`)."""
    group = plan.group_of(p)
    m = _recv(ctx, p, STEP_META, torch.int64, 3 * len(group))
    rows = m.view(-1, 3).tolist() if m is not None else None
    if rows is not None and [r for r, _s, _d in rows] != list(group):
        ctx.lagged.add(p)  # it runs another view's plan
        ctx.failed.add(p)
        rows = None
    if rows is None:
        for r in group:
            status[r] = _seen_failed(ctx, r)
    return rows


def _leaders_exchange(ctx: OpContext, plan: HierPlan, t: torch.Tensor, op: Reduce,
                      status: Status, digests: dict[int, int]) -> None:
    """Step 2 of all_reduce (at a leader): partials and tables to and from the other leaders;
    t becomes the combination of every partial received whole; status/digests gain the
    remote ranks."""
    remote = plan.remote_leaders
    meta = _meta(plan, status, digests)
    for p in remote:
        ctx.expect(p, STEP_DATA, ctx.scratch(p, t))
    for p in remote:
        if ctx.send(p, STEP_META, meta):
            ctx.send(p, STEP_DATA, t)
    parts = {ctx.me: t}
    for p in remote:
        rows = _their_rows(ctx, plan, p, status)
        x = _recv(ctx, p, STEP_DATA, t.dtype, t.numel()) if rows is not None else None
        if x is None:
            for r in plan.group_of(p):
                status[r] = _seen_failed(ctx, r)
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
    _adopt(ctx, status, digests)


def _leaders_gather(ctx: OpContext, plan: HierPlan, outs: Sequence[torch.Tensor],
                    idx: dict[int, int], t: torch.Tensor, status: Status,
                    digests: dict[int, int]) -> None:
    """Step 2 of all_gather (at a leader): the table, then every block of this host held
    whole, to every other leader; their blocks into `outs`, each counted iff it came whole
    (a leader lost half-way leaves the blocks it sent before)."""
    remote = plan.remote_leaders
    meta = _meta(plan, status, digests)
    for p in remote:
        for j, r in enumerate(plan.group_of(p)):
            if outs[idx[r]].is_contiguous():
                ctx.expect(p, STEP_DATA + j, outs[idx[r]])
    for p in remote:
        if ctx.send(p, STEP_META, meta):
            for j, r in enumerate(plan.mine):
                if status[r] == INCLUDED and not ctx.send(p, STEP_DATA + j, outs[idx[r]]):
                    break
    for p in remote:
        rows = _their_rows(ctx, plan, p, status)
        for j, (r, s, d) in enumerate(rows or ()):
            if s == INCLUDED:
                x = _recv(ctx, p, STEP_DATA + j, t.dtype, t.numel())
                if x is None:
                    s = _seen_failed(ctx, r)
                else:
                    algorithms._into(outs[idx[r]], x)
            status[r], digests[r] = s, d
    _adopt(ctx, status, digests)


def _recv(ctx: OpContext, peer: int, step: int, dtype: torch.dtype, numel: int,
          flat: bool = True) -> torch.Tensor | None:
    """ctx.recv for a frame of a hierarchical form, that also ends (as view lag) when `peer`
    runs another form of this collective (another view's plan): its flat step-0 frame is here
    (`flat`). (A frame of a later collective from `peer` ends every TCP wait the same way: see
    Mailbox.take_coll.)"""
    mb = ctx.link.mailbox
    seq = ctx.seq
    return ctx.recv(peer, step, dtype, numel,
                    probe=lambda: flat and mb.has_coll(peer, seq, FLAT_STEP))


def _answer_flat_peers(ctx: OpContext, plan: HierPlan) -> None:
    """A remote rank that runs another form (it applied a view where that is the plan) may
    wait for a frame of ours: the flat form's step-0 frame, or (a leader in its plan that is
    none in ours) our table. Send it an empty one, which it takes as view lag (another epoch,
    another size) instead of waiting until the timeout. We skip it as lag too."""
    mb = ctx.link.mailbox
    leaders = plan.remote_leaders if plan.is_leader else ()
    for p in ctx.participants:
        if p in plan.mine:
            continue
        for step in (FLAT_STEP, STEP_META):
            if mb.has_coll(p, ctx.seq, step) and (step == FLAT_STEP or p not in leaders):
                ctx.send(p, step)
                if p not in ctx.failed:
                    ctx.lagged.add(p)
                    ctx.failed.add(p)


def _adopt(ctx: OpContext, status: Status, digests: dict[int, int],
           among: Sequence[int] | None = None) -> None:
    """Make the context say what the result covers (core.hierarchy.classify) of the
    participants (or of `among`: whom the op hears from): failed ones named, missing ones
    skipped as view lag (incomplete, nobody excluded); included ones' readiness digests count
    as heard (runtime._agree_ready)."""
    mb = ctx.link.mailbox
    among = ctx.participants if among is None else among
    included, failed, missing = classify(ctx.me, among, status,
                                         [r for r in among if mb.is_failed(r)])
    for r in included:
        ctx.heard_ready[r] = digests[r]
    for r in failed:
        ctx.lagged.discard(r)
        ctx.failed.add(r)
    for r in missing:
        if r not in ctx.failed:
            ctx.lagged.add(r)
            ctx.failed.add(r)


def _table(ctx: OpContext, status: Status, digests: dict[int, int]) -> list[int]:
    table = [0] * (2 * ctx.link.slots)
    for r, s in status.items():
        table[2 * r], table[2 * r + 1] = s, digests.get(r, 0)
    return table


def _post_stream(sx: ShmOp, base: int, segments: list[tuple[int, torch.Tensor]],
                 stream_len: int, table: list[int]) -> None:
    """Step 3 at the leader: a stream of `stream_len` bytes (`segments`: (offset, bytes)
    pieces of it; the rest unwritten) window by window from round `base`, the table with the
    first; every member's post of each round awaited (the buffer-reuse rule)."""
    ctx = sx.ctx
    # post copies the stream bytes of window k from [k * window, ...): shift our stream so
    # that window base + j carries bytes [j * window, ...)
    shifted = [(base * sx.window + off, seg) for off, seg in segments]
    for j in range(windows(stream_len, sx.window)):
        sx.post(base + j, shifted, stream_len, table if j == 0 else None)
        for p in ctx.peers:
            _await(sx, p, base + j)


def _take_stream(ctx: OpContext, sx: ShmOp, leader: int, base: int, stream_len: int,
                 wanted: Callable[[Status], list[tuple[int, torch.Tensor]]],
                 ) -> tuple[Status, dict[int, int]] | None:
    """Step 3 at a member: the leader's stream, window by window from round `base` (posting
    empty windows in the same rounds); `wanted(status)` says, from the table in the first
    window, which (stream offset, destination bytes) to copy. Returns that table, or None if
    the leader is gone or runs another form (then not every wanted byte came)."""
    status: Status = {}
    digests: dict[int, int] = {}
    want: list[tuple[int, torch.Tensor]] = []
    got = True
    for j in range(windows(stream_len, sx.window)):
        k = base + j
        sx.post(k, [], 0)
        region = _await(sx, leader, k) if got else None
        if region is None:
            got = False
            continue
        b = sx.bufs[leader]
        if region.ctl[TOK + 8 * b + 4] != stream_len:  # its post is not a result (another form)
            ctx.lagged.add(leader)
            ctx.failed.add(leader)
            got = False
            continue
        if j == 0:
            row = region.table(b)
            for r in ctx.participants:
                status[r], digests[r] = int(row[2 * r]), int(row[2 * r + 1])
            want = wanted(status)
        if want:
            shm_algorithms._copy_window(region.raw(b), j * sx.window, want, False)
    return (status, digests) if got else None


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
