"""GroupRuntime: one group's state in one process, and the glue between the shells.

It owns the data-plane transport and the mailbox, talks to the store through StorePlane, and
holds the applied View. The ProcessGroup binding asks it for an OpContext per collective; the
algorithms move frames through it. No algorithm or torch binding code lives here.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..collectives.context import OpContext, OpSpec
from ..control.store_plane import StorePlane
from ..core.framing import Header, MsgType
from ..core.membership import ExecMode, View
from ..errors import (
    CollectiveMismatchError,
    GroupStateError,
    OperationTimeoutError,
    PeerFailedError,
)
from ..options import Options
from ..transport.mailbox import Mailbox
from ..transport.tcp import TcpTransport


def default_host() -> str:
    return os.environ.get("ELASTICPG_HOST", "127.0.0.1")


class GroupRuntime:
    def __init__(self, store: dist.Store, rank: int, world_size: int, group_id: str,
                 timeout: float, options: Options) -> None:
        options.validate(world_size)
        self.rank = rank
        self.world_size = world_size
        self.slots = options.max_group_size or world_size
        if not 0 <= rank < self.slots:
            raise ValueError(f"rank {rank} is outside the group's {self.slots} slots")
        self.group_id = group_id
        self.options = options
        self.timeout = options.timeout_seconds() or timeout
        self.plane = StorePlane(store, self.timeout)
        self.mailbox = Mailbox()
        self.mode = ExecMode.ISOLATED if options.is_extension else ExecMode.NORMAL
        self.view = View.initial(self.slots, range(world_size))
        self._seq = 0
        self._poison: str | None = None
        self._destroyed = False
        self._link_locks: dict[int, threading.Lock] = {}
        self._lock = threading.Lock()
        self._on_failure: list[Callable[[int, str], None]] = []

        secret = self.plane.secret()
        self.incarnation = self.plane.register(rank)
        self.transport = TcpTransport(
            rank, secret, scope=group_id, host=options.host or default_host(),
            on_frame=self._on_frame, on_lost=self._on_lost,
            on_connected=self._on_connected, incarnation=self.incarnation)
        host, port = self.transport.endpoint
        self.plane.publish_endpoint(rank, host, port, self.incarnation)
        self._mirror_mask()
        if self.mode == ExecMode.NORMAL:
            # Open our outgoing links now, so that every peer holds a socket from us and sees
            # at once when this process dies, even before the first collective.
            threading.Thread(target=self._connect_all, name=f"elasticpg-connect-r{rank}",
                             daemon=True).start()

    # ---- data-plane callbacks (reader threads) ------------------------------------------------
    def _on_frame(self, header: Header, payload: torch.Tensor) -> None:
        if header.type == MsgType.COLL:
            self.mailbox.deliver_coll(header, payload)
        elif header.type == MsgType.P2P:
            self.mailbox.deliver_p2p(header, payload)
        elif header.type == MsgType.ABORT:
            reason = bytes(payload.numpy()).decode(errors="replace")
            self._poison = self._poison or reason
            self.mailbox.abort(header.seq, reason)

    def _on_lost(self, peer: int, reason: str) -> None:
        self.fail_peer(peer, reason)

    def _on_connected(self, peer: int, incarnation: int) -> None:
        self.mailbox.revive_peer(peer)

    def fail_peer(self, peer: int, reason: str) -> None:
        if self._destroyed:
            return
        self.transport.drop(peer)
        self.mailbox.fail_peer(peer, reason)
        for cb in list(self._on_failure):
            cb(peer, reason)

    # ---- links --------------------------------------------------------------------------------
    def _connect_all(self) -> None:
        for peer in self.view.active:
            if peer == self.rank or self._destroyed:
                continue
            try:
                self.ensure_link(peer, time.monotonic() + self.timeout)
            except (PeerFailedError, OperationTimeoutError):
                pass  # recorded; the operation that needs this peer reports it

    def ensure_link(self, peer: int, deadline: float) -> None:
        if self.transport.connected(peer):
            return
        if self.mailbox.is_failed(peer):
            raise PeerFailedError([peer], self.mailbox.failed().get(peer, "failed"))
        with self._lock:
            lock = self._link_locks.setdefault(peer, threading.Lock())
        with lock:
            if self.transport.connected(peer):
                return
            left = deadline - time.monotonic()
            host, port, _ = self.plane.endpoint(peer, timeout=max(left, 0.001))
            try:
                self.transport.connect(peer, host, port, max(deadline - time.monotonic(), 0.01))
            except OSError as exc:
                self.fail_peer(peer, f"cannot connect: {exc}")
                raise PeerFailedError([peer], f"cannot connect: {exc}") from None

    def send_frame(self, peer: int, header: Header, payload: memoryview | bytes,
                   deadline: float) -> None:
        if peer == self.rank:
            copy = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) \
                else torch.empty(0, dtype=torch.uint8)
            self._on_frame(header, copy)
            return
        self.ensure_link(peer, deadline)
        try:
            self.transport.send(peer, header, payload)
        except OSError as exc:
            # Declare the peer failed only once its incoming link has closed too, so every
            # frame it sent before going away (an ABORT, its last contribution) is seen first.
            self.transport.drop(peer)
            if not self.transport.has_incoming(peer):
                self.fail_peer(peer, f"send failed: {exc}")
            raise PeerFailedError([peer], f"send failed: {exc}") from None

    def report_mismatch(self, seq: int, peers: list[int], reason: str) -> None:
        """Tell the other participants that collective `seq` is broken, then poison the group."""
        self._poison = self._poison or reason
        data = reason.encode()
        for p in peers:
            try:
                self.send_frame(p, Header(MsgType.ABORT, self.rank, len(data), seq=seq), data,
                                time.monotonic() + 1.0)
            except (PeerFailedError, OperationTimeoutError):
                pass

    # ---- operations ---------------------------------------------------------------------------
    def check_usable(self) -> None:
        if self._destroyed:
            raise GroupStateError(f"group {self.group_id!r} was destroyed")
        if self._poison is not None:
            raise GroupStateError(f"group {self.group_id!r} is unusable after an earlier "
                                  f"collective mismatch: {self._poison}")
        if self.mode == ExecMode.QUIESCING:
            raise GroupStateError("group is quiescing inside join_group: no new work")
        if self.mode == ExecMode.NORMAL and not self.view.is_active(self.rank):
            raise GroupStateError(f"rank {self.rank} is not active in group {self.group_id!r} "
                                  f"(epoch {self.view.epoch}); call join_group to rejoin")

    def participants(self) -> tuple[int, ...]:
        return (self.rank,) if self.mode == ExecMode.ISOLATED else self.view.active

    def new_op(self, spec: OpSpec) -> OpContext:
        self.check_usable()
        seq = self._seq
        self._seq += 1
        return OpContext(self, self.rank, self.participants(), seq, self.view.epoch, spec,
                         time.monotonic() + self.timeout)

    def finish_op(self, ctx: OpContext) -> None:
        self.mailbox.forget_seq(ctx.seq)

    def run_op(self, spec: OpSpec, body: Callable[[OpContext], None]) -> OpContext:
        ctx = self.new_op(spec)
        try:
            body(ctx)
            if self._poison is not None:  # a peer reported a mismatch while we ran
                raise CollectiveMismatchError(self._poison)
        except CollectiveMismatchError as exc:
            self._poison = self._poison or str(exc)
            raise
        finally:
            self.finish_op(ctx)
        return ctx

    def p2p_deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _mirror_mask(self) -> None:
        t = self.options.active_ranks
        if t is not None:
            t.copy_(torch.tensor(self.view.mask(), dtype=torch.int32))

    def active_mask(self) -> torch.Tensor:
        return torch.tensor(self.view.mask(), dtype=torch.int32)

    def destroy(self) -> None:
        if self._destroyed:
            return
        self._destroyed = True
        self.mailbox.close("group destroyed")
        self.transport.close(goodbye=True)
