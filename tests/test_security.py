"""The data plane admits only peers that prove group membership, and nothing an authenticated
peer sends can crash, hang or silently kill a reader.

In one process: a recorded handshake (captured by a relay between two real transports) replayed
in either direction, a listener or a connector without the secret, malformed and truncated frames
from an authenticated peer. With real ranks: foreign clients on every data port while the group
runs collectives over TCP, a member that corrupts its own link, and the secret kept out of the
store (ELASTICPG_SECRET_FILE) with clear errors for a rank that has another secret or none.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import elasticpg
from elasticpg.api import runtime_of
from elasticpg.control import secret as secrets
from elasticpg.core.dtypes import dtype_code
from elasticpg.core.framing import HEADER_SIZE, Header, MsgType, OpKind
from elasticpg.transport.tcp import _HELLO, _HELLO_MAGIC, HandshakeError, TcpTransport, _mac

from .harness import HOST, error_name, init_group, serving_steps

SECRET = b"k" * 32
BOUND = 5.0  # seconds within which a transport must have closed a connection it refuses


class Side:
    """One transport and what its callbacks saw."""

    def __init__(self, rank: int, secret: bytes = SECRET, handshake_timeout: float = 10.0,
                 **options):
        self.frames: list[Header] = []
        self.lost: list[tuple[int, str]] = []
        self.rejected: list[str] = []
        self.lost_event = threading.Event()
        self.t = TcpTransport(rank, secret, "g", HOST, on_frame=lambda h, p: self.frames.append(h),
                              on_lost=self._lost, handshake_timeout=handshake_timeout,
                              on_rejected=lambda addr, why, s: self.rejected.append(why),
                              **options)

    def _lost(self, peer: int, reason: str, incarnation: int) -> None:
        self.lost.append((peer, reason))
        self.lost_event.set()


@pytest.fixture
def sides():
    made: list[Side] = []

    def make(*args, **kw) -> Side:
        made.append(Side(*args, **kw))
        return made[-1]

    yield make
    for s in made:
        s.t.close()


def _closed_within(sock: socket.socket, bound: float) -> float | None:
    """Seconds until the other end closed `sock` (reading and dropping whatever it sent), or
    None if it was still open after `bound` seconds."""
    start = time.monotonic()
    sock.settimeout(bound)
    try:
        while sock.recv(4096):
            sock.settimeout(max(bound - (time.monotonic() - start), 0.01))
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return None
    return time.monotonic() - start


class Relay:
    """A TCP relay between a connector and a listener that records both directions: what an
    eavesdropper on the wire would capture."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server((HOST, 0))
        self.endpoint = self.listener.getsockname()
        self.up = bytearray()  # connector -> listener
        self.down = bytearray()  # listener -> connector
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        a, _ = self.listener.accept()
        b = socket.create_connection(self.target)

        def pump(src: socket.socket, dst: socket.socket, into: bytearray) -> None:
            try:
                while data := src.recv(65536):
                    into += data
                    dst.sendall(data)
            except OSError:
                pass  # either side closed: the recording is complete
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed

        t = threading.Thread(target=pump, args=(b, a, self.down), daemon=True)
        t.start()
        pump(a, b, self.up)
        t.join(5)
        a.close()
        b.close()
        self.listener.close()


