"""One collective's context with a fake link: the exclusion rule, mismatch detection and view
lag, decided from frames alone."""

from __future__ import annotations

import time

import pytest
import torch

from elasticpg.collectives import algorithms as alg
from elasticpg.collectives.context import OpContext, OpSpec
from elasticpg.core.dtypes import dtype_code
from elasticpg.core.framing import Header, MsgType, OpKind
from elasticpg.core.reduction import Reduce
from elasticpg.errors import CollectiveMismatchError
from elasticpg.transport.mailbox import Mailbox


class FakeLink:
    """Records what the context sends; peers' frames are put in its mailbox by the test."""

    def __init__(self) -> None:
        self.mailbox = Mailbox()
        self.sent: list[tuple[int, Header]] = []
        self.reported: list[tuple[int, list[int], str]] = []
        self.decisions: list[int] = []

    def send_frame(self, peer, header, payload, deadline) -> None:
        self.sent.append((peer, header))

    def report_mismatch(self, seq, peers, reason) -> None:
        self.reported.append((seq, peers, reason))

    def note_decision(self, epoch, active) -> None:
        self.decisions.append(epoch)

    probes: dict[int, bool] = {}  # peer -> "it posted this collective in shared memory"

    def scratch(self, peer, seq, nbytes):
        return torch.empty(nbytes, dtype=torch.uint8)

    def shm_probe(self, peer, seq, epoch):
        if peer not in self.probes:
            return None
        return lambda: self.probes[peer]

    def excluded_after(self, peer, epoch):
        return False


def _ctx(link: FakeLink, numel: int = 3, epoch: int = 2) -> OpContext:
    spec = OpSpec(OpKind.ALLREDUCE, dtype_code(torch.float32), numel, -1, int(Reduce.SUM))
    return OpContext(link, 0, (0, 1, 2, 3), seq=11, epoch=epoch, spec=spec,
                     deadline=time.monotonic() + 5)


def _frame_from(ctx: OpContext, src: int, values, **changes) -> None:
    t = torch.tensor(values, dtype=torch.float32)
    fields = dict(kind=ctx.spec.kind, dtype=ctx.spec.dtype, redop=ctx.spec.redop,
                  epoch=ctx.epoch, seq=ctx.seq, step=0, numel=ctx.spec.numel, root=-1,
                  ready=0)
    fields.update(changes)
    h = Header(MsgType.COLL, src, t.numel() * 4, **fields)
    ctx.link.mailbox.deliver_coll(h, t.view(torch.uint8))


def test_all_contributions_are_reduced_in_rank_order():
    link = FakeLink()
    ctx = _ctx(link)
    for src in (1, 2, 3):
        _frame_from(ctx, src, [float(src)] * 3)
    t = torch.zeros(3)
    alg.allreduce(ctx, t, Reduce.SUM)
    assert t.tolist() == [6.0] * 3
    assert [p for p, _ in link.sent] == ctx.peers and not ctx.failed


def test_a_peer_that_fails_first_is_excluded_and_reported():
    link = FakeLink()
    ctx = _ctx(link)
    _frame_from(ctx, 1, [1.0] * 3)
    _frame_from(ctx, 3, [3.0] * 3)
    link.mailbox.fail_peer(2, "connection closed")
    t = torch.zeros(3)
    alg.allreduce(ctx, t, Reduce.SUM)
    assert t.tolist() == [4.0] * 3  # exactly the contributions received whole
    assert ctx.failed_peers == {2}


def test_a_frame_of_another_call_is_a_mismatch_told_to_everyone():
    link = FakeLink()
    ctx = _ctx(link)
    _frame_from(ctx, 1, [1.0] * 3)
    _frame_from(ctx, 2, [2.0] * 3, kind=OpKind.BROADCAST)
    _frame_from(ctx, 3, [3.0] * 3)
    with pytest.raises(CollectiveMismatchError, match="rank 2 called BROADCAST"):
        alg.allreduce(ctx, torch.zeros(3), Reduce.SUM)
    assert link.reported and link.reported[0][1] == [1, 2, 3]


def test_a_size_disagreement_under_another_view_is_lag_not_a_mismatch():
    link = FakeLink()
    ctx = _ctx(link, numel=3, epoch=2)
    _frame_from(ctx, 1, [1.0] * 3)
    _frame_from(ctx, 2, [2.0] * 4, epoch=1, numel=4)  # laid out by an older view
    _frame_from(ctx, 3, [3.0] * 3)
    t = torch.zeros(3)
    alg.allreduce(ctx, t, Reduce.SUM)
    assert t.tolist() == [4.0] * 3
    assert ctx.lagged == {2} and ctx.failed_peers == set()  # skipped, not failed
    assert not link.reported


def test_the_same_disagreement_within_one_view_is_a_mismatch():
    link = FakeLink()
    ctx = _ctx(link, numel=3, epoch=2)
    _frame_from(ctx, 1, [1.0] * 4, numel=4)
    with pytest.raises(CollectiveMismatchError, match="rank 1 sent 4 elements"):
        alg.allreduce(ctx, torch.zeros(3), Reduce.SUM)


def test_a_same_host_peer_on_shared_memory_is_view_lag_not_a_failure():
    """A rank on the old (multi-host, TCP) view waits for a neighbour that applied the new
    (one-host) view and posted in shared memory: its frame never comes; the wait ends as lag."""
    link = FakeLink()
    link.probes = {1: True}
    ctx = _ctx(link)
    t0 = time.monotonic()
    assert ctx.recv(1, 0, torch.float32, 3) is None
    assert time.monotonic() - t0 < 1.0
    assert ctx.lagged == {1} and ctx.failed_peers == set()
