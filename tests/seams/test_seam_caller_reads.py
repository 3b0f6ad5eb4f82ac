"""The caller reading its own TCP links (TcpTransport.pump via Mailbox.take_coll), in one
process over real sockets: ownership passes between the reader thread and the caller without
splitting, losing or reordering a frame; an EOF, a GOODBYE or a corrupt frame the caller meets
is reported as the reader would report it, within the lease; P2P frames and closing are not
held up by a caller that owns the link."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from elasticpg.core.framing import HEADER_SIZE, Header, MsgType, OpKind
from elasticpg.errors import OperationTimeoutError, PeerFailedError
from elasticpg.transport import tcp
from elasticpg.transport.mailbox import Mailbox
from elasticpg.transport.tcp import TcpTransport

SECRET = b"c" * 32
BOUND = 2.0  # generous: a loaded 2-core machine; what these tests check is "not a timeout"


class Receiver:
    """Rank 1: a transport whose collective frames go to a mailbox that pumps its links."""

    def __init__(self) -> None:
        self.mailbox = Mailbox()
        self.lost: list[tuple[int, str]] = []
        self.lost_event = threading.Event()
        self.readers: list[str] = []  # which thread handed over each frame
        self.t = TcpTransport(1, SECRET, "g", "127.0.0.1", on_frame=self._frame,
                              on_lost=self._lost, buffer_for=self.mailbox.buffer_for)
        self.mailbox.attach_pump(self.t.pump)

    def _frame(self, h: Header, p: torch.Tensor) -> None:
        self.readers.append(threading.current_thread().name)
        if h.type == MsgType.COLL:
            self.mailbox.deliver_coll(h, p)
        elif h.type == MsgType.P2P:
            self.mailbox.deliver_p2p(h, p)

    def _lost(self, peer: int, reason: str, incarnation: int) -> None:
        self.lost.append((peer, reason))
        self.mailbox.fail_peer(peer, reason)
        self.lost_event.set()

    def take(self, seq: int, timeout: float = BOUND) -> torch.Tensor:
        return self.mailbox.take_coll(0, seq, 0, time.monotonic() + timeout)[1]

    def close(self) -> None:
        self.mailbox.close("test over")
        self.t.close()
        self.mailbox.dispose()


@pytest.fixture
def link():
    made: list = []

    def make() -> tuple[TcpTransport, Receiver]:
        r = Receiver()
        s = TcpTransport(0, SECRET, "g", "127.0.0.1", on_frame=lambda h, p: None,
                         on_lost=lambda *a: None)
        made.extend([r, s])
        s.connect(1, *r.t.endpoint, timeout=5.0)
        deadline = time.monotonic() + BOUND
        while not r.t.has_incoming(0):  # the handshake ends on the reader's side a bit later
            assert time.monotonic() < deadline, "the link never came up"
            time.sleep(0.001)
        return s, r

    yield make
    for x in made:
        x.close()


def coll(seq: int, payload: bytes) -> bytes:
    return Header(MsgType.COLL, 0, len(payload), OpKind.ALLREDUCE, seq=seq).pack() + payload


def body(seq: int, n: int) -> bytes:
    return bytes((seq * 7 + i) % 251 for i in range(n))


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def test_a_frame_split_across_an_ownership_change_arrives_whole(link):
    # Reader -> caller: the reader has part of a header buffered when the caller takes the
    # link; the caller must finish that frame from the buffer the link carries.
    # Caller -> reader: the caller has part of a frame buffered when its wait times out and it
    # hands the link back; the reader must finish it. Sizes cover empty payloads, ones that
    # fit the buffer and one larger than it (the reader's path).
    s, r = link()
    raw = s._out[1]
    state = r.t._links[0]
    for seq, n in enumerate([0, 1, 4, 100, 5000, 40000, 200000]):
        frame = coll(2 * seq, body(seq, n))
        raw.sendall(frame[:HEADER_SIZE - 3])  # the reader owns the link: it buffers these
        wait_until(lambda: state.end - state.start == HEADER_SIZE - 3, "reader never read")
        got: list = []
        taker = threading.Thread(target=lambda k=2 * seq, out=got: out.append(r.take(k)))
        taker.start()
        wait_until(lambda: state.caller, "the caller never got the link")
        raw.sendall(frame[HEADER_SIZE - 3:])
        taker.join(BOUND)
        assert not taker.is_alive() and bytes(got[0].numpy()) == body(seq, n), (n, got)

        frame = coll(2 * seq + 1, body(seq, n))
        cut = min(len(frame) - 1, HEADER_SIZE + n // 2)
        raw.sendall(frame[:cut])
        with pytest.raises(OperationTimeoutError):  # the caller reads what came, then gives up
            r.take(2 * seq + 1, timeout=0.2)
        r.t.release()  # the reader owns it again, with the caller's partial frame
        raw.sendall(frame[cut:])
        assert bytes(r.take(2 * seq + 1).numpy()) == body(seq, n), n
    assert any(not name.startswith("elasticpg-link") for name in r.readers)


def test_back_to_back_waits_keep_the_link_and_the_lease_gives_it_back(link):
    s, r = link()
    for seq in range(50):
        s.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=seq), body(seq, 4))
        assert bytes(r.take(seq).numpy()) == body(seq, 4)
    callers = [n for n in r.readers if not n.startswith("elasticpg-link")]
    assert len(callers) >= 45, r.readers  # the first one or two may come through the reader
    # no call reads now: after the lease the reader delivers (a P2P frame nobody pumps for)
    time.sleep(tcp._LEASE * 3)
    r.readers.clear()
    s.send(1, Header(MsgType.P2P, 0, 1, OpKind.SEND, tag=5), b"x")
    wait_until(lambda: r.readers, "a frame sent after the lease was never read")
    assert r.readers[0].startswith("elasticpg-link")


def test_a_peer_killed_while_the_caller_polls_its_link_is_reported_at_once(link):
    s, r = link()
    s.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=0), body(0, 4))
    r.take(0)  # the caller owns the link now, and waits on it again:
    raw = s._out[1]
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    killed = []
    threading.Thread(target=lambda: (time.sleep(0.05), killed.append(time.monotonic()),
                                     raw.close())).start()
    with pytest.raises(PeerFailedError):
        r.take(1, timeout=30)
    took = time.monotonic() - killed[0]
    assert took < BOUND, took
    assert r.lost and r.lost[0][0] == 0 and "ConnectionResetError" in r.lost[0][1]


def test_a_peer_closing_while_the_caller_holds_an_idle_lease_is_reported(link):
    s, r = link()
    s.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=0), body(0, 4))
    r.take(0)  # the caller's lease runs; nobody reads the link now
    started = time.monotonic()
    s._out[1].close()
    assert r.lost_event.wait(BOUND), "the EOF was never noticed"
    assert time.monotonic() - started < BOUND
    assert r.lost[0] == (0, "connection closed")


def test_a_goodbye_and_a_corrupt_frame_the_caller_reads_are_reported_as_the_reader_would(link):
    s, r = link()
    s.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=0), body(0, 4))
    r.take(0)
    s.leave(1)  # GOODBYE, read by the caller in the next wait
    with pytest.raises(PeerFailedError):
        r.take(1)
    assert r.lost == [(0, "peer left the group")]

    s2, r2 = link()
    s2.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=0), body(0, 4))
    r2.take(0)
    s2._out[1].sendall(Header(MsgType.COLL, 3, 0, OpKind.ALLREDUCE, seq=1).pack())  # src 3
    with pytest.raises(PeerFailedError):
        r2.take(1)
    assert "FramingError" in r2.lost[0][1]


def test_a_frame_larger_than_the_buffer_streams_through_the_reader_between_small_ones(link):
    s, r = link()
    big = torch.arange(1 << 20, dtype=torch.int32).view(torch.uint8)  # 4 MiB
    for seq in range(6):
        if seq % 3 == 1:
            h = Header(MsgType.COLL, 0, big.numel(), OpKind.ALLREDUCE, seq=seq)
            s.send(1, h, memoryview(big.numpy()))
            assert torch.equal(r.take(seq, timeout=10), big)
        else:
            s.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=seq), body(seq, 4))
            assert bytes(r.take(seq).numpy()) == body(seq, 4)


def test_p2p_frames_read_by_the_caller_and_by_the_reader_reach_their_receives(link):
    # interleaved: a receive posted, a collective wait (the caller reads the link and finds
    # the P2P frame first), then a receive whose frame comes after release() gave the link back
    s, r = link()
    got: list = []
    for seq in range(20):
        r.mailbox.post_p2p(0, seq, lambda f, e: got.append((f, e)))
        s.send(1, Header(MsgType.P2P, 0, 1, OpKind.SEND, tag=seq), bytes([seq]))
        s.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=seq), body(seq, 4))
        assert bytes(r.take(seq).numpy()) == body(seq, 4)
        if seq % 2:
            r.t.release()
    wait_until(lambda: len(got) == 20, f"only {len(got)} of 20 receives completed")
    assert [(f[0].tag, int(f[1][0]), e) for f, e in got] == [(i, i, None) for i in range(20)]


def test_closing_ends_a_wait_that_polls_its_link(link):
    s, r = link()
    s.send(1, Header(MsgType.COLL, 0, 4, OpKind.ALLREDUCE, seq=0), body(0, 4))
    r.take(0)
    threading.Thread(target=lambda: (time.sleep(0.05), r.mailbox.close("bye"))).start()
    started = time.monotonic()
    with pytest.raises(OperationTimeoutError, match="group closed"):
        r.take(1, timeout=30)
    assert time.monotonic() - started < BOUND