def _wait_for(cond, bound: float = BOUND) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_a_recorded_handshake_is_worthless_in_either_direction(sides):
    a, b = sides(0), sides(1)
    relay = Relay(b.t.endpoint)
    a.t.connect(1, *relay.endpoint, timeout=5.0)  # a real handshake, recorded on the way
    a.t.send(1, Header(MsgType.P2P, 0, 0, OpKind.SEND, tag=1))
    assert _wait_for(lambda: len(b.frames) == 1)
    hello_len = _HELLO.size + 32 + 16
    up, down = bytes(relay.up[:hello_len]), bytes(relay.down[:16 + 32])
    assert len(up) == hello_len and len(down) == 48
    # the connector's half, replayed to the listener: a fresh challenge makes it worthless
    s = socket.create_connection(b.t.endpoint)
    s.sendall(up + Header(MsgType.P2P, 0, 0, OpKind.SEND, tag=1).pack())
    assert _closed_within(s, BOUND) is not None
    s.close()
    assert _wait_for(lambda: len(b.rejected) == 1) and len(b.frames) == 1
    assert not b.lost, "a rejected stranger must not cost the real link"
    # the listener's half, replayed to a connector: it must not believe a fake listener
    fake = socket.create_server((HOST, 0))

    def impostor() -> None:
        c, _ = fake.accept()
        c.sendall(down[:16])
        c.recv(hello_len)
        c.sendall(down[16:])  # the recorded proof: over another challenge of the connector's
        c.recv(1)
        c.close()

    threading.Thread(target=impostor, daemon=True).start()
    with pytest.raises(HandshakeError, match="could not prove membership"):
        a.t.connect(2, *fake.getsockname(), timeout=5.0)
    fake.close()


def test_a_listener_or_a_connector_without_the_secret_is_refused(sides):
    a, b, stranger = sides(0), sides(1), sides(1, secret=b"x" * 32)
    with pytest.raises(HandshakeError):
        stranger.t.connect(0, *a.t.endpoint, timeout=5.0)
    assert _wait_for(lambda: len(a.rejected) == 1) and not a.lost
    with pytest.raises(HandshakeError, match="refused our credentials"):
        a.t.connect(1, *stranger.t.endpoint, timeout=5.0)  # (it cannot check our proof)
    a.t.connect(1, *b.t.endpoint, timeout=5.0)  # the real peer still gets in
    assert a.t.connected(1)


def test_a_silent_half_open_connection_is_closed_at_the_handshake_bound(sides):
    b = sides(1, handshake_timeout=0.5)
    s = socket.create_connection(b.t.endpoint)
    took = _closed_within(s, BOUND)
    s.close()
    assert took is not None and took >= 0.4, took
    assert _wait_for(lambda: len(b.rejected) == 1) and "timed out" in b.rejected[0]


def test_a_client_dripping_bytes_cannot_stretch_the_handshake_bound(sides):
    # (a per-read timeout would let one byte per 0.4 s hold the handshake for ~26 s)
    b = sides(1, handshake_timeout=0.5)
    s = socket.create_connection(b.t.endpoint)
    s.recv(16)
    start = time.monotonic()
    try:
        for _ in range(40):
            s.sendall(b"x")
            time.sleep(0.1)  # the drip itself: the pace of the attack, not synchronisation
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed on us: what the test wants
    took = _closed_within(s, BOUND)
    s.close()
    assert took is not None and time.monotonic() - start < 2.5, time.monotonic() - start
    assert _wait_for(lambda: len(b.rejected) == 1)


def _link_threads(rank: int) -> int:
    """Threads serving connections to `rank`'s listener (handshakes and established links)."""
    return sum(t.name == f"elasticpg-link-r{rank}" for t in threading.enumerate())


