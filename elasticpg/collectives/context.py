"""One collective's view of the world: who takes part, what each message must look like, and
which peers failed during it.

The exclusion rule (SPEC section 4): a peer's contribution counts at this rank iff this rank
received it whole. A peer that fails mid-operation is recorded in `failed`, its contribution
is skipped, and the operation completes over the rest with local_success=False.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch

from ..core.dtypes import dtype_name
from ..core.framing import Header, MsgType, OpKind
from ..core.schedules import peer_order
from ..errors import CollectiveMismatchError, OperationTimeoutError, PeerFailedError
from ..transport.mailbox import Mailbox, ViewLagError
from ..transport.tcp import tensor_bytes


class Link(Protocol):
    """What the context needs from the group runtime to move one frame."""

    mailbox: Mailbox

    def send_frame(self, peer: int, header: Header, payload: memoryview | bytes,
                   deadline: float) -> None: ...

    def report_mismatch(self, seq: int, peers: list[int], reason: str) -> None: ...

    def note_decision(self, epoch: int, active: frozenset[int]) -> None: ...

    def shm_probe(self, peer: int, seq: int, epoch: int) -> Callable[[], bool] | None: ...

    def excluded_after(self, peer: int, epoch: int) -> bool: ...

    def scratch(self, peer: int, seq: int, nbytes: int) -> torch.Tensor: ...


EXPECT_FROM = 1 << 16  # payload bytes from which receives go straight to their destination


class OpSpec(NamedTuple):
    """What every participant must agree on. (A tuple: one is built per collective.)"""

    kind: OpKind
    dtype: int = 0
    numel: int = 0  # per-rank element count, meaning depends on the kind
    root: int = -1
    redop: int = 0


@dataclass
class OpContext:
    link: Link
    me: int
    participants: tuple[int, ...]
    seq: int
    epoch: int
    spec: OpSpec
    deadline: float
    ready: int = 0  # joiners this rank has seen ready, sent with every frame (see runtime)
    failed: set[int] = field(default_factory=set)
    heard_ready: dict[int, int] = field(default_factory=dict)
    shm: Any = None  # a ShmOp when every participant shares this host (see runtime.new_op)
    peers: list[int] = field(init=False)  # everyone else, in this rank's ring order
    lagged: set[int] = field(default_factory=set)  # skipped for view lag (see lag); in failed
    # give up on a peer that misses the deadline instead of failing the operation: it is then
    # in failed and timed_out, and counts as having sent nothing (elasticpg.ep's timeout_us)
    give_up_on_timeout: bool = False
    timed_out: set[int] = field(default_factory=set)
    # the last header sent, with what it was built from: a direct exchange sends the same one
    # to every peer, and building a frozen Header costs more than sending a small frame (the
    # key holds spec, seq and ready too: a reused context, group.lane, runs many ops)
    _last_header: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.peers = peer_order(self.me, self.participants)

    @property
    def failed_peers(self) -> set[int]:
        """The peers that failed during this op (excludes those only skipped for view lag)."""
        return self.failed - self.lagged if self.lagged else self.failed

    def header(self, step: int, nbytes: int, numel: int | None = None) -> Header:
        s = self.spec
        return Header(MsgType.COLL, self.me, nbytes, s.kind, s.dtype, s.redop, self.epoch,
                      self.seq, step, s.numel if numel is None else numel, s.root,
                      ready=self.ready)

    def send(self, peer: int, step: int, tensor: torch.Tensor | None = None) -> bool:
        """Send `tensor` (or an empty frame) to `peer`; False if the peer failed."""
        if peer in self.failed:
            return False
        payload = tensor_bytes(tensor) if tensor is not None else b""
        numel = tensor.numel() if tensor is not None else None
        if self.spec.kind not in (OpKind.ALLTOALL, OpKind.ALLTOALL_SINGLE):
            numel = None  # the op-level count identifies the call (per message only for all_to_all)
        nbytes = len(payload)
        key = (self.spec, self.seq, self.ready, step, nbytes, numel)
        last = self._last_header
        if last is not None and last[0] == key:
            header = last[1]
        else:
            header = self.header(step, nbytes, numel)
            self._last_header = (key, header)
        try:
            self.link.send_frame(peer, header, payload, self.deadline)
        except PeerFailedError:
            self.failed.add(peer)
            return False
        return True

    def expect(self, peer: int, step: int, dest: torch.Tensor) -> None:
        """Let `peer`'s frame for `step` land in `dest` (contiguous) if it has not come yet:
        large payloads only, where allocating (page faults) and copying cost more than the
        lock this takes. `recv` then returns a view of `dest`."""
        nbytes = dest.numel() * dest.element_size()
        if nbytes >= EXPECT_FROM and peer not in self.failed:
            self.link.mailbox.expect(peer, self.seq, step, dest.reshape(-1).view(torch.uint8))

    def scratch(self, peer: int, like: torch.Tensor) -> torch.Tensor:
        """A reusable receive buffer shaped like `like`, for `peer`'s frame of this op."""
        return self.link.scratch(peer, self.seq, like.numel() * like.element_size()) \
            .view(like.dtype)

    def recv(self, peer: int, step: int, dtype: torch.dtype, numel: int,
             msg_numel: int | None = None,
             probe: Callable[[], bool] | None = None) -> torch.Tensor | None:
        """The tensor `peer` sent for this step, or None if the peer failed first
        (`numel` < 0: whatever size it sent). `probe` (default: the peer's shared memory
        moved on) says the peer runs another form of this op: the wait ends as view lag.

        Raises CollectiveMismatchError (after telling the other participants) when the frame
        belongs to a different call: other op, dtype, count, root or reduce op. A peer already
        failed (or skipped for view lag) in this op is not waited for again in a later step.
        """
        if peer in self.failed:
            return None
        try:
            header, payload = self.link.mailbox.take_coll(
                peer, self.seq, step, self.deadline, vet=self._vet,
                probe=probe if probe is not None else
                self.link.shm_probe(peer, self.seq, self.epoch), epoch=self.epoch)
        except PeerFailedError:
            self.failed.add(peer)
            return None
        except ViewLagError:
            self.lagged.add(peer)  # view lag: skipped, not failed (see lag)
            self.failed.add(peer)
            return None
        except OperationTimeoutError:
            if not self.give_up_on_timeout:
                raise
            self.timed_out.add(peer)
            self.failed.add(peer)
            return None
        except CollectiveMismatchError as exc:
            self._mismatch(str(exc))
        if numel < 0:  # any size: the frame says how many (a sized all_to_all)
            numel, msg_numel = header.nbytes // dtype.itemsize, header.numel
        expect_numel = self.spec.numel if msg_numel is None else msg_numel
        problem = self._compare(header, expect_numel, numel * dtype.itemsize)
        if problem:
            if self.lag(peer, header.epoch):
                return None
            self._mismatch(problem)
        self.heard_ready[peer] = header.ready
        return payload.view(dtype) if numel else payload[:0].view(dtype)

    def lag(self, peer: int, peer_epoch: int) -> bool:
        """Whether a disagreement with `peer` is view lag rather than a program error; if so,
        skip `peer` for this operation.

        While a membership change spreads, two ranks may run one operation under different
        views, and sizes laid out by the number of participants (an even all_to_all split, a
        flat buffer per active rank) then differ. That is no reason to poison the group: the
        operation completes without that peer (local_success False, but no exclusion: the peer
        is healthy) and the lagging rank applies the newer view at its next boundary."""
        if peer_epoch == self.epoch:
            return False
        self.lagged.add(peer)
        self.failed.add(peer)
        return True

    def _vet(self, h: Header) -> str:
        """Check a frame of this collective from any rank (counts only where they are per-op)."""
        if h.epoch != self.epoch:
            return ""  # another view's layout: judged (as lag) when that frame is taken
        per_message = self.spec.kind in (OpKind.ALLTOALL, OpKind.ALLTOALL_SINGLE)
        return self._compare(h, h.numel if per_message else self.spec.numel,
                             h.nbytes if per_message else None)

    def _mismatch(self, problem: str) -> None:
        if problem.startswith("collective #"):
            reason = problem  # already phrased by a peer's ABORT
        else:
            reason = f"collective #{self.seq} mismatch seen by rank {self.me}: {problem}"
        self.link.report_mismatch(self.seq, [p for p in self.participants if p != self.me],
                                  reason)
        raise CollectiveMismatchError(reason)

    def _compare(self, h: Header, expect_numel: int, expect_nbytes: int | None) -> str:
        s = self.spec
        mine = f"rank {self.me}"
        if h.kind != s.kind:
            return f"rank {h.src} called {h.kind.name}, {mine} called {s.kind.name}"
        if h.dtype != s.dtype:
            return (f"rank {h.src} used dtype {dtype_name(h.dtype)}, {mine} used "
                    f"{dtype_name(s.dtype)}")
        if h.root != s.root:
            return f"rank {h.src} used root {h.root}, {mine} used root {s.root}"
        if h.redop != s.redop:
            return f"rank {h.src} used reduce op #{h.redop}, {mine} used #{s.redop}"
        if h.numel != expect_numel or (expect_nbytes is not None and h.nbytes != expect_nbytes):
            return (f"rank {h.src} sent {h.numel} elements ({h.nbytes} bytes), {mine} expected "
                    f"{expect_numel} ({expect_nbytes} bytes)")
        return ""

    def remaining(self) -> float:
        return self.deadline - time.monotonic()
