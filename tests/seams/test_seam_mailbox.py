"""The mailbox in-process: matching, ordering, failure wake-ups, and what it never keeps."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from elasticpg.core.framing import Header, MsgType, OpKind
from elasticpg.errors import CollectiveMismatchError, OperationTimeoutError, PeerFailedError
from elasticpg.transport.mailbox import Mailbox, ViewLagError


def coll(src: int, seq: int, step: int = 0, value: int = 0) -> tuple[Header, torch.Tensor]:
    return (Header(MsgType.COLL, src, 1, OpKind.ALLREDUCE, seq=seq, step=step),
            torch.tensor([value], dtype=torch.uint8))


def p2p(src: int, tag: int, value: int) -> tuple[Header, torch.Tensor]:
    return Header(MsgType.P2P, src, 1, OpKind.SEND, tag=tag), torch.tensor([value],
                                                                           dtype=torch.uint8)


class Done:
    """An on_done callback that records what it got."""

    def __init__(self) -> None:
        self.frames: list = []
        self.errors: list = []

    def __call__(self, frame, error) -> None:
        (self.errors if error is not None else self.frames).append(error or frame)


def later(fn, delay: float = 0.05) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(delay), fn()))
    t.start()
    return t


def test_early_collective_frames_wait_and_are_taken_once():
    mb = Mailbox()
    mb.deliver_coll(*coll(1, seq=5, value=9))
    h, payload = mb.take_coll(1, 5, 0, time.monotonic() + 1)
    assert h.seq == 5 and payload.item() == 9
    with pytest.raises(OperationTimeoutError, match="rank 1 in collective #5"):
        mb.take_coll(1, 5, 0, time.monotonic() + 0.05)


def test_a_failure_wakes_a_waiter_at_once():
    mb = Mailbox()
    t = later(lambda: mb.fail_peer(2, "connection closed"))
    t0 = time.monotonic()
    with pytest.raises(PeerFailedError, match="connection closed"):
        mb.take_coll(2, 0, 0, time.monotonic() + 30)
    assert time.monotonic() - t0 < 10  # woken, not timed out
    t.join()


def test_an_abort_wakes_every_collective_waiter():
    mb = Mailbox()
    t = later(lambda: mb.abort(3, "rank 1 called BROADCAST"))
    with pytest.raises(CollectiveMismatchError, match="BROADCAST"):
        mb.take_coll(2, 3, 0, time.monotonic() + 30)
    t.join()


def test_frames_of_an_ended_collective_are_dropped_not_kept():
    # Before: a frame arriving after its collective ended (a lagging peer, a peer counted out)
    # stayed in the mailbox for the life of the group.
    mb = Mailbox()
    mb.forget_seq(7)
    for seq in range(8):
        mb.deliver_coll(*coll(1, seq))
    assert not mb._coll
    mb.deliver_coll(*coll(1, 8))  # the next collective's frame still waits for it
    assert list(mb._coll) == [(1, 8, 0)]
    mb.forget_seq(8)
    assert not mb._coll


def test_a_joiner_restarts_the_numbering():
    mb = Mailbox()
    mb.forget_seq(500)  # e.g. local collectives while isolated
    mb.restart_at(40)  # admitted: the group is at collective #40
    mb.deliver_coll(*coll(1, 40))
    assert mb.take_coll(1, 40, 0, time.monotonic() + 1)[0].seq == 40


def test_a_joiner_keeps_the_frames_members_sent_before_it_saw_its_admission():
    # Before: restart_at dropped every queued frame. Over TCP the members' first collective
    # with the joiner can arrive before the joiner has read its admission, and the joiner then
    # waited for it until the timeout (while the members waited for the joiner's next one).
    mb = Mailbox()
    mb.deliver_coll(*coll(1, 39, value=1))  # older than the admission: never taken
    mb.deliver_coll(*coll(1, 40, value=2))
    mb.deliver_coll(*coll(2, 41, value=3))
    mb.restart_at(40)
    assert mb.take_coll(1, 40, 0, time.monotonic() + 1)[1].item() == 2
    assert mb.take_coll(2, 41, 0, time.monotonic() + 1)[1].item() == 3
    with pytest.raises(OperationTimeoutError):
        mb.take_coll(1, 39, 0, time.monotonic() + 0.05)


def test_p2p_is_fifo_per_source_and_tag():
    mb = Mailbox()
    for v in (1, 2, 3):
        mb.deliver_p2p(*p2p(0, 7, v))
    mb.deliver_p2p(*p2p(0, 8, 9))
    got = Done()
    for _ in range(3):
        mb.post_p2p(0, 7, got)
    assert [f[1].item() for f in got.frames] == [1, 2, 3]


def test_any_source_takes_the_oldest_arrival():
    mb = Mailbox()
    mb.deliver_p2p(*p2p(2, 0, 20))
    mb.deliver_p2p(*p2p(1, 0, 10))
    mb.deliver_p2p(*p2p(2, 0, 21))
    got = Done()
    for _ in range(3):
        mb.post_p2p(None, 0, got)
    assert [(f[0].src, f[1].item()) for f in got.frames] == [(2, 20), (1, 10), (2, 21)]


def test_a_posted_receive_completes_on_arrival_and_fails_with_its_peer():
    mb = Mailbox()
    first, second = Done(), Done()
    mb.post_p2p(1, 0, first)
    mb.post_p2p(2, 0, second)
    mb.deliver_p2p(*p2p(1, 0, 5))
    mb.fail_peer(2, "eof")
    assert first.frames[0][1].item() == 5
    assert isinstance(second.errors[0], PeerFailedError)
    late = Done()
    mb.post_p2p(2, 0, late)  # a receive from a peer already known failed fails at once
    assert isinstance(late.errors[0], PeerFailedError)


def test_unreceived_messages_of_a_slot_that_left_are_discarded():
    # Before: they stayed forever, and a replacement process in that slot could have its
    # predecessor's message matched to a receive meant for it.
    mb = Mailbox()
    for v in range(5):
        mb.deliver_p2p(*p2p(3, v % 2, v))
    mb.deliver_p2p(*p2p(1, 0, 42))
    assert mb.discard_p2p(3) == 5
    got = Done()
    mb.post_p2p(None, 0, got)
    assert got.frames[0][1].item() == 42
    assert not mb._p2p_order or len(mb._p2p_order) == 0


def test_close_cancels_every_posted_receive():
    mb = Mailbox()
    got = Done()
    mb.post_p2p(None, 0, got)
    mb.close("group destroyed")
    assert isinstance(got.errors[0], OperationTimeoutError)
    with pytest.raises(OperationTimeoutError, match="group closed"):
        mb.take_coll(0, 0, 0, time.monotonic() + 1)


def test_a_posted_destination_takes_only_its_own_frame_of_its_size():
    mb = Mailbox()
    dest = torch.zeros(8, dtype=torch.uint8)
    mb.expect(1, 5, 0, dest)
    h = Header(MsgType.COLL, 1, 8, OpKind.ALLGATHER, seq=5)
    assert mb.buffer_for(Header(MsgType.COLL, 2, 8, OpKind.ALLGATHER, seq=5)) is None  # other src
    assert mb.buffer_for(Header(MsgType.COLL, 1, 4, OpKind.ALLGATHER, seq=5)) is None  # size
    mb.expect(1, 5, 0, dest)  # the size check consumed the posting: post again
    assert mb.buffer_for(h) is dest
    assert mb.buffer_for(h) is None  # used once
    mb.expect(1, 6, 0, dest)
    mb.forget_seq(6)  # its collective ended: a late frame must not land in the output
    assert mb.buffer_for(Header(MsgType.COLL, 1, 8, OpKind.ALLGATHER, seq=6)) is None
    mb.expect(1, 3, 0, dest)  # an ended collective: nothing is posted
    assert mb.buffer_for(Header(MsgType.COLL, 1, 8, OpKind.ALLGATHER, seq=3)) is None


def coll_under(src: int, seq: int, step: int, epoch: int) -> tuple[Header, torch.Tensor]:
    return (Header(MsgType.COLL, src, 1, OpKind.ALLREDUCE, epoch=epoch, seq=seq, step=step),
            torch.tensor([0], dtype=torch.uint8))


@pytest.mark.parametrize("frame,why", [
    (coll_under(1, 5, 0, epoch=2), "under view 2"),  # another view: another layout, no step 2
    (coll_under(1, 6, 0, epoch=1), "moved on to collective #6"),  # finished #5 without us
])
def test_a_frame_proving_the_awaited_one_never_comes_ends_the_wait_as_view_lag(frame, why):
    """Waiting in #5 (view 1) for rank 1's step 2: its frame of #5 under view 2, or of #6,
    wakes the wait at once, whether it came before the wait or during it."""
    for early in (True, False):
        mb = Mailbox()
        t = None
        if early:
            mb.deliver_coll(*frame)
        else:
            t = later(lambda box=mb: box.deliver_coll(*frame))
        t0 = time.monotonic()
        with pytest.raises(ViewLagError, match=why):
            mb.take_coll(1, 5, 2, time.monotonic() + 30, epoch=1)
        assert time.monotonic() - t0 < 10  # woken, not timed out
        if t is not None:
            t.join()


def test_frames_that_prove_nothing_about_the_awaited_one_leave_the_wait_alone():
    """Another step of the same collective under the same view (sent first), another rank's
    frame under another view, an older collective's straggler: the wait goes on, and takes
    its frame when it comes."""
    mb = Mailbox()
    for h, payload in (coll_under(1, 5, 3, epoch=1), coll_under(2, 5, 0, epoch=2),
                       coll_under(2, 6, 0, epoch=1), coll_under(1, 4, 0, epoch=0)):
        mb.deliver_coll(h, payload)
    t = later(lambda: mb.deliver_coll(*coll_under(1, 5, 2, epoch=1)))
    h, _ = mb.take_coll(1, 5, 2, time.monotonic() + 30, epoch=1)
    assert (h.src, h.seq, h.step) == (1, 5, 2)
    t.join()