def test_a_flood_of_silent_connections_costs_a_bounded_number_of_threads(sides):
    """Three times more half-open foreign connections than handshakes allowed at once: never
    more than that many handshake threads (the rest wait in the backlog), each connection is
    closed at the handshake bound, and a real peer queued behind the flood still gets in."""
    cap, flood = 8, 24
    b = sides(1, handshake_timeout=0.5, max_handshakes=cap)
    a = sides(0)
    peak, stop = [0], threading.Event()

    def sample() -> None:  # a measurement, not synchronisation
        while not stop.is_set():
            peak[0] = max(peak[0], _link_threads(1))
            stop.wait(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    socks = [socket.create_connection(b.t.endpoint) for _ in range(flood)]
    try:
        assert _wait_for(lambda: _link_threads(1) >= cap), "the flood never filled the cap"
        a.t.connect(1, *b.t.endpoint, timeout=flood / cap * 0.5 + BOUND)
        a.t.send(1, Header(MsgType.P2P, 0, 0, OpKind.SEND, tag=1))
        assert _wait_for(lambda: len(b.frames) == 1)
        assert _wait_for(lambda: len(b.rejected) == flood), len(b.rejected)
    finally:
        stop.set()
        sampler.join(5)
        for s in socks:
            s.close()
    assert peak[0] <= cap + 1, peak  # the handshakes, and the real peer's established link
    assert all("timed out" in why for why in b.rejected), b.rejected
    assert not b.lost and b.t.has_incoming(0)


def _authenticated(sides) -> tuple[Side, Side, socket.socket]:
    a, b = sides(0), sides(1)
    a.t.connect(1, *b.t.endpoint, timeout=5.0)
    assert _wait_for(lambda: b.t.has_incoming(0))
    return a, b, a.t._out[1]


GOOD = Header(MsgType.P2P, 0, 8, OpKind.SEND, dtype_code(torch.float32), numel=2, tag=1)


@pytest.mark.parametrize("frame, why", [
    (b"\xff" * HEADER_SIZE, "FramingError"),  # not a header at all
    (Header(MsgType.P2P, 5, 0, OpKind.SEND).pack(), "carried a frame from 5"),  # forged source
    (GOOD.pack()[:-7], "mid-frame"),  # a header cut short, then the link closes
    (GOOD.pack() + b"\x00" * 3, "mid-frame"),  # a payload cut short, then the link closes
])
def test_a_malformed_or_truncated_frame_fails_the_peer_cleanly(sides, frame, why):
    a, b, sock = _authenticated(sides)
    sock.sendall(frame)
    sock.shutdown(socket.SHUT_WR)
    assert b.lost_event.wait(BOUND), "the reader died or hung without reporting"
    assert b.lost[0][0] == 0 and why in b.lost[0][1], b.lost
    assert not b.frames and not b.t.has_incoming(0)


def test_a_frame_cut_short_on_a_link_kept_open_is_caught_by_silence(sides):
    # the reader is blocked inside the frame; the silence bound (liveness thread) notices
    a, b, sock = _authenticated(sides)
    sock.sendall(GOOD.pack() + b"\x00" * 3)
    assert _wait_for(lambda: b.t.silent(0.3) == [0]), "a stalled frame must look like silence"
    assert not b.frames


# ---- with real ranks --------------------------------------------------------------------------

def _store() -> dist.Store:
    return dist.distributed_c10d._get_default_store()


def _attacks(host: str, port: int, secret: bytes, scope: bytes, seq: int) -> dict:
    """Every kind of foreign client against one data port, concurrently; per kind the seconds
    until the port closed it (None: still open after BOUND)."""
    hello = _HELLO.pack(_HELLO_MAGIC, 1, 1)  # claims to be rank 1

    def recorded() -> bytes:
        # what an eavesdropper captured from rank 1's real handshake on an earlier connection:
        # a valid answer to that connection's challenge
        with socket.create_connection((host, port)) as s:
            nonce = s.recv(16)
        return hello + _mac(secret, b"connect", scope, nonce, hello) + os.urandom(16)

    frame = Header(MsgType.COLL, 1, 8, OpKind.ALLREDUCE, dtype_code(torch.float32), seq=seq,
                   numel=2).pack() + torch.tensor([1000.0, 1000.0]).numpy().tobytes()
    sends = {
        "garbage": os.urandom(300),
        "garbage_short": os.urandom(10),  # waits for the rest: the bound ends it
        "replayed_handshake": recorded(),
        "plausible_frame": frame * 4,
        "wrong_secret": hello + _mac(b"y" * 32, b"connect", scope, b"\0" * 16, hello)
        + os.urandom(16),
        "half_open_silent": b"",
    }
    out: dict = {}

    def one(kind: str, data: bytes) -> None:
        with socket.create_connection((host, port)) as s:
            s.recv(16)  # the port's challenge
            if data:
                s.sendall(data)
            out[kind] = _closed_within(s, BOUND)

    threads = [threading.Thread(target=one, args=kv) for kv in sends.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(BOUND + 5)
    return out


def job_foreign_clients(rank: int, world: int, port: int) -> dict:
    init_group(rank, world, port, env={"ELASTICPG_TRANSPORT": "tcp"},
               pg_options=elasticpg.Options(failure_timeout=3.0))
    rt = runtime_of(None)
    store = _store()
    host, dport = rt.transport.endpoint
    store.set(f"data_port/{rank}", f"{host}:{dport}")
    results: dict = {}
    attackers: list[threading.Thread] = []
    if rank == 0:  # the attacker runs here only for convenience: it uses raw sockets
        secret = rt.control.secret()
        for r in range(world):
            store.wait([f"data_port/{r}"], timedelta(seconds=10))
            h, p = store.get(f"data_port/{r}").decode().rsplit(":", 1)
            t = threading.Thread(target=lambda r=r, h=h, p=p: results.__setitem__(
                r, _attacks(h, int(p), secret, rt.group_id.encode(), rt._seq + 3)))
            t.start()
            attackers.append(t)
    wrong, steps = 0, 0
    for steps in serving_steps(60):  # noqa: B007 (the count is reported)
        done = float(rank == 0 and not any(t.is_alive() for t in attackers))
        t = torch.tensor([float(rank + 1), done])
        dist.all_reduce(t)
        wrong += t[0].item() != 6.0
        if t[1].item() > 0:
            break
    dist.barrier()
    m = elasticpg.metrics()
    # nobody leaves before everyone has read its counters (a peer's departure counts as 'left')
    dist.barrier()
    dist.destroy_process_group()
    return {"attacks": results, "wrong": wrong, "steps": steps, "metrics": m}


def test_foreign_clients_on_every_data_port_are_rejected_and_nothing_is_injected(pool):
    res = pool.run(job_foreign_clients, world=3, timeout=90)
    attacks = res[0]["attacks"]
    assert sorted(attacks) == [0, 1, 2]
    for r, kinds in attacks.items():
        assert len(kinds) == 6, kinds
        for kind, took in kinds.items():
            # refused at once, or at the handshake bound (failure_timeout = 3 s)
            assert took is not None, f"rank {r}'s port kept a {kind} client open"
    for v in res:
        m = v["metrics"]
        assert v["wrong"] == 0 and v["steps"] > 0, v
        assert m["epoch"] == 0 and m["active_ranks"] == [0, 1, 2], m
        assert m["peer_failures"] == {} and m["view_changes"] == 0 and m["mismatches"] == 0, m
        # 6 clients + the eavesdropped connection of the replay, all refused
        assert m["rejected_connections"] == 7, m


def job_member_corrupts_its_link(rank: int, world: int, port: int, kind: str) -> dict:
    init_group(rank, world, port, env={"ELASTICPG_TRANSPORT": "tcp"},
               pg_options=elasticpg.Options(failure_timeout=5.0))
    store = _store()
    dist.barrier()
    if rank == 1:
        tr = runtime_of(None).transport
        with tr._out_locks[0]:  # authenticated, then nonsense on the link to rank 0
            sock = tr._out[0]
            if kind == "bad_header":
                sock.sendall(b"\xee" * HEADER_SIZE)
            else:
                cut = Header(MsgType.P2P, 1, 8, OpKind.SEND, GOOD.dtype, numel=2, tag=1)
                sock.sendall(cut.pack() + b"\x01")
                sock.shutdown(socket.SHUT_WR)
        store.wait(["survivors_done"], timedelta(seconds=30))
        return {}
    first = torch.tensor([float(rank)])
    dist.all_reduce(first)
    again = torch.tensor([float(rank)])
    dist.all_reduce(again)
    out = {"again": again.item(), "mask": elasticpg.get_active_ranks().tolist(),
           "metrics": elasticpg.metrics()}
    dist.barrier()
    if rank == 0:
        store.set("survivors_done", "1")
    return out


@pytest.mark.parametrize("kind, how", [("bad_header", "bad_frame"), ("truncated", "eof")])
def test_a_member_sending_a_corrupt_frame_is_a_detected_failure(pool, kind, how):
    res = pool.run(job_member_corrupts_its_link, kind, world=3, timeout=60)
    for r in (0, 2):
        v = res[r]
        assert v["again"] == 2.0 and v["mask"] == [1, 0, 1], v
        assert v["metrics"]["epoch"] == 1, v
    assert res[0]["metrics"]["peer_failures"] == {how: 1}, res[0]


def job_external_secret(rank: int, world: int, port: int, path: str, other: str) -> dict:
    """Ranks 0-2 found a group with the secret in a file; rank 3 (another secret) and rank 4
    (none) try to join it as extensions after that."""
    store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=30))
    opts = {"max_group_size": 5}
    if rank < 3:
        init_group(rank, 3, port, env={"ELASTICPG_SECRET_FILE": path},
                   pg_options=elasticpg.Options(**opts))
        rt = runtime_of(None)
        stored = rt.control.store.get("secret").decode()
        store.set(f"founded/{rank}", "1")
        t = torch.tensor([float(rank)])
        dist.all_reduce(t)
        store.wait(["outsiders_done"], timedelta(seconds=30))
        dist.destroy_process_group()
        return {"sum": t.item(), "stored": stored}
    store.wait(["founded/0", "founded/1", "founded/2"], timedelta(seconds=30))
    env = {"ELASTICPG_SECRET": other} if rank == 3 else {}
    err = error_name(lambda: init_group(rank, 5, port, env=env, pg_options=elasticpg.Options(
        is_extension=True, **opts)))
    if store.add("outsiders", 1) == 2:
        store.set("outsiders_done", "1")
    return {"error": err}


