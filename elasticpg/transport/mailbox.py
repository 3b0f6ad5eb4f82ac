"""Matching incoming frames to the operations that wait for them.

Collective frames are keyed by (src, seq, step): any number may arrive early and wait here;
one that arrives for a collective that already ended (a peer that lagged, a peer we counted
out) is dropped on arrival, so nothing accumulates. Point-to-point frames are matched
MPI-style: an arriving frame completes the oldest posted receive for its (src, tag) (or for any
source with that tag); unmatched frames queue in arrival order until a receive takes them or
their sender's slot leaves the group (`discard_p2p`). A send waits here for the receiver's
acknowledgement (`expect_ack`): it completes only against a live receiving process. Failures and
aborts wake every waiter they concern, so no wait outlives its cause.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..core.framing import Header
from ..errors import CollectiveMismatchError, OperationTimeoutError, PeerFailedError

Frame = tuple[Header, torch.Tensor]
PROBE_SLICE = 0.05  # seconds between probes of a wait that has one (see take_coll)
# A large collective payload whose destination is not posted yet waits for it (buffer_for) at
# most about as long as landing it elsewhere would cost: a fresh buffer (a page fault per 4 KiB)
# plus the copy into the destination, measured at ~2.7 GB/s over veth.
POST_WAIT_FROM = 1 << 20
POST_WAIT_RATE = 2e9  # bytes per second of waiting allowed
POST_WAIT_MAX = 0.05


class ViewLagError(Exception):
    """The awaited peer runs this collective under another view, over another transport."""


@dataclass(eq=False)
class PostedRecv:
    """A receive posted before its frame arrived. `on_done(frame, error)` runs exactly once."""

    src: int | None  # None: any source
    tag: int
    on_done: Callable[[Frame | None, BaseException | None], None]
    order: int = field(default=0)


def _moved_on(h: Header, seq: int, epoch: int) -> str:
    """Why a frame `h` from the rank we wait for, in collective `seq` under view `epoch`,
    proves that the awaited frame will never come ("" if it does not).

    A rank runs each collective under one view, and its frames to us travel in order over one
    link. A frame of this collective under another view means it runs another layout of the
    operation (a view change it applied first: another algorithm, other steps); a frame of a
    later collective means it finished this one without that step for us. Either way the
    wait would end only at the timeout, while the sender is healthy: view lag."""
    if h.seq > seq:
        return f"rank {h.src} moved on to collective #{h.seq} while we wait in #{seq}"
    if h.seq == seq and h.epoch != epoch:
        return (f"rank {h.src} runs collective #{seq} under view {h.epoch}, this rank under "
                f"view {epoch}")
    return ""


class Mailbox:
    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._coll: dict[tuple[int, int, int], Frame] = {}
        self._p2p: dict[tuple[int, int], deque[Frame]] = {}
        self._p2p_arrival = itertools.count()
        self._p2p_order: dict[int, int] = {}  # id(frame tensor) -> arrival order, for ANY_SOURCE
        self._posted: list[PostedRecv] = []
        self._acks: dict[tuple[int, int], Callable[[BaseException | None], None]] = {}
        self._post_order = itertools.count()
        self._failed: dict[int, str] = {}
        self._aborted: dict[int, str] = {}
        self._closed: str | None = None
        self._floor = 0  # collectives below this sequence number have ended (see forget_seq)
        self._dest: dict[tuple[int, int, int], torch.Tensor] = {}  # see expect
        # a collective wait may read the links itself (see attach_pump); while it does, it
        # sleeps in poll, not on _cv, and `_wake` (an eventfd) is how the others wake it
        self._pump: Callable[[int, int, float], bool] | None = None
        self._wake = -1
        self._poller = 0  # the thread ident of the wait now in the pump, 0: none
        self._wake_leftover = -1  # see dispose

    def attach_pump(self, pump: Callable[[int, int, float], bool]) -> None:
        """Let collective waits read their links themselves: `pump(src, wake_fd, timeout)`
        waits up to `timeout` s for frames (delivered through the usual callbacks) or `wake_fd`,
        False if it cannot (then the wait sleeps on the condition as before)."""
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._pump = pump

    def dispose(self) -> None:
        """Release the wake-up eventfd (after close and once the transport is closed)."""
        with self._cv:
            self._pump = None
            wake, self._wake = self._wake, -1
            busy = self._poller != 0
        if wake >= 0 and not busy:
            os.close(wake)
        elif wake >= 0:
            self._wake_leftover = wake  # closed by the wait now in the pump, on its way out

    def _notify(self) -> None:
        """Under _cv: wake every waiter, also one polling its links in another thread."""
        self._cv.notify_all()
        if self._poller and self._poller != threading.get_ident() and self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    # ---- producers (reader threads) -------------------------------------------------------
    def deliver_coll(self, header: Header, payload: torch.Tensor) -> None:
        with self._cv:
            if header.seq < self._floor:
                return  # its collective ended here: nobody will ever take it
            self._coll[(header.src, header.seq, header.step)] = (header, payload)
            self._notify()

    def expect(self, src: int, seq: int, step: int, dest: torch.Tensor) -> None:
        """Receive the frame (src, seq, step) straight into `dest` (a byte tensor) if it has
        not arrived yet: no allocation, and no copy when `dest` is the output itself."""
        with self._cv:
            if (src, seq, step) not in self._coll and seq >= self._floor:
                self._dest[(src, seq, step)] = dest
                if dest.numel() >= POST_WAIT_FROM:
                    self._cv.notify_all()  # a reader may hold its header (buffer_for)

    def buffer_for(self, header: Header) -> torch.Tensor | None:
        """Reader thread, a COLL header in hand: the posted destination of its payload, if any
        (and only if its size matches: a frame of another size is a mismatch, reported when
        taken, and must not land in someone's output)."""
        n = header.nbytes
        if not self._dest and n < POST_WAIT_FROM:
            return None
        key = (header.src, header.seq, header.step)
        with self._cv:
            dest = self._dest.pop(key, None)
            if dest is None and n >= POST_WAIT_FROM:
                # A sender that runs one op ahead (a broadcast root) makes the header arrive
                # before the caller posts; waiting briefly saves 16k page faults and a copy
                # per 64 MiB. Bounded, and over as soon as waiting cannot help.
                end = time.monotonic() + min(POST_WAIT_MAX, n / POST_WAIT_RATE)
                while (dest is None and self._closed is None and not self._aborted
                       and header.src not in self._failed and header.seq >= self._floor):
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                    dest = self._dest.pop(key, None)
        return dest if dest is not None and dest.numel() == n else None

    def deliver_p2p(self, header: Header, payload: torch.Tensor) -> None:
        with self._cv:
            for i, p in enumerate(self._posted):
                if p.tag == header.tag and p.src in (None, header.src):
                    del self._posted[i]
                    break
            else:
                self._p2p_order[id(payload)] = next(self._p2p_arrival)
                self._p2p.setdefault((header.src, header.tag), deque()).append((header, payload))
                return
        p.on_done((header, payload), None)

    def fail_peer(self, rank: int, reason: str) -> None:
        """Mark a peer failed: waiters on it raise PeerFailedError."""
        with self._cv:
            self._failed.setdefault(rank, reason)
            hit = [p for p in self._posted if p.src == rank]
            self._posted = [p for p in self._posted if p.src != rank]
            sends = [self._acks.pop(k) for k in [k for k in self._acks if k[0] == rank]]
            self._notify()
        for p in hit:
            p.on_done(None, PeerFailedError([rank], reason))
        for on_ack in sends:
            on_ack(PeerFailedError([rank], reason))

    def revive_peer(self, rank: int) -> None:
        """`rank` is (again) a live member: forget its earlier failure."""
        with self._cv:
            self._failed.pop(rank, None)

    def abort(self, seq: int, reason: str) -> None:
        with self._cv:
            self._aborted.setdefault(seq, reason)
            self._notify()

    def close(self, reason: str) -> None:
        with self._cv:
            self._closed = reason
            posted, self._posted = self._posted, []
            sends, self._acks = list(self._acks.values()), {}
            self._notify()
        for p in posted:
            p.on_done(None, OperationTimeoutError(f"receive cancelled: {reason}"))
        for on_ack in sends:
            on_ack(OperationTimeoutError(f"send cancelled: {reason}"))

    # ---- acknowledged sends -------------------------------------------------------------------
    def expect_ack(self, peer: int, seq: int,
                   on_ack: Callable[[BaseException | None], None]) -> None:
        """Before sending message `seq` to `peer`: `on_ack(None)` runs when the receiver
        acknowledges it, `on_ack(error)` if the peer fails (or the group closes) first."""
        with self._cv:
            error: BaseException | None = None
            if peer in self._failed:
                error = PeerFailedError([peer], self._failed[peer])
            elif self._closed is not None:
                error = OperationTimeoutError(f"group closed: {self._closed}")
            else:
                self._acks[(peer, seq)] = on_ack
                return
        on_ack(error)

    def deliver_ack(self, peer: int, seq: int) -> None:
        with self._cv:
            on_ack = self._acks.pop((peer, seq), None)
        if on_ack is not None:
            on_ack(None)

    def cancel_ack(self, peer: int, seq: int) -> bool:
        with self._cv:
            return self._acks.pop((peer, seq), None) is not None

    # ---- consumers ------------------------------------------------------------------------
    def failed(self) -> dict[int, str]:
        with self._cv:
            return dict(self._failed)

    def is_failed(self, rank: int) -> bool:
        return rank in self._failed

    def take_coll(self, src: int, seq: int, step: int, deadline: float,
                  vet: Callable[[Header], str] | None = None,
                  probe: Callable[[], bool] | None = None,
                  epoch: int | None = None) -> Frame:
        """Wait for the frame (src, seq, step); raise if src fails, seq aborts or time runs out.

        While waiting, `vet` sees every other frame of the same collective: a frame from a rank
        we do not expect to hear from can still prove the ranks made different calls (e.g. two
        roots), which turns a would-be timeout into a mismatch error. `probe` (polled every
        `PROBE_SLICE` s) says src runs this collective over another transport, so its frame
        will never come: ViewLagError. So does (with `epoch`, the view we run it under) a
        frame from src that shows it runs this collective under another view, or has moved
        on past it (see `_moved_on`).
        """
        key = (src, seq, step)
        with self._cv:
            while True:
                frame = self._coll.pop(key, None)
                if frame is not None:
                    return frame
                if vet is not None or epoch is not None:
                    for (s, q, _t), (h, _p) in self._coll.items():
                        if epoch is not None and s == src:
                            lag = _moved_on(h, seq, epoch)
                            if lag:
                                raise ViewLagError(lag)
                        problem = vet(h) if vet is not None and q == seq else ""
                        if problem:
                            raise CollectiveMismatchError(problem)
                if self._aborted:  # a mismatch poisons the group: every collective wait ends
                    raise CollectiveMismatchError(next(iter(self._aborted.values())))
                if src in self._failed:
                    raise PeerFailedError([src], self._failed[src])
                if self._closed is not None:
                    raise OperationTimeoutError(f"group closed: {self._closed}")
                if probe is not None and probe():
                    raise ViewLagError(f"rank {src} runs collective #{seq} over shared memory")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OperationTimeoutError(
                        f"timed out waiting for rank {src} in collective #{seq} (step {step})")
                wait = left if probe is None else min(left, PROBE_SLICE)
                if self._pump is None or self._poller:
                    self._cv.wait(wait)
                    continue
                # read src's link here: the frame then needs one wake-up (ours), not the
                # reader's and then ours; the state checks above run again after each read
                self._poller = threading.get_ident()
                self._cv.release()
                try:
                    pumped = self._pump(src, self._wake, wait)
                finally:
                    self._cv.acquire()
                    self._poller = 0
                    if self._wake_leftover >= 0:
                        os.close(self._wake_leftover)
                        self._wake_leftover = -1
                if not pumped:
                    self._cv.wait(wait)

    def has_coll(self, src: int, seq: int, step: int) -> bool:
        """Whether the frame (src, seq, step) waits here (a dict lookup: no lock needed)."""
        return (src, seq, step) in self._coll

    def has_coll_from(self, src: int, seq: int) -> bool:
        """Whether a frame of collective `seq` or a later one from `src` waits here."""
        if not self._coll:
            return False
        with self._cv:
            return any(s == src and q >= seq for s, q, _t in self._coll)

    def forget_seq(self, seq: int) -> None:
        """Collective `seq` ended: drop its frames (and any older), refuse later ones.

        The floor is raised without the lock (this runs after every collective); a frame
        that a reader stores concurrently is dropped by the next call, so at most one
        collective's stragglers wait here at any time."""
        self._floor = max(self._floor, seq + 1)
        if not self._coll and not self._dest:  # the common case: nothing was queued
            return
        with self._cv:
            for key in [k for k in self._coll if k[1] < self._floor]:
                del self._coll[key]
            for key in [k for k in self._dest if k[1] < self._floor]:
                del self._dest[key]

    def restart_at(self, seq: int) -> None:
        """This rank's next collective is `seq` (a joiner taking the group's numbering).
        Frames of `seq` and later stay: members may send them before we learn of our admission."""
        with self._cv:
            self._floor = seq
            for key in [k for k in self._coll if k[1] < seq]:
                del self._coll[key]
            for key in [k for k in self._dest if k[1] < seq]:
                del self._dest[key]

    def discard_p2p(self, rank: int) -> int:
        """Drop `rank`'s queued point-to-point frames (its slot left the group, or another
        process took it: they can never be received); returns how many."""
        with self._cv:
            gone = [k for k in self._p2p if k[0] == rank]
            n = 0
            for k in gone:
                for _h, payload in self._p2p.pop(k):
                    self._p2p_order.pop(id(payload), None)
                    n += 1
            return n

    def post_p2p(self, src: int | None, tag: int,
                 on_done: Callable[[Frame | None, BaseException | None], None]) -> None:
        """Post a receive: completes at once from a queued frame, else when one arrives."""
        with self._cv:
            frame = self._pop_queued(src, tag)
            error: BaseException | None = None
            if frame is None:
                if src is not None and src in self._failed:
                    error = PeerFailedError([src], self._failed[src])
                elif self._closed is not None:
                    error = OperationTimeoutError(f"group closed: {self._closed}")
                else:
                    self._posted.append(PostedRecv(src, tag, on_done, next(self._post_order)))
                    return
        on_done(frame, error)

    def cancel_p2p(self, on_done: Callable) -> bool:
        with self._cv:
            for i, p in enumerate(self._posted):
                if p.on_done is on_done:
                    del self._posted[i]
                    return True
        return False

    def _pop_queued(self, src: int | None, tag: int) -> Frame | None:
        if src is not None:
            q = self._p2p.get((src, tag))
            if not q:
                return None
            frame = q.popleft()
        else:
            best = None
            for (_src, t), q in self._p2p.items():
                if t == tag and q:
                    order = self._p2p_order[id(q[0][1])]
                    if best is None or order < best[0]:
                        best = (order, q)
            if best is None:
                return None
            frame = best[1].popleft()
        self._p2p_order.pop(id(frame[1]), None)
        return frame
