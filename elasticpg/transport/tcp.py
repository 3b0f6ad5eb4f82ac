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

A collective wait may read its links itself instead (`pump`): a small frame then costs one
wake-up (the caller's) instead of two (the reader's, then the caller's, each a scheduling delay
on a loaded machine). A link has one owner at a time, switched only between frames, and keeps
its read buffer across the switch; the caller keeps links for a short lease across back-to-back
calls, and the reader takes its link back when the lease runs out, so heartbeats and EOF wait
for nobody longer than that. What ends a link is always reported by its reader.

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
import math
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
# how long the caller keeps the links it read after a call ends: back-to-back calls keep them
# without a hand-off each; after it, frames (and an EOF) wait for no one (see pump)
_LEASE = 0.02
_TO_READER = "to the reader"  # _frames: the caller leaves a frame larger than the buffer

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


def _drain(fd: int) -> None:
    """Reset a non-blocking eventfd (nothing to read is fine: another reader reset it)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class _InLink:
    """One incoming link and its read buffer (`buf[start:end]` is received and not yet handed
    over): the state that moves with the link's ownership between its reader and the caller.
    `want`, `caller`, `gone` and `dead` change only under the transport's `_own`."""

    __slots__ = ("sock", "fd", "src", "inc", "buf", "view", "start", "end", "wake", "want",
                 "caller", "gone", "dead", "reader_until")

    def __init__(self, sock: socket.socket, src: int, inc: int) -> None:
        self.sock, self.fd, self.src, self.inc = sock, sock.fileno(), src, inc
        self.buf = bytearray(_RBUF)
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the caller wants it
        self.want = False  # the caller asked for the link
        self.caller = False  # the caller owns it (the reader is parked)
        self.gone = False  # dropped or replaced: the reader ends quietly
        self.dead: str | None = None  # why it ended, when the caller found out (see pump)
        # the caller met a frame larger than the buffer: large frames stream through the
        # reader (straight into their destination) and the caller leaves the link alone until
        self.reader_until = 0.0


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
        self._links: dict[int, _InLink] = {}  # the same links, with their read state
        # who reads which incoming link (see pump): the links the caller owns, whether (and
        # which thread) a caller reads them now, until when its lease lasts, and the eventfd
        # that wakes it when a reader hands a link over
        self._own = threading.Condition(threading.Lock())
        self._owned: set[_InLink] = set()
        self._asked: set[_InLink] = set()  # links whose `want` is set
        self._owned_version = 0  # changes with _owned: the caller's cached poll set
        self._poll_cache: tuple | None = None
        self._pumping = 0
        self._lease_end = 0.0
        self._pump_wake = -1
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
        link = _InLink(sock, src, inc)
        with self._lock:
            if self._closing:
                sock.close()
                os.close(link.wake)
                return
            old = self._links.pop(src, None)
            self._links[src] = link
            self._in[src] = sock
            self._last_heard[src] = time.monotonic()
        if old is not None:
            self._end_reading(old)
        if self._on_connected is not None:
            self._on_connected(src, inc)
        self._read_loop(link)

    def _read_loop(self, link: _InLink) -> None:
        """The reader thread of one incoming link: read and hand over frames while it owns the
        link, park while the caller does (see `pump`), and report how the link ended."""
        reason = "connection closed"
        try:
            poller = select.poll()
            poller.register(link.fd, select.POLLIN)
            poller.register(link.wake, select.POLLIN)
            while True:
                if link.want or link.caller:
                    self._park(link)
                    if link.dead is not None:
                        reason = link.dead
                        break
                    if self._closing or link.gone:
                        break
                    self._frames(link, caller=False)  # what the caller left buffered
                sock_ready = False
                for fd, _ev in poller.poll():
                    if fd == link.wake:
                        _drain(link.wake)
                    else:
                        sock_ready = True
                if not sock_ready:
                    continue
                if not self._fill(link):
                    break  # clean EOF between frames
                ended = self._frames(link, caller=False)
                if ended is not None:
                    reason = ended
                    break
        except (OSError, FramingError, ConnectionError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a reader must never die unreported
            log.exception("rank %d: handling a frame from rank %d failed; dropping the link",
                          self.rank, link.src)
            reason = f"reader error: {type(exc).__name__}: {exc}"
        self._link_ended(link, reason)

    def _fill(self, link: _InLink, flags: int = 0) -> bool:
        """Read what the socket holds into the link's buffer; False on a clean EOF between
        frames (mid-frame EOF raises). The buffer always has room: whatever is left in it is
        less than one frame that fits it (see `_frames`)."""
        end = link.end
        if link.start and _RBUF - end < _RBUF // 4:
            self._compact(link)
            end = link.end
        try:
            k = link.sock.recv_into(link.view[end:], _RBUF - end, flags)
        except BlockingIOError:
            return True  # nothing after all (a stale readiness): poll again
        if k == 0:
            if end > link.start:
                raise ConnectionError(f"connection closed mid-frame ({end - link.start} bytes "
                                      f"of a frame buffered)")
            return False
        link.end = end + k
        self._last_heard[link.src] = time.monotonic()
        return True

    @staticmethod
    def _compact(link: _InLink) -> None:
        n = link.end - link.start
        link.view[:n] = link.view[link.start:link.end]
        link.start, link.end = 0, n

    def _frames(self, link: _InLink, caller: bool) -> str | None:
        """Hand every frame buffered whole to `on_frame`. The reader also finishes a frame whose
        payload is only partly buffered (reading the rest straight into its destination); the
        caller never blocks: it leaves a partial frame that fits the buffer for its next read,
        and one larger than the buffer to the reader (`_TO_READER`). Returns why the link
        ended (a GOODBYE), else None."""
        view = link.view
        while link.end - link.start >= HEADER_SIZE:
            start = link.start
            header = Header.unpack(view[start:start + HEADER_SIZE])
            if header.src != link.src:
                raise FramingError(f"link from rank {link.src} carried a frame from "
                                   f"{header.src}")
            n = header.nbytes
            have = link.end - start - HEADER_SIZE
            if have < n and caller:
                if HEADER_SIZE + n > _RBUF:
                    return _TO_READER
                if start + HEADER_SIZE + n > _RBUF:
                    self._compact(link)
                return None  # the rest comes in a later read
            start += HEADER_SIZE
            if header.type == MsgType.HEARTBEAT:
                link.start = start
                continue
            payload = None
            if self._buffer_for is not None and header.type == MsgType.COLL:
                payload = self._buffer_for(header)
            if payload is None:
                payload = torch.empty(n, dtype=torch.uint8)
            if n:
                dest = memoryview(payload.numpy())
                take = min(n, have)
                if take:
                    dest[:take] = view[start:start + take]
                    start += take
                link.start = start
                if take < n:  # reader only: read the rest straight into its destination
                    if not recv_exact(link.sock, dest[take:]):
                        raise ConnectionError("connection closed mid-frame")
                    self._last_heard[link.src] = time.monotonic()
            else:
                link.start = start
            if link.start == link.end:
                link.start = link.end = 0
            if header.type == MsgType.GOODBYE:
                return "peer left the group"
            self._on_frame(header, payload)
        if link.start and link.end == _RBUF:
            self._compact(link)
        return None

    def _park(self, link: _InLink) -> None:
        """Reader thread: hand the link to the caller if it asked, and wait while the caller
        owns it: until the caller hands it back, its lease runs out while no call is reading,
        the link is dropped, or the transport closes."""
        with self._own:
            if link.want:
                link.want = False
                self._asked.discard(link)
                if not (link.gone or self._closing or link.dead is not None):
                    link.caller = True
                    self._owned.add(link)
                    self._owned_version += 1
                    if self._pump_wake >= 0:
                        os.eventfd_write(self._pump_wake, 1)  # the caller waits for it
            while link.caller:
                if link.gone or self._closing or link.dead is not None:
                    break
                now = time.monotonic()
                if not self._pumping and now >= self._lease_end:
                    break  # the lease ran out: frames must not wait longer for a reader
                self._own.wait(_LEASE if self._pumping else self._lease_end - now)
            if link.caller:
                link.caller = False
                self._owned.discard(link)
                self._owned_version += 1

    # ---- the caller reading its own links ---------------------------------------------------
    def pump(self, src: int, wake: int, timeout: float) -> bool:
        """Caller: wait up to `timeout` s for frames by reading the links it owns itself,
        dispatching them to `on_frame` as the reader would (one wake-up per frame instead of
        the reader's and then the caller's). Asks for `src`'s link if it does not own it yet;
        returns early when anything arrives, the link is handed over, or `wake` (the mailbox's
        eventfd: another frame delivered, a failure, an abort) fires. False (nothing done)
        when it cannot: no link from `src`, another thread pumps, or the transport closes.

        Ownership: a link is read by exactly one thread at a time, switching only between
        frames, under `_own`; its buffer travels with it, so a frame is never split. A link's
        socket is closed only by its reader, never while the caller may poll it. An error the
        caller meets (EOF, a corrupt frame) is handed to the reader, which reports it as it
        would its own; a frame larger than the buffer goes back to the reader too."""
        link = self._links.get(src)
        me = threading.get_ident()
        with self._own:
            if (link is None or self._closing or link.gone or link.dead is not None
                    or self._pumping or link.reader_until > time.monotonic()):
                return False
            if not link.caller and not link.want:
                link.want = True
                self._asked.add(link)
                os.eventfd_write(link.wake, 1)
            self._pumping = me
            self._pump_wake = wake
            cache = self._poll_cache
            if cache is None or cache[0] != self._owned_version:
                poller = select.poll()
                poller.register(wake, select.POLLIN)
                fds = {}
                for x in self._owned:
                    poller.register(x.fd, select.POLLIN)
                    fds[x.fd] = x
                cache = self._poll_cache = (self._owned_version, poller, fds)
        back: list[tuple[_InLink, str | None]] = []
        try:
            _, poller, fds = cache
            for fd, _ev in poller.poll(math.ceil(max(timeout, 0.0) * 1000)):
                x = fds.get(fd)
                if x is None:
                    _drain(wake)
                    continue
                try:
                    if not self._fill(x, socket.MSG_DONTWAIT):
                        back.append((x, "connection closed"))
                        continue
                    ended = self._frames(x, caller=True)
                    if ended is _TO_READER:
                        x.reader_until = time.monotonic() + _LEASE
                        back.append((x, None))
                    elif ended is not None:  # a GOODBYE: the reader reports it
                        back.append((x, ended))
                except (OSError, FramingError, ConnectionError) as exc:
                    back.append((x, f"{type(exc).__name__}: {exc}"))
                except Exception as exc:  # noqa: BLE001 - reported by the reader, as its own
                    log.exception("rank %d: handling a frame from rank %d failed; dropping "
                                  "the link", self.rank, x.src)
                    back.append((x, f"reader error: {type(exc).__name__}: {exc}"))
        finally:
            with self._own:
                self._pumping = 0
                self._pump_wake = -1
                self._lease_end = time.monotonic() + _LEASE
                for x, why in back:
                    if why is not None and x.dead is None:
                        x.dead = why
                    x.caller = False
                    self._owned.discard(x)
                    self._owned_version += 1
                if back:
                    self._own.notify_all()
        return True

    def release(self) -> None:
        """Hand every link the caller owns back to its reader now (the caller is about to
        wait on something else, e.g. a point-to-point receive, whose frames readers deliver)."""
        if not self._owned and not self._asked:
            return
        with self._own:
            if self._pumping:
                return  # another thread reads them right now; its lease ends on its own
            for x in self._asked:
                x.want = False
            self._asked.clear()
            for x in self._owned:
                x.caller = False
            self._owned.clear()
            self._owned_version += 1
            self._own.notify_all()

    def _link_ended(self, link: _InLink, reason: str) -> None:
        sock, src = link.sock, link.src
        with self._lock:
            current = self._links.get(src) is link
            if current:
                del self._links[src]
                self._in.pop(src, None)
            closing = self._closing
        with self._own:
            link.gone = True
            wake, link.wake = link.wake, -1
            self._asked.discard(link)
            if link in self._owned:
                self._owned.discard(link)
                self._owned_version += 1
        os.close(wake)
        sock.close()
        if current and not closing:
            try:
                self._on_lost(src, reason, link.inc)
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
            self._in.pop(peer, None)
            link = self._links.pop(peer, None)
        if link is not None:
            self._end_reading(link)

    def _end_reading(self, link: _InLink) -> None:
        """Make `link`'s reader end (quietly: it is no longer current), wherever it is: blocked
        on the socket, or parked while the caller owns the link. Only the reader closes it."""
        with self._own:
            link.gone = True
            self._own.notify_all()
        try:
            link.sock.shutdown(socket.SHUT_RDWR)
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
            links, self._links = dict(self._links), {}
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
        with self._own:
            self._own.notify_all()  # parked readers see _closing
        for sock in inc.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)  # its reader closes it (see pump)
            except OSError:
                pass
        me = threading.current_thread()
        for t in list(self._threads):
            if t is not me:
                t.join(timeout=5.0)
        for link in links.values():
            link.sock.close()  # already, unless its reader did not end in time
        wake, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in wake:
            os.close(fd)
