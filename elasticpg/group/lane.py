"""The steady-state fast path: one OpContext (and one ShmOp when every participant shares this
host) built once and reused by every collective while membership stays the same.

A small collective costs a few microseconds of data movement over shared memory, so building
the per-operation objects (participants, peer order, mapped regions, context, shared-memory
state) dominated its latency. The lane keeps them and only resets what differs between calls.
Over TCP (no participant, or not all, on this host) the context alone is kept: there a small
collective's own cost is a round trip, and building the context is CPU time that two
oversubscribed cores take from that round trip. It changes no protocol: the algorithms run
exactly as on the general path, and anything unusual inside an operation (a peer late, failed,
or disagreeing) is handled by the same code.
The lane is used only while the view it was built for is current and nothing is pending (no
failure to settle, no poison, normal mode); otherwise the caller takes the general path.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..collectives.context import OpContext, OpSpec
from ..collectives.shm_exchange import ShmOp, expect_words
from ..core.framing import OpKind
from ..core.membership import View

if TYPE_CHECKING:
    from .runtime import GroupRuntime


class Lane:
    def __init__(self, runtime: GroupRuntime, view: View, regions: dict | None) -> None:
        """`regions`: every peer's mapped shared memory, or None when the op does not run
        over shared memory (exactly when the general path's new_op sets no ShmOp)."""
        self.view = view
        self.runtime = runtime
        self.ctx = OpContext(runtime, runtime.rank, view.active, 0, view.epoch,
                             OpSpec(OpKind.BARRIER), 0.0)
        self.sx = None if regions is None else ShmOp(self.ctx, runtime.shm, regions)
        self.ctx.shm = self.sx

    def begin(self, spec: OpSpec) -> OpContext:
        """The reused context, reset for a new collective with sequence number rt._seq."""
        rt, ctx, sx = self.runtime, self.ctx, self.sx
        ctx.seq = rt._seq
        rt._seq += 1
        ctx.spec = spec
        ctx.deadline = time.monotonic() + rt.timeout
        ctx.ready = rt.state.joiners.digest
        if ctx.failed:
            ctx.failed.clear()
            ctx.lagged.clear()
        ctx.heard_ready.clear()
        if sx is not None:
            sx.expect = expect_words(spec)
        return ctx
