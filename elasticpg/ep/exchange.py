"""The byte exchange under dispatch and combine: one sized all_to_all round of the group.

It is the group's own all_to_all (collectives: shared memory when every participant is on this
host, TCP frames otherwise), run as one collective of the group, so it shares the group's
sequence numbers, failure handling and views: each rank's bytes go straight to their
destination, and nothing is gathered anywhere. Dispatch and combine use its direct form
(alltoall_direct): over shared memory a sender writes its blocks straight into its posted
window and a receiver reads the peers' windows in place. What this module adds is the EP
timeout rule: a peer that has not posted by `deadline` counts as having sent nothing (instead
of failing the call), and is reported to the group as failed so that every member stops
waiting for it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from ..collectives import shm_algorithms
from ..collectives.context import OpContext, OpSpec
from ..collectives.shm_algorithms import Peek
from ..core.dtypes import dtype_code
from ..core.framing import OpKind
from ..group.runtime import GroupRuntime

log = logging.getLogger("elasticpg.ep")

# root-field codes: they make each EP round its own call, so ranks that made different calls
# (one in dispatch, one in combine) get a mismatch error instead of reading the wrong bytes
DISPATCH_ROUND, COMBINE_ROUND, MEMBER_ROUND = 0x4551, 0x4552, 0x4553
_UINT8 = dtype_code(torch.uint8)
# How long an EP round spins on a peer's post before sleeping in the kernel, where every
# participant has a core of its own (the group's default, SPIN_SECONDS in group/shm_host.py,
# is 200 us). EP rounds run in lock-step, and one futex sleep/wake round trip cost more than
# a whole small dispatch on the 2-core VM: a woken rank starts late by the wake-up latency,
# its peer then outwaits the short spin and sleeps in turn, and every round pays a wake-up
# (measured, 2 ranks 32x256x8 top-4 bf16, rank 0's dispatch+combine median: 1.47 ms at 200 us,
# 0.61 ms at 500 us, 0.43 ms at 1 ms, 0.42 ms at 2 ms; no change at 128x2048x32 top-8). With
# more ranks than cores the group's yielding poll is kept: polling longer measured slower.
EP_SPIN_SECONDS = 1e-3


Alloc = Callable[[int, int], torch.Tensor]  # (source rank, nbytes) -> uint8 tensor to fill
Writer = Callable[[np.ndarray, list[int]], None]  # (stream bytes, offset of each block)


class ExchangeLike(Protocol):
    """What Buffer needs from a transport: who takes part, and one sized all_to_all of bytes."""

    rank: int
    size: int  # slots: the R of the layout
    timeout: float  # seconds: what timeout_us=-1 means

    def participants(self) -> tuple[int, ...]: ...

    def alltoall(self, round_code: int, parts: tuple[int, ...], sends: list[torch.Tensor],
                 alloc: Alloc, bound: float) -> tuple[dict[int, torch.Tensor], set[int]]: ...

    def alltoall_direct(self, round_code: int, parts: tuple[int, ...], sizes: list[int],
                        write: Writer, bound: float) -> tuple[dict[int, Peek], set[int]]: ...


class Exchange:
    """Over an elasticpg group's runtime."""

    def __init__(self, runtime: GroupRuntime) -> None:
        self.rt = runtime
        self.rank = runtime.rank
        self.size = runtime.slots
        self.timeout = runtime.timeout

    def participants(self) -> tuple[int, ...]:
        """Settle membership at this operation boundary; who the next round runs over."""
        return self.rt.prepare()

    def _context(self, round_code: int, parts: tuple[int, ...], bound: float) -> OpContext:
        rt = self.rt
        spec = OpSpec(OpKind.ALLTOALL_SINGLE, _UINT8, 0, round_code)
        lane = rt.lane()
        ctx = lane.begin(spec) if lane is not None and parts == lane.ctx.participants \
            else rt.new_op(spec, parts)
        ctx.deadline = time.monotonic() + bound
        ctx.give_up_on_timeout = True
        ctx.timed_out.clear()
        return ctx

    def _run(self, ctx: OpContext, body: Callable[[OpContext], None]) -> set[int]:
        """Run one round's body under the EP timeout rule; the peers that failed it."""
        rt = self.rt

        def guarded(c: OpContext) -> None:
            body(c)
            for p in sorted(c.timed_out - c.lagged):
                # the group learns it here, so the view (mode a) leaves it out from now on
                rt.fail_peer(p, f"rank {p} did not answer rank {rt.rank}'s expert-parallel "
                                f"exchange within its timeout", how="ep_timeout")

        try:
            rt.run(ctx, guarded)
        finally:
            ctx.give_up_on_timeout = False  # the lane's context is reused by other collectives
        if ctx.timed_out:
            log.warning("rank %d: expert-parallel exchange gave up on ranks %s (timeout)",
                        rt.rank, sorted(ctx.timed_out))
        return set(ctx.failed)

    def alltoall_direct(self, round_code: int, parts: tuple[int, ...], sizes: list[int],
                        write: Writer, bound: float) -> tuple[dict[int, Peek], set[int]]:
        """The same round as alltoall, without staging copies: `write(stream, offsets)` lays
        our blocks (sizes[i] bytes for participant parts[i]; nothing to ourselves) out in the
        outgoing stream, which over shared memory is our window itself; each heard source's
        block comes back as a Peek, over shared memory a view of its window (valid until our
        next collective in this group; confirm with Peek.intact() once read). Over TCP the
        blocks are framed and received as alltoall does."""
        ctx = self._context(round_code, parts, bound)
        got: dict[int, Peek] = {}

        def body(c: OpContext) -> None:
            if c.shm is not None:
                sx = c.shm
                spin = sx.spin  # the lane's ShmOp serves other collectives too: restored
                if spin > 0:
                    sx.spin = max(spin, EP_SPIN_SECONDS)
                try:
                    heard = shm_algorithms.alltoall_direct(
                        sx, sizes, write, lambda i, nb: np.empty(nb, dtype=np.uint8))
                finally:
                    sx.spin = spin
                got.update((parts[i], v) for i, v in heard.items())
                return
            offsets, off = [], 0
            for i, p in enumerate(parts):
                n = 0 if p == self.rank else sizes[i]
                offsets.append(off if n else -1)
                off += n
            stream = torch.empty(off, dtype=torch.uint8)
            write(stream.numpy(), offsets)
            sends = [stream[o:o + sizes[i]] if o >= 0 else stream[:0]
                     for i, o in enumerate(offsets)]

            def take(i: int, nbytes: int) -> torch.Tensor:
                t = torch.empty(nbytes, dtype=torch.uint8)
                if parts[i] != self.rank:
                    got[parts[i]] = Peek(t.numpy())
                return t
            _tcp_alltoall(c, parts, sends, take)

        failed = self._run(ctx, body)
        return {p: v for p, v in got.items() if p not in failed}, failed

    def alltoall(self, round_code: int, parts: tuple[int, ...], sends: list[torch.Tensor],
                 alloc: Alloc, bound: float) -> tuple[dict[int, torch.Tensor], set[int]]:
        """sends[i] goes to participant parts[i]; returns {source: the bytes it sent us} for
        every source whose bytes arrived whole, and the peers whose did not (failed, excluded,
        or silent for `bound` seconds from the start of this round). No size is agreed
        beforehand: each receive is allocated (`alloc`) at the size its sender posted, so one
        round carries both the header and the data of a call."""
        ctx = self._context(round_code, parts, bound)
        got: dict[int, torch.Tensor] = {}

        def take(i: int, nbytes: int) -> torch.Tensor:
            got[parts[i]] = t = alloc(parts[i], nbytes)
            return t

        def body(c: OpContext) -> None:
            if c.shm is not None:
                shm_algorithms.alltoall(c.shm, lambda i, nb: take(i, nb).numpy(),
                                        [s.numpy() for s in sends])
            else:
                _tcp_alltoall(c, parts, sends, take)

        failed = self._run(ctx, body)
        return {p: t for p, t in got.items() if p not in failed}, failed


def _tcp_alltoall(ctx: OpContext, parts: tuple[int, ...], sends: list[torch.Tensor],
                  take: Callable[[int, int], torch.Tensor]) -> None:
    """The sized all_to_all over TCP frames: each frame says its own size."""
    pos = {r: i for i, r in enumerate(parts)}
    for p in ctx.peers:
        ctx.send(p, 0, sends[pos[p]])
    me = pos[ctx.me]
    take(me, sends[me].numel()).copy_(sends[me])
    for p in ctx.peers:
        x = ctx.recv(p, 0, torch.uint8, -1)
        if x is not None:
            take(pos[p], x.numel()).copy_(x)
