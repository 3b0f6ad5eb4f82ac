"""The split TCP collectives, n ranks in threads over a loopback link.

all_reduce as reduce-scatter + all-gather, its slices whole or pipelined in chunks:
bit-identical to the direct exchange, and under a rank that dies after any number of its
frames, every survivor finishes with the reduction over every participant or over exactly the
ranks whose raw tensor it received whole, never a mix of slices. broadcast as scatter +
all-gather: under a relay or the root dying after any number of its frames, every rank that
did not see the root fail ends with the root's tensor."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from elasticpg.collectives import algorithms as alg
from elasticpg.collectives.context import OpContext, OpSpec
from elasticpg.core import schedules
from elasticpg.core.dtypes import dtype_code
from elasticpg.core.framing import OpKind
from elasticpg.core.reduction import Reduce, reduce_into
from elasticpg.core.schedules import (
    SPLIT_ALLREDUCE_FROM,
    pipeline_chunks,
    split_allreduce,
    split_broadcast,
)
from elasticpg.transport.mailbox import Mailbox

N = 4
FALLBACK_STEP, FIRST_RAW_STEP = 1, 2  # see collectives/algorithms.py


@pytest.fixture(params=["whole slices", "chunks"])
def chunking(request, monkeypatch):
    """Run each test with one chunk per slice (the sizes here) and with 3-4 chunks each."""
    if request.param == "chunks":
        monkeypatch.setattr(schedules, "PIPELINE_CHUNK", 48 << 10)
    return request.param


class DiedError(Exception):
    """The rank's process is gone (its thread stops here)."""


class LoopLink:
    """One rank's link: frames land in the destination rank's mailbox (in its posted buffer
    when there is one, as the TCP reader does). `die_after` sends, the rank dies: every peer
    sees its connection close after the frames it did send."""

    def __init__(self, me: int, links: dict[int, LoopLink], die_after: int | None = None):
        self.me, self.links, self.die_after = me, links, die_after
        self.mailbox = Mailbox()
        self.steps: list[int] = []
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}

    def send_frame(self, peer, header, payload, deadline) -> None:
        if self.die_after is not None and len(self.steps) >= self.die_after:
            for r, link in self.links.items():
                if r != self.me:
                    link.mailbox.fail_peer(self.me, "connection closed")
            raise DiedError
        self.steps.append(header.step)
        box = self.links[peer].mailbox
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) \
            else torch.empty(0, dtype=torch.uint8)
        dest = box.buffer_for(header)
        if dest is not None:
            dest.copy_(data)
            data = dest
        box.deliver_coll(header, data)

    def report_mismatch(self, seq, peers, reason) -> None:
        raise AssertionError(reason)

    def note_decision(self, epoch, active) -> None:
        pass

    def shm_probe(self, peer, seq, epoch):
        return None

    def excluded_after(self, peer, epoch):
        return False

    def scratch(self, peer, seq, nbytes):
        key = (peer, seq & 1)
        if key not in self._scratch or self._scratch[key].numel() != nbytes:
            self._scratch[key] = torch.empty(nbytes, dtype=torch.uint8)
        return self._scratch[key]


def _run(inputs: list[torch.Tensor], op: Reduce | None, dying: int | None = None,
         die_after: int | None = None, seq: int = 5, root: int | None = None,
         views: dict[int, tuple[tuple[int, ...], int]] | None = None):
    """all_reduce (op) or broadcast from `root` (op None), one thread per rank; `views`:
    the (participants, epoch) a rank runs it under, if not all of them under epoch 1."""
    links: dict[int, LoopLink] = {}
    for r in range(len(inputs)):
        links[r] = LoopLink(r, links, die_after if r == dying else None)
    if op is None:
        assert root is not None
        spec = OpSpec(OpKind.BROADCAST, dtype_code(inputs[0].dtype), inputs[0].numel(), root)
    else:
        spec = OpSpec(OpKind.ALLREDUCE, dtype_code(inputs[0].dtype), inputs[0].numel(), -1,
                      int(op))
    everyone = (tuple(range(len(inputs))), 1)
    ctxs = {}
    for r in links:
        parts, epoch = (views or {}).get(r, everyone)
        ctxs[r] = OpContext(links[r], r, parts, seq=seq, epoch=epoch, spec=spec,
                            deadline=time.monotonic() + 10)
    outs = [t.clone() for t in inputs]
    errors: list[BaseException] = []

    def body(r: int) -> None:
        try:
            if op is None:
                alg.broadcast(ctxs[r], outs[r], root)
            else:
                alg.allreduce(ctxs[r], outs[r], op)
        except DiedError:
            pass
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in links]
    for th in threads:
        th.start()
    for th in threads:
        th.join(15)
    assert not any(th.is_alive() for th in threads), "a rank hung"
    assert not errors, errors
    return outs, ctxs, links


def _numel(dtype: torch.dtype) -> int:
    return SPLIT_ALLREDUCE_FROM // dtype.itemsize + 13  # uneven slices


@pytest.mark.parametrize("dtype,op", [(torch.float32, Reduce.SUM), (torch.bfloat16, Reduce.AVG),
                                      (torch.int64, Reduce.MAX), (torch.float64, Reduce.PRODUCT)])
