"""The byte exchange under dispatch and combine: one all_to_all round of the group.

It is the group's own all_to_all (collectives: shared memory when every participant is on this
host, TCP frames otherwise), run as one collective of the group, so it shares the group's
sequence numbers, failure handling and views: each rank's bytes go straight to their
destination, and nothing is gathered anywhere. What this module adds is the EP timeout rule: a
peer that has not posted by `deadline` counts as having sent nothing (instead of failing the
call), and is reported to the group as failed so that every member stops waiting for it.
"""

from __future__ import annotations

import logging
import time

import torch

from ..collectives import algorithms, shm_algorithms
from ..collectives.context import OpContext, OpSpec
from ..core.dtypes import dtype_code
from ..core.framing import OpKind
from ..group.runtime import GroupRuntime

log = logging.getLogger("elasticpg.ep")

# root-field codes: they make each EP round its own call, so ranks that made different calls
# (one in dispatch, one in combine) get a mismatch error instead of reading the wrong bytes
HEADER_ROUND, DISPATCH_ROUND, COMBINE_ROUND, MEMBER_ROUND = 0x4550, 0x4551, 0x4552, 0x4553
_UINT8 = dtype_code(torch.uint8)


class Exchange:
    def __init__(self, runtime: GroupRuntime) -> None:
        self.rt = runtime

    def participants(self) -> tuple[int, ...]:
        """Settle membership at this operation boundary; who the next round runs over."""
        return self.rt.prepare()

    def alltoall(self, round_code: int, parts: tuple[int, ...], sends: list[torch.Tensor],
                 recvs: list[torch.Tensor], bound: float) -> set[int]:
        """recvs[i] = the bytes participant parts[i] sent us; sends[i] goes to it. Sizes are
        agreed beforehand (a header round). Returns the peers whose bytes did not arrive whole
        (failed, excluded, or silent for `bound` seconds from the start of this round); their
        recvs hold no meaning. Each round has its own bound: a peer given up on in one round
        must not leave the others none to answer the next."""
        rt = self.rt
        spec = OpSpec(OpKind.ALLTOALL_SINGLE, _UINT8, 0, round_code)
        lane = rt.lane()
        ctx = lane.begin(spec) if lane is not None and parts == lane.ctx.participants \
            else rt.new_op(spec, parts)
        ctx.deadline = time.monotonic() + bound
        ctx.give_up_on_timeout = True
        ctx.timed_out.clear()

        def body(c: OpContext) -> None:
            if c.shm is not None:
                shm_algorithms.alltoall(c.shm, [r.numpy() for r in recvs],
                                        [s.numpy() for s in sends])
            else:
                algorithms.alltoall(c, recvs, sends, range(len(parts)))
            for p in sorted(c.timed_out - c.lagged):
                # the group learns it here, so the view (mode a) leaves it out from now on
                rt.fail_peer(p, f"rank {p} did not answer rank {rt.rank}'s expert-parallel "
                                f"exchange within its timeout", how="ep_timeout")

        try:
            rt.run(ctx, body)
        finally:
            ctx.give_up_on_timeout = False  # the lane's context is reused by other collectives
        failed = set(ctx.failed)
        if ctx.timed_out:
            log.warning("rank %d: expert-parallel exchange gave up on ranks %s (timeout)",
                        rt.rank, sorted(ctx.timed_out))
        return failed
