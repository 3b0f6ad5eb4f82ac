"""TCP links in one process: a reader never dies unreported, every send is bounded, and a
send stuck behind a peer that stopped reading is noticed by the heartbeat."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from elasticpg.core.framing import MAX_PAYLOAD, Header, MsgType, OpKind
from elasticpg.transport.tcp import SendTimeoutError, TcpTransport

SECRET = b"s" * 32


class Peer:
    """One transport and what its callbacks saw."""

    def __init__(self, rank: int, on_frame=None) -> None:
        self.frames: list[Header] = []
        self.lost: list[tuple[int, str]] = []
        self.lost_event = threading.Event()
        self.t = TcpTransport(rank, SECRET, "g", "127.0.0.1",
                              on_frame=on_frame or (lambda h, p: self.frames.append(h)),
                              on_lost=self._lost)

    def _lost(self, peer: int, reason: str, incarnation: int) -> None:
        self.lost.append((peer, reason))
        self.lost_event.set()


@pytest.fixture
def pair():
    made: list[Peer] = []

    def make(on_frame_b=None) -> tuple[Peer, Peer]:
        a, b = Peer(0), Peer(1, on_frame_b)
        made.extend([a, b])
        a.t.connect(1, *b.t.endpoint, timeout=5.0)
        return a, b

    yield make
    for p in made:
        p.t.close()


def _frame(n: int) -> tuple[Header, memoryview]:
    payload = torch.zeros(n, dtype=torch.uint8)
    return Header(MsgType.P2P, 0, n, OpKind.SEND, tag=1), memoryview(payload.numpy())


def test_an_exception_while_handling_a_frame_fails_the_link_cleanly(pair):
    # Before: only OSError/FramingError/ConnectionError were caught, so this ended the reader
    # thread without on_lost: the healthy peer would later have looked hung.
    def explode(h, p):
        raise KeyError("a bug in a frame handler")

    a, b = pair(explode)
    a.t.send(1, *_frame(10), deadline=time.monotonic() + 5)
    assert b.lost_event.wait(10)
    assert b.lost[0][0] == 0 and "reader error: KeyError" in b.lost[0][1]
    assert not b.t.has_incoming(0)


def test_an_absurd_size_from_an_authenticated_peer_fails_the_link(pair):
    # Before: the reader tried torch.empty(2**62), got a RuntimeError and died silently.
    a, b = pair()
    sock = a.t._out[1]
    sock.sendall(Header(MsgType.P2P, 0, MAX_PAYLOAD * 4).pack())
    assert b.lost_event.wait(10)
    assert "FramingError" in b.lost[0][1] and "payload bytes" in b.lost[0][1]


def test_a_send_to_a_peer_that_stopped_reading_ends_by_its_deadline(pair):
    # Before: sendall had no timeout, so this send blocked forever.
    release = threading.Event()

    def stall(h, p):
        release.wait(30)  # the peer's reader stops reading

    a, b = pair(stall)
    header, payload = _frame(64 << 20)  # more than both socket buffers hold
    t0 = time.monotonic()
    with pytest.raises(SendTimeoutError, match="stopped reading"):
        for _ in range(4):
            a.t.send(1, header, payload, deadline=time.monotonic() + 1.0)
    assert time.monotonic() - t0 < 10
    release.set()


def test_the_heartbeat_reports_a_send_that_makes_no_progress(pair):
    # Before: a link whose send lock was held was skipped, i.e. a blocked send was taken as
    # proof of life.
    release = threading.Event()
    a, b = pair(lambda h, p: release.wait(30))
    header, payload = _frame(64 << 20)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for _ in range(4):
                a.t.send(1, header, payload, deadline=time.monotonic() + 60)
        except OSError as exc:
            errors.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    stuck: list[int] = []
    deadline = time.monotonic() + 20
    while not stuck and time.monotonic() < deadline:
        stuck = a.t.heartbeat(idle=0.05, bound=0.5)
        time.sleep(0.05)
    assert [peer for peer, _sock in stuck] == [1]
    a.t.drop(1)  # what the runtime does with a stuck link: it wakes the blocked sender
    sender.join(10)
    assert not sender.is_alive() and errors
    release.set()


def test_heartbeats_go_out_on_idle_links_only(pair):
    a, b = pair()
    assert a.t.heartbeat(idle=0.0, bound=1.0) == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and b.t.silent(bound=10.0):
        time.sleep(0.01)
    assert b.t.silent(bound=10.0) == []
