"""Authenticated TCP links between the ranks of one group.

Each process listens on one port per group. A link is one-directional: the sender connects,
and both ends prove they know the group secret (mutual HMAC challenge-response, a fresh random
challenge from each side per connection, so a recorded handshake is worth nothing on another
connection); from then on the sender only sends, and the acceptor runs one reader thread per
incoming link that hands complete frames to `on_frame`. A connection that does not complete the
handshake within `handshake_timeout` is closed and reported (`on_rejected`): no byte of it
ever reaches `on_frame`. At most `max_handshakes` connections are in their handshake at once
(a thread each); beyond that the listener stops accepting until one finishes, so a flood of
silent foreign connections costs a bounded number of threads and waits in the kernel's
backlog, and a real peer's handshake is only delayed (it completes in a round trip).
When a link's socket closes or errors, `on_lost(rank, reason, incarnation)` fires at once: a
crashed peer is noticed as soon as the kernel closes its sockets. Every link knows which process
(incarnation) of a slot it connects, so a report about a dead predecessor is never mistaken for
one about the replacement that took its slot. Anything that goes wrong while a reader handles
a frame (a corrupt header, an exception in a callback) ends that link the same way, reported,
never as a silently dead thread.

Every send is bounded by a deadline. A small frame first tries one non-blocking send (the
socket buffer nearly always has room: one system call, no poll); only what does not fit waits,
bounded. Large payloads go out in chunks, and each chunk records
progress, so the liveness thread can tell a send that moves slowly from one to a peer that
stopped reading (`heartbeat`).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

import torch

from ..core.framing import HEADER_SIZE, FramingError, Header, MsgType

_HELLO = struct.Struct("<4siQ")  # magic, src rank, incarnation
_HELLO_MAGIC = b"EPG2"
_NONCE = 16
_MAC = 32
_SOCK_BUF = 4 << 20
_SMALL = 1 << 16  # below this, header and payload go out in one buffer
_CHUNK = 1 << 20  # large payloads are sent in chunks of this size, recording progress
MAX_HANDSHAKES = 64  # connections in their handshake at once, per listener
_RBUF = 1 << 16  # a reader's buffer: frames up to this size arrive in one system call

log = logging.getLogger("elasticpg.transport")


class SendTimeoutError(TimeoutError):
    """A send did not finish by its deadline: the link is broken (a frame is cut)."""


class HandshakeError(ConnectionError):
    pass


def _mac(secret: bytes, role: bytes, scope: bytes, nonces: bytes, hello: bytes) -> bytes:
    """The proof of one side (`role`: b"connect" or b"accept", so that neither side's proof
    can be reflected as the other's) over the challenge(s) it answers."""
    msg = role + b"|" + scope + b"|" + nonces + hello
    return hmac.new(secret, msg, hashlib.sha256).digest()


def recv_exact(sock: socket.socket, view: memoryview, deadline: float | None = None) -> bool:
    """Fill `view` from `sock`; False on a clean EOF before any byte. A `deadline` bounds the
    whole read, not each chunk: a client that drips a byte at a time cannot hold a handshake
    open for longer."""
    got, n = 0, len(view)
    while got < n:
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0:
                return False
            what = "frame" if deadline is None else "handshake"
            raise ConnectionError(f"connection closed mid-{what} ({got}/{n} bytes)")
        got += k
    return True


# dtypes numpy knows: their byte view needs no reshape or reinterpreting view (a microsecond
# each, on every small frame)
_NUMPY_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.int64, torch.int32,
                           torch.int16, torch.int8, torch.uint8, torch.bool})


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (any dtype, also bfloat16/float8)."""
    if t.dtype in _NUMPY_DTYPES and t.dim() == 1 and not t.requires_grad:
        return memoryview(t.numpy()).cast("B")
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)


class TcpTransport:
    """Listener + outgoing links of one rank in one group."""

    def __init__(self, rank: int, secret: bytes, scope: str, host: str,
                 on_frame: Callable[[Header, torch.Tensor], None],
                 on_lost: Callable[[int, str, int], None],
                 on_connected: Callable[[int, int], None] | None = None,
                 incarnation: int = 0,
                 buffer_for: Callable[[Header], torch.Tensor | None] | None = None,
                 handshake_timeout: float = 10.0,
                 on_rejected: Callable[[object, str, float], None] | None = None,
                 max_handshakes: int = MAX_HANDSHAKES) -> None:
        self.rank = rank
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        self.rejected = 0  # connections that failed the handshake
        self._on_rejected = on_rejected  # (remote address, why, seconds it took)
        self.incarnation = incarnation
        self._secret = secret
        self._scope = scope.encode()
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._on_connected = on_connected
        self._buffer_for = buffer_for  # a posted destination for a payload (Mailbox.expect)
        self._lock = threading.Lock()
        self._handshakes = 0  # connections accepted and not yet through their handshake
        self._handshake_room = threading.Condition(self._lock)
        self._out: dict[int, socket.socket] = {}
        self._out_locks: dict[int, threading.Lock] = {}
        self._out_inc: dict[int, int] = {}  # incarnation each outgoing link was opened to
        self._in: dict[int, socket.socket] = {}
        self._last_heard: dict[int, float] = {}  # per incoming link: when a frame last arrived
        self._last_sent: dict[int, float] = {}  # per outgoing link: when we last wrote to it
        self._progress: dict[int, float] = {}  # per outgoing link: last progress of a send
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()  # lets closed_outgoing stop waiting at once
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family, backlog=128)
        self.endpoint = (host, self._listener.getsockname()[1])
        self._spawn(self._accept_loop, f"elasticpg-accept-r{rank}")

    def _spawn(self, fn: Callable, name: str, *args) -> None:
        t = threading.Thread(target=fn, args=args, name=name, daemon=True)
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    # ---- incoming ---------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            with self._handshake_room:  # bounded: each handshake ends within its timeout
                while self._handshakes >= self.max_handshakes and not self._closing:
                    self._handshake_room.wait(self.handshake_timeout)
                if self._closing:
                    return
                self._handshakes += 1
            try:
                sock, addr = self._listener.accept()
            except OSError:
                self._handshake_over()
                return  # listener closed
            self._spawn(self._serve, f"elasticpg-link-r{self.rank}", sock, addr)

    def _handshake_over(self) -> None:
        with self._handshake_room:
            self._handshakes -= 1
            self._handshake_room.notify()

    def _serve(self, sock: socket.socket, addr: object = None) -> None:
        src = -1
        started = time.monotonic()
        try:
            sock.settimeout(self.handshake_timeout)
            nonce = os.urandom(_NONCE)
            sock.sendall(nonce)
            msg = bytearray(_HELLO.size + _MAC + _NONCE)
            if not recv_exact(sock, memoryview(msg), started + self.handshake_timeout):
                raise HandshakeError("closed during the handshake")
            hello, proof, theirs = (bytes(msg[:_HELLO.size]),
                                    bytes(msg[_HELLO.size:-_NONCE]), bytes(msg[-_NONCE:]))
            magic, src, inc = _HELLO.unpack(hello)
            if magic != _HELLO_MAGIC or not hmac.compare_digest(
                    proof, _mac(self._secret, b"connect", self._scope, nonce, hello)):
                raise HandshakeError("no proof of group membership")
            sock.sendall(_mac(self._secret, b"accept", self._scope, theirs + nonce, hello))
            sock.settimeout(None)
            _tune(sock)
        except (OSError, HandshakeError, struct.error) as exc:
            sock.close()
            with self._lock:
                self.rejected += 1
            why, took = f"{type(exc).__name__}: {exc}", time.monotonic() - started
            if self._on_rejected is not None:
                self._on_rejected(addr, why, took)
            else:
                log.warning("rank %d: rejected a connection from %s: %s", self.rank, addr, why)
            return
        finally:
            self._handshake_over()
        with self._lock:
            if self._closing:
                sock.close()
                return
            old = self._in.pop(src, None)
            self._in[src] = sock
            self._last_heard[src] = time.monotonic()
        if old is not None:
            old.close()
        if self._on_connected is not None:
            self._on_connected(src, inc)
        self._read_loop(sock, src, inc)

    def _read_loop(self, sock: socket.socket, src: int, inc: int) -> None:
        """Read frames until the link ends. Reads go into one buffer, as much as the socket
        holds: a small frame (header and payload) costs one system call, and frames that
        arrived together cost one between them. Only a payload larger than what is buffered
        is read on, straight into its destination."""
        buf = bytearray(_RBUF)
        view = memoryview(buf)
        start = end = 0  # buffered, not yet consumed: buf[start:end]
        reason = "connection closed"
        try:
            while True:
                if end - start < HEADER_SIZE:
                    if start:  # keep the partial header at the front
                        view[:end - start] = view[start:end]
                        start, end = 0, end - start
                    while end < HEADER_SIZE:
                        k = sock.recv_into(view[end:], _RBUF - end)
                        if k == 0:
                            if end:
                                raise ConnectionError(
                                    f"connection closed mid-frame ({end}/{HEADER_SIZE} bytes)")
                            return self._link_ended(sock, src, inc, reason)
                        end += k
                    self._last_heard[src] = time.monotonic()
                header = Header.unpack(view[start:start + HEADER_SIZE])
                start += HEADER_SIZE
                if header.src != src:
                    raise FramingError(f"link from rank {src} carried a frame from {header.src}")
                if header.type == MsgType.HEARTBEAT:
                    continue
                n = header.nbytes
                payload = None
                if self._buffer_for is not None and header.type == MsgType.COLL:
                    payload = self._buffer_for(header)
                if payload is None:
                    payload = torch.empty(n, dtype=torch.uint8)
                if n:
                    dest = memoryview(payload.numpy())
                    have = min(n, end - start)
                    if have:
                        dest[:have] = view[start:start + have]
                        start += have
                    if have < n and not recv_exact(sock, dest[have:]):
                        raise ConnectionError("connection closed mid-frame")
                    if start == end:
                        start = end = 0
                    self._last_heard[src] = time.monotonic()
                if header.type == MsgType.GOODBYE:
                    reason = "peer left the group"
                    break
                self._on_frame(header, payload)
        except (OSError, FramingError, ConnectionError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a reader must never die unreported
            log.exception("rank %d: handling a frame from rank %d failed; dropping the link",
                          self.rank, src)
            reason = f"reader error: {type(exc).__name__}: {exc}"
        self._link_ended(sock, src, inc, reason)

    def _link_ended(self, sock: socket.socket, src: int, inc: int, reason: str) -> None:
        with self._lock:
            current = self._in.get(src) is sock
            if current:
                del self._in[src]
            closing = self._closing
        sock.close()
        if current and not closing:
            try:
                self._on_lost(src, reason, inc)
            except Exception:  # noqa: BLE001 - the link is gone either way; say what broke
                log.exception("rank %d: reporting the lost link from rank %d failed",
                              self.rank, src)

    # ---- outgoing ---------------------------------------------------------------------------
    def connect(self, peer: int, host: str, port: int, timeout: float,
                incarnation: int = 0) -> None:
        """Open and authenticate the link to process `incarnation` of slot `peer` (replacing
        an older link)."""
        deadline = time.monotonic() + timeout
        sock = socket.create_connection((host, port), timeout=max(0.01, timeout))
        try:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            theirs = bytearray(_NONCE)
            if not recv_exact(sock, memoryview(theirs)):
                raise HandshakeError(f"rank {peer} closed the connection during handshake")
            hello = _HELLO.pack(_HELLO_MAGIC, self.rank, self.incarnation)
            mine = os.urandom(_NONCE)
            sock.sendall(hello + _mac(self._secret, b"connect", self._scope, bytes(theirs),
                                      hello) + mine)
            proof = bytearray(_MAC)
            if not recv_exact(sock, memoryview(proof)):
                raise HandshakeError(f"rank {peer} refused our credentials")
            if not hmac.compare_digest(bytes(proof), _mac(
                    self._secret, b"accept", self._scope, mine + bytes(theirs), hello)):
                raise HandshakeError(f"the listener at {host}:{port} (rank {peer}'s endpoint) "
                                     f"could not prove membership of the group")
            sock.settimeout(None)
            _tune(sock)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            old = self._out.pop(peer, None)
            self._out[peer] = sock
            self._out_inc[peer] = incarnation
            self._out_locks.setdefault(peer, threading.Lock())
        if old is not None:
            old.close()

    def connected(self, peer: int) -> bool:
        return peer in self._out

    def has_incoming(self, peer: int) -> bool:
        return peer in self._in

    def send(self, peer: int, header: Header, payload: memoryview | bytes = b"",
             deadline: float | None = None) -> None:
        """Send one frame by `deadline` (monotonic; None: 10 s from now).

        Raises ConnectionError when the link is gone, SendTimeoutError when the peer did not
        take the frame in time (the link is then unusable: part of a frame may be out)."""
        sock = self._out.get(peer)
        if sock is None:
            raise ConnectionError(f"no link to rank {peer}")
        hdr = header.pack()
        with self._out_locks[peer]:
            now = time.monotonic()
            self._progress[peer] = now
            try:
                if len(payload) < _SMALL:
                    frame = hdr + bytes(payload) if payload else hdr
                    try:  # one system call when the socket buffer has room (nearly always)
                        sent = sock.send(frame, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    if sent < len(frame):
                        sock.settimeout(max((now + 10.0 if deadline is None else deadline)
                                            - now, 0.001))
                        sock.sendall(memoryview(frame)[sent:])
                        sock.settimeout(None)  # blocking again: the fast path needs no poll
                else:
                    sock.settimeout(max((now + 10.0 if deadline is None else deadline) - now,
                                        0.001))
                    sock.sendall(hdr)
                    view = memoryview(payload).cast("B")
                    for off in range(0, len(view), _CHUNK):
                        sock.sendall(view[off:off + _CHUNK])
                        self._progress[peer] = time.monotonic()
                    sock.settimeout(None)
            except TimeoutError:
                raise SendTimeoutError(f"rank {peer} did not take a {len(payload)}-byte frame "
                                       f"by the deadline (it stopped reading?)") from None
            self._last_sent[peer] = time.monotonic()

    # ---- liveness -------------------------------------------------------------------------------
    def heartbeat(self, idle: float, bound: float) -> list[tuple[int, socket.socket]]:
        """Send a heartbeat on every outgoing link idle for `idle` seconds.

        A link busy with another send is alive while that send makes progress. Returns the
        links (peer, socket) whose peer stopped reading: a heartbeat not written within `bound`,
        or a send in flight that moved no byte for `bound` seconds.
        """
        now = time.monotonic()
        stuck = []
        for peer, sock in list(self._out.items()):
            lock = self._out_locks[peer]
            if not lock.acquire(blocking=False):
                if now - self._progress.get(peer, now) > bound:
                    stuck.append((peer, sock))
                continue
            try:
                if now - self._last_sent.get(peer, 0.0) < idle:
                    continue
                sock.settimeout(bound)
                sock.sendall(Header(MsgType.HEARTBEAT, self.rank, 0).pack())
                sock.settimeout(None)  # see send: its fast path wants a blocking socket
                self._last_sent[peer] = now
            except OSError:
                stuck.append((peer, sock))
            finally:
                lock.release()
        return stuck

    def silent(self, bound: float) -> list[int]:
        """Peers whose incoming link has carried nothing for more than `bound` seconds."""
        now = time.monotonic()
        return [p for p in list(self._in) if now - self._last_heard.get(p, now) > bound]

    def forgive_silence(self) -> None:
        """Restart every silence clock (after this process itself was stalled)."""
        now = time.monotonic()
        for p in list(self._in):
            self._last_heard[p] = now

    def closed_outgoing(self, wait: float) -> list[tuple[int, socket.socket]]:
        """Wait up to `wait` s for an outgoing link to close; return those links (peer, socket).

        Peers never write on our outgoing links, so readability there means EOF or reset:
        the peer is gone even if it never opened a link to us.
        """
        links = dict(self._out)
        poller = select.poll()
        by_fd = {}
        if self._wake_r >= 0:
            poller.register(self._wake_r, select.POLLIN)  # interrupt(): stop waiting now
        for peer, sock in links.items():
            try:
                fd = sock.fileno()
            except OSError:
                continue
            if fd >= 0:
                by_fd[fd] = peer
                poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        gone = []
        for fd, _ev in poller.poll(wait * 1000):
            peer = by_fd.get(fd)
            if peer is None:
                continue  # the wake-up pipe
            try:
                data = links[peer].recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data == b"":
                gone.append((peer, links[peer]))
        return gone

    def drop(self, peer: int, sock: socket.socket | None = None) -> int | None:
        """Forget the outgoing link to `peer` (it failed or was replaced): any link, or only
        `sock` if given (a link that a newer one replaced meanwhile is left alone). Returns the
        incarnation the dropped link went to, None if nothing was dropped."""
        with self._lock:
            cur = self._out.get(peer)
            if cur is None or (sock is not None and cur is not sock):
                return None
            del self._out[peer]
            inc = self._out_inc.pop(peer, 0)
        try:
            cur.shutdown(socket.SHUT_RDWR)  # wakes a sender blocked on this socket
        except OSError:
            pass  # already closed by the peer
        cur.close()
        return inc

    def leave(self, peer: int) -> None:
        """Close our link to `peer` in order: it sees us leave (GOODBYE), not crash."""
        with self._lock:
            sock = self._out.pop(peer, None)
        if sock is not None:
            self._say_goodbye(sock)

    def _say_goodbye(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(0.5)
            sock.sendall(Header(MsgType.GOODBYE, self.rank, 0).pack())
        except OSError:
            pass  # the peer is gone already: nothing to tell
        sock.close()

    def drop_incoming(self, peer: int) -> None:
        """Stop listening to `peer` (declared failed): its reader thread ends quietly."""
        with self._lock:
            sock = self._in.pop(peer, None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def interrupt(self) -> None:
        """End a closed_outgoing wait now (the group is going away)."""
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")

    def close(self, goodbye: bool = False) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._handshake_room.notify_all()  # an accept loop waiting for room ends
            out, self._out = dict(self._out), {}
            inc, self._in = dict(self._in), {}
        for sock in out.values():
            if goodbye:
                self._say_goodbye(sock)
            else:
                sock.close()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() on Linux
        except OSError:
            pass
        self._listener.close()
        for sock in inc.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        me = threading.current_thread()
        for t in list(self._threads):
            if t is not me:
                t.join(timeout=5.0)
        wake, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in wake:
            os.close(fd)