def test_a_secret_from_a_file_stays_out_of_the_store_and_mismatches_fail_clearly(pool, tmp_path):
    key = os.urandom(32).hex()
    path = tmp_path / "group.key"
    path.write_text(key + "\n")
    res = pool.run(job_external_secret, str(path), os.urandom(32).hex(), world=5, timeout=60)
    for r in range(3):
        assert res[r]["sum"] == 3.0, res[r]
        assert key not in res[r]["stored"] and res[r]["stored"] == secrets.marker(key.encode())
    assert res[3] == {"error": "ValueError"} and res[4] == {"error": "ValueError"}, res


def test_secret_sources_are_checked(monkeypatch, tmp_path):
    monkeypatch.delenv("ELASTICPG_SECRET", raising=False)
    monkeypatch.delenv("ELASTICPG_SECRET_FILE", raising=False)
    assert secrets.external_secret() is None
    monkeypatch.setenv("ELASTICPG_SECRET", "short")
    with pytest.raises(ValueError, match="at least 16"):
        secrets.external_secret()
    monkeypatch.setenv("ELASTICPG_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        secrets.external_secret()
    monkeypatch.delenv("ELASTICPG_SECRET")
    with pytest.raises(ValueError, match="cannot read"):
        secrets.external_secret()
    good = b"0123456789abcdef0123"
    with pytest.raises(ValueError, match="has none"):
        secrets.check_marker(secrets.marker(good), None)
    with pytest.raises(ValueError, match="kept in the store"):
        secrets.check_marker(os.urandom(32).hex(), good)
    with pytest.raises(ValueError, match="differs"):
        secrets.check_marker(secrets.marker(good), b"another secret of enough length")
    secrets.check_marker(secrets.marker(good), good)