def test_bit_identical_to_the_direct_exchange(dtype, op, chunking):
    g = torch.Generator().manual_seed(7)
    n = _numel(dtype)
    slices = split_allreduce(n * dtype.itemsize, n, N)
    assert slices is not None
    nchunks = len(pipeline_chunks(slices, dtype.itemsize)[0])
    assert (nchunks > 1) == (chunking == "chunks")
    inputs = [(torch.rand(n, generator=g) * 4 + 0.5).to(dtype) for _ in range(N)]
    want = torch.empty_like(inputs[0])
    reduce_into(want, inputs, op)  # the direct exchange's reduction: ascending rank order
    outs, ctxs, links = _run(inputs, op)
    for r in range(N):
        assert torch.equal(outs[r].view(torch.uint8), want.view(torch.uint8)), r
        assert not ctxs[r].failed
        assert FALLBACK_STEP not in links[r].steps  # no fallback when nothing failed
        # one raw slice per peer (in nchunks frames), not the tensor; each reduced chunk once
        assert len(links[r].steps) == (N - 1) * (2 * nchunks + 1)
        assert links[r].steps.count(FIRST_RAW_STEP) == N - 1


def test_the_next_op_reuses_buffers_without_crosstalk(chunking):
    n = _numel(torch.float32)
    for seq in (5, 6, 7):
        inputs = [torch.full((n,), float(seq * 10 + r)) for r in range(N)]
        outs, _, _ = _run(inputs, Reduce.SUM, seq=seq)
        assert all(torch.equal(o, torch.full((n,), float(seq * 40 + 6))) for o in outs)


def test_a_rank_dying_after_any_number_of_frames(chunking):
    """Rank r contributes 2**r, so a result names the ranks it covers. Every kill point of
    rank 2 over its whole schedule (raw chunks, reduced chunks or its "incomplete" mark,
    status, raw tensors)."""
    n = _numel(torch.float64)
    inputs = [torch.full((n,), float(2 ** r), dtype=torch.float64) for r in range(N)]
    every = float(2 ** N - 1)
    survivors_only = every - 4
    total = len(_run(inputs, Reduce.SUM)[2][2].steps)
    seen = set()
    for k in range(total + 4):
        outs, ctxs, _ = _run(inputs, Reduce.SUM, dying=2, die_after=k)
        for r in (0, 1, 3):
            vals = set(outs[r].tolist())
            assert len(vals) == 1, (k, r, "a mix of slices")
            (v,) = vals
            assert v in (every, survivors_only), (k, r, v)
            if v == survivors_only:
                assert ctxs[r].failed_peers == {2}, (k, r)  # excluded only if seen to fail
            seen.add(v)
    assert seen == {every, survivors_only}


def test_a_peer_that_runs_it_under_a_newer_view_is_skipped_not_waited_for():
    """The chaos run's hang: rank 2 of three died; rank 1 applied the view without it first and
    runs the next large all_reduce as the direct exchange of two (view 2), while rank 0, still
    under view 1, runs the split form over three and waits for rank 1's raw slice, a step
    rank 1 never sends. Each sees the other's frames of this collective under another view
    (view lag): both finish at once without the other, instead of at their timeout."""
    n = _numel(torch.float64)
    inputs = [torch.full((n,), float(2 ** r), dtype=torch.float64) for r in range(3)]
    views = {0: ((0, 1, 2), 1), 1: ((0, 1), 2), 2: ((0, 1, 2), 1)}
    outs, ctxs, _ = _run(inputs, Reduce.SUM, dying=2, die_after=0, views=views)
    assert torch.equal(outs[0], inputs[0]) and torch.equal(outs[1], inputs[1])
    assert ctxs[0].lagged == {1} and ctxs[0].failed_peers == {2}
    assert ctxs[1].lagged == {0} and not ctxs[1].failed_peers


# ---------------------------------------------------------------- broadcast as scatter + gather
@pytest.fixture
def small_split_broadcast(monkeypatch):
    """Split broadcasts from 1 MiB (slices still above EXPECT_FROM: received in place)."""
    monkeypatch.setattr(schedules, "SPLIT_BROADCAST_FROM", 1 << 20)


def _bcast_numel() -> int:
    return schedules.SPLIT_BROADCAST_FROM // 4 + 7  # float32, uneven slices


def test_split_broadcast_delivers_the_roots_tensor(small_split_broadcast):
    n = _bcast_numel()
    assert split_broadcast(n * 4, n, N) is not None
    for root in range(N):
        inputs = [torch.full((n,), -1.0) for _ in range(N)]
        inputs[root] = torch.arange(n, dtype=torch.float32)
        outs, ctxs, links = _run(inputs, None, root=root)
        for r in range(N):
            assert torch.equal(outs[r], inputs[root]), (root, r)
            assert not ctxs[r].failed
        assert len(links[root].steps) == N - 1  # one slice per rank, no fallback
        for r in set(range(N)) - {root}:
            assert len(links[r].steps) == N - 1  # relays to N-2 ranks, DONE to the root


@pytest.mark.parametrize("dying", [0, 2], ids=["the root", "a relay"])
def test_split_broadcast_under_a_rank_dying_after_any_number_of_frames(dying,
                                                                      small_split_broadcast):
    """The root is rank 0. A rank that did not see the root fail ends with its tensor; one
    that did may hold part of it (as the direct broadcast: nothing else was received)."""
    n = _bcast_numel()
    inputs = [torch.full((n,), -1.0) for _ in range(N)]
    inputs[0] = torch.arange(n, dtype=torch.float32)
    total = len(_run(inputs, None, root=0)[2][dying].steps)
    for k in range(total + 2):
        outs, ctxs, _ = _run(inputs, None, dying=dying, die_after=k, root=0)
        for r in set(range(N)) - {dying, 0}:
            if 0 in ctxs[r].failed:
                assert dying == 0, (k, r)
                continue
            assert torch.equal(outs[r], inputs[0]), (k, r)
            assert ctxs[r].failed_peers <= {dying}, (k, r)
