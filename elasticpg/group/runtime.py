"""GroupRuntime: one group's state in one process, and the glue between the shells.

It owns the data-plane transport and the mailbox, talks to the store through GroupStore, and
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
from ..collectives.shm_exchange import ShmOp
from ..control.group_store import GroupStore
from ..core.dtypes import dtype_code
from ..core.framing import Header, MsgType, OpKind
from ..core.membership import ExecMode, View
from ..errors import (
    CollectiveMismatchError,
    GroupStateError,
    OperationTimeoutError,
    PeerFailedError,
)
from ..options import Options, positive_env
from ..transport.mailbox import Mailbox
from ..transport.tcp import TcpTransport
from .lane import Lane
from .shm_host import ShmHost
from .views import ViewKeeper

DEFAULT_FAILURE_TIMEOUT = 3.0  # seconds; a hung peer is declared failed after this much silence
# collectives in which every participant receives a frame from every other participant
AGREEING_KINDS = frozenset({OpKind.ALLREDUCE, OpKind.ALLGATHER, OpKind.ALLGATHER_INTO_TENSOR,
                            OpKind.REDUCE_SCATTER, OpKind.REDUCE_SCATTER_TENSOR, OpKind.ALLTOALL,
                            OpKind.ALLTOALL_SINGLE, OpKind.BARRIER, OpKind.MEMBERSHIP})


def env_failure_timeout() -> float | None:
    """$ELASTICPG_FAILURE_TIMEOUT (seconds): the hang-detection bound when Options gives none,
    so that operators can tune it for a loaded machine without changing code."""
    return positive_env("ELASTICPG_FAILURE_TIMEOUT", "seconds")


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
        self.control = GroupStore(store, self.timeout)
        self.mailbox = Mailbox()
        self.mode = ExecMode.ISOLATED if options.is_extension else ExecMode.NORMAL
        self.failure_timeout = (options.failure_timeout or env_failure_timeout()
                                or min(self.timeout, DEFAULT_FAILURE_TIMEOUT))
        self.heartbeat_interval = options.heartbeat_interval or self.failure_timeout / 6
        self.auto_deactivate = options.auto_deactivate_on_failure
        self.auto_sync = options.auto_sync_on_failure
        self._seq = 0
        self._poison: str | None = None
        self._destroyed = False
        self._dirty = False  # a failure or a foreign view decision awaits the next op boundary
        self._lane: Lane | None = None  # see lane()
        self._local_ready = 0  # bitmask: joiners whose JOIN we got and whom we linked back to
        self._joiner_inc: dict[int, int] = {}  # joiner slot -> incarnation that asked to join
        self.agreed_ready = 0  # bitmask every active member agreed on (see _agree_ready)
        self._peek_seq = -1  # op sequence number at the last peer_state call
        self._noted_epoch = 0  # newest decided epoch whose consequences were noted
        self._joining = False
        self._link_locks: dict[int, threading.Lock] = {}
        self._linked_inc: dict[int, int] = {}  # incarnation each outgoing link was opened to
        self._lock = threading.Lock()
        self.views = ViewKeeper(self.control, rank, View.initial(self.slots, range(world_size)),
                                on_applied=self._view_applied, announce=self._announce_view)

        secret = self.control.secret()
        self.incarnation = self.control.register(rank)
        # published before the TCP endpoint: whoever can reach us knows whether we share a host
        self.shm = ShmHost(self.control, rank, self.slots)
        self.shm.publish()
        self.transport = TcpTransport(
            rank, secret, scope=group_id, host=options.host or default_host(),
            on_frame=self._on_frame, on_lost=self._on_lost,
            on_connected=self._on_connected, incarnation=self.incarnation)
        host, port = self.transport.endpoint
        self.control.publish_endpoint(rank, host, port, self.incarnation)
        if not options.is_extension:
            self.control.store.set("founders", str(world_size))
        self._mirror_mask()
        self._threads = [threading.Thread(target=self._liveness_loop, daemon=True,
                                          name=f"elasticpg-liveness-r{rank}")]
        if self.mode == ExecMode.NORMAL:
            # Open our outgoing links now, so that every peer holds a socket from us and sees
            # at once when this process dies, even before the first collective.
            self._threads.append(threading.Thread(target=self._connect_all, daemon=True,
                                                  name=f"elasticpg-connect-r{rank}"))
        for t in self._threads:
            t.start()

    @property
    def view(self) -> View:
        return self.views.applied

    # ---- data-plane callbacks (reader threads) ------------------------------------------------
    def _on_frame(self, header: Header, payload: torch.Tensor) -> None:
        if header.type == MsgType.COLL:
            self.mailbox.deliver_coll(header, payload)
        elif header.type == MsgType.P2P:
            self.mailbox.deliver_p2p(header, payload)
        elif header.type == MsgType.VIEW:
            self.note_decision(header.epoch, header.ready)  # `ready` carries the active mask
        elif header.type == MsgType.JOIN:
            threading.Thread(target=self._link_back, args=(header.src, header.epoch),
                             daemon=True, name=f"elasticpg-linkback-r{self.rank}").start()
        elif header.type == MsgType.ABORT:
            reason = bytes(payload.numpy()).decode(errors="replace")
            self._poison = self._poison or reason
            self.mailbox.abort(header.seq, reason)
            self.shm.wake_all()

    def _on_lost(self, peer: int, reason: str) -> None:
        self.fail_peer(peer, reason)

    def _on_connected(self, peer: int, incarnation: int) -> None:
        self.mailbox.revive_peer(peer)

    def fail_peer(self, peer: int, reason: str) -> None:
        """Record that `peer` is gone; membership reacts at the next operation boundary."""
        if self._destroyed or self.mailbox.is_failed(peer):
            return
        self._local_ready &= ~(1 << peer)
        self.transport.drop(peer)
        self.transport.drop_incoming(peer)
        self.mailbox.fail_peer(peer, reason)
        self.shm.wake_all()  # a wait on its shared memory ends as fast as one on its socket
        if self.view.is_active(peer):
            self._dirty = True
            if self.auto_deactivate and not self.auto_sync:
                # mode (b): decide in the background, apply in sync_after_failure
                threading.Thread(target=self._decide_quietly, args=([peer],), daemon=True,
                                 name=f"elasticpg-decide-r{self.rank}").start()

    def note_decision(self, epoch: int, active_mask: int) -> None:
        """A view newer than ours was decided: release at once every wait it makes pointless.

        Waits on peers it excluded end (their contribution is not coming), and if it excluded
        this rank, all of its waits end: the operation then settles and reports the exclusion
        instead of waiting out its timeout for peers that no longer send to us."""
        if epoch <= self.view.epoch or epoch <= self._noted_epoch:
            return
        self._noted_epoch = epoch
        self._dirty = True
        me_out = not active_mask >> self.rank & 1
        for r in self.view.active:
            if r != self.rank and (me_out or not active_mask >> r & 1):
                self.mailbox.fail_peer(r, f"rank {self.rank} was excluded in epoch {epoch}"
                                       if me_out else f"excluded in epoch {epoch}")
        self.shm.wake_all()  # shared-memory waits re-check who failed

    def _poll_decisions(self) -> None:
        """Learn decisions that no VIEW frame brought (the decider may be the very peer we
        were cut off from): one store read per liveness tick."""
        if self.mode != ExecMode.NORMAL or not self.view.is_active(self.rank):
            return
        try:
            latest = self.control.latest_epoch()
            if latest > max(self.view.epoch, self._noted_epoch):
                view = self.control.view(latest, timeout=self.heartbeat_interval)
                self.note_decision(latest, view.active_mask)
        except Exception:  # noqa: BLE001 - the store may be gone at shutdown; retry next tick
            pass

    def _decide_quietly(self, failed: list[int]) -> None:
        try:
            self.views.exclude(failed, self._seq, apply=False)
        except Exception:  # noqa: BLE001 - the store may be gone at shutdown
            pass

    def _peer_closed(self, peer: int, reason: str) -> None:
        """A link to `peer` broke from our side. Wait for its incoming link to close too, so
        every frame it sent before going away is delivered first; fail it now if it has none."""
        self.transport.drop(peer)
        if not self.transport.has_incoming(peer):
            self.fail_peer(peer, reason)

    def _liveness_loop(self) -> None:
        """Heartbeats out, silence and closed links in: the bound on noticing a hung peer."""
        bound, tick = self.failure_timeout, self.heartbeat_interval
        last = time.monotonic()
        while not self._destroyed:
            for peer in self.transport.closed_outgoing(tick):
                self._peer_closed(peer, "connection closed")
            if self._destroyed:
                return
            now = time.monotonic()
            if now - last > bound / 2:
                # we were stalled ourselves (SIGSTOP, overload): nobody's silence is evidence
                self.transport.forgive_silence()
            last = now
            for peer in self.transport.heartbeat(tick, bound):
                self._peer_closed(peer, "stopped reading (heartbeat not accepted)")
            for peer in self.transport.silent(bound):
                self.fail_peer(peer, f"no heartbeat for more than {bound:.2f}s (hung?)")
            self._poll_decisions()

    # ---- joiners (healthy side) ------------------------------------------------------------------
    def _link_back(self, joiner: int, incarnation: int) -> None:
        """A joiner announced itself: open our link to its new incarnation, then count it ready."""
        # No "still active?" check: a rank rejoining in place may announce itself before we
        # applied the view that deactivated it. A JOIN is never late (activation needs our
        # readiness first), and readiness of an active rank is masked out in _agree_ready.
        if self._linked_inc.get(joiner) != incarnation:
            # a new process in that slot: our link (if any) goes to its dead predecessor. An
            # in-place rejoin keeps the live link: dropping it could make the rejoiner see us
            # as failed before our new link arrived.
            self.transport.drop(joiner)
        self.mailbox.revive_peer(joiner)
        try:
            self.ensure_link(joiner, time.monotonic() + self.timeout)
        except (PeerFailedError, OperationTimeoutError):
            return
        self._joiner_inc[joiner] = incarnation
        self._local_ready |= 1 << joiner

    def _agree_ready(self, ctx: OpContext) -> None:
        """After a collective in which every participant heard every other one, all of them
        hold the same set of ready-mask values: their AND is the agreed readiness. That makes
        get_peer_state return the same answer on every member at the same step."""
        if ctx.failed or len(ctx.heard_ready) != len(ctx.peers):  # heard only from peers
            return
        if not ctx.ready:  # the steady state: nobody is waiting to join, as far as we know
            self.agreed_ready = 0
            return
        agreed = ctx.ready
        for m in ctx.heard_ready.values():
            agreed &= m
        self.agreed_ready = agreed & ~self.view.active_mask

    def peer_state(self, ranks: list[int]) -> list[bool]:
        """Readiness as agreed at the last all-to-all collective, so that every member of a
        serving loop (collective, poll, collective, poll...) gets the same answer at the same
        step. A caller polling with no collective in between (a wait loop) sees its local
        readiness instead: recover_ranks re-agrees in its own exchange, so that is safe too."""
        idle = self._seq == self._peek_seq
        self._peek_seq = self._seq
        ready = self._local_ready if idle else self.agreed_ready
        return [self.view.is_active(r) or bool(ready >> r & 1) for r in ranks]

    # ---- views ----------------------------------------------------------------------------------
    def _view_applied(self, old: View, new: View) -> None:
        for r in range(self.slots):
            was, now = old.is_active(r), new.is_active(r)
            if was != now and r != self.rank:
                self.shm.forget(r)  # a replacement is another process with another region
            if was and not now and r != self.rank:
                self.mailbox.fail_peer(r, f"deactivated in epoch {new.epoch}")
            elif now and not was and r != self.rank:
                self.mailbox.revive_peer(r)
                self._local_ready &= ~(1 << r)
                self.agreed_ready &= ~(1 << r)
        self._mirror_mask()

    def _announce_view(self, view: View) -> None:
        for peer in range(self.slots):
            if peer != self.rank and self.transport.connected(peer):
                try:
                    self.transport.send(peer, Header(MsgType.VIEW, self.rank, 0,
                                                     epoch=view.epoch,
                                                     ready=sum(1 << r for r in view.active)))
                except OSError:
                    pass

    def _settle(self) -> None:
        """At an operation boundary: bring membership up to date according to the mode."""
        self._dirty = False
        try:
            if self.auto_deactivate and self.auto_sync:
                known = [r for r in self.mailbox.failed() if self.view.is_active(r)]
                if known:
                    self.views.exclude(known, self._seq)
                else:
                    self.views.catch_up()
            else:
                # modes (b) and (c) apply failure views only when asked, but a view that
                # removes this rank is applied at once so that it gets a clear error
                if any(not v.is_active(self.rank) for v in self.views.decided(self.view.epoch)):
                    self.views.catch_up()
        except (OperationTimeoutError, RuntimeError) as exc:
            self._dirty = True
            raise GroupStateError(f"cannot reach the store to settle membership: {exc}") from exc

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
            host, port, inc = self.control.endpoint(peer, timeout=max(left, 0.001))
            try:
                self.transport.connect(peer, host, port, max(deadline - time.monotonic(), 0.01))
                self._linked_inc[peer] = inc
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

    def prepare(self) -> tuple[int, ...]:
        """Bring membership up to date at this operation boundary; return who takes part.

        The binding lays out list/flat buffers by these participants, so the operation must then
        run over exactly them: pass them to run_op (views change only on this thread)."""
        if self._dirty and self.mode == ExecMode.NORMAL:
            self._settle()
        self.check_usable()
        return self.participants()

    def new_op(self, spec: OpSpec, participants: tuple[int, ...] | None = None) -> OpContext:
        if participants is None:
            participants = self.prepare()
        else:
            self.check_usable()
        seq = self._seq
        self._seq += 1
        ctx = OpContext(self, self.rank, participants, seq, self.view.epoch, spec,
                        time.monotonic() + self.timeout, ready=self._local_ready)
        if spec.kind != OpKind.MEMBERSHIP:
            regions = self.shm.regions_for(participants, self.timeout)
            if regions is not None:
                ctx.shm = ShmOp(ctx, self.shm, regions)
        return ctx

    def run_op(self, spec: OpSpec, body: Callable[[OpContext], None],
               participants: tuple[int, ...] | None = None) -> OpContext:
        return self.run(self.new_op(spec, participants), body)

    def lane(self) -> Lane | None:
        """The reusable per-op state of the healthy steady state (see group.lane), or None when
        the general path must run: membership to settle, poison, join in progress, no shm."""
        lane = self._lane
        if (self._dirty or self._poison is not None or self._destroyed
                or self.mode != ExecMode.NORMAL):
            return None
        view = self.view
        if lane is not None and lane.view is view:
            return lane
        self._lane = None
        if not view.is_active(self.rank) or len(view.active) < 2:
            return None
        regions = self.shm.regions_for(view.active, self.timeout)
        if regions is None or len(regions) < len(view.active) - 1:
            return None
        self._lane = Lane(self, view, regions)
        return self._lane

    def run(self, ctx: OpContext, body: Callable[[OpContext], None]) -> OpContext:
        """Run one collective's body, then what every collective needs afterwards."""
        try:
            body(ctx)
            if self._poison is not None:  # a peer reported a mismatch while we ran
                raise CollectiveMismatchError(self._poison)
            if ctx.spec.kind in AGREEING_KINDS:
                self._agree_ready(ctx)
            if ctx.failed_peers and self.auto_deactivate and self.auto_sync:
                # mode (a): the failed operation returns only once the hole is in the view
                self.views.exclude(ctx.failed_peers, self._seq)
        except CollectiveMismatchError as exc:
            self._poison = self._poison or str(exc)
            raise
        finally:
            self.mailbox.forget_seq(ctx.seq)
        return ctx

    # ---- membership calls ---------------------------------------------------------------------
    def agree_on_ranks(self, ranks: list[int], kind_code: int) -> set[int]:
        """A collective exchange of requested rank sets among the active members; the union.

        Members that called with different sets still agree: everyone computes the union of
        what it received. A member that fails during the exchange simply contributes nothing.
        """
        bad = [r for r in ranks if not 0 <= r < self.slots]
        if bad:
            raise ValueError(f"ranks {bad} outside the group's slots 0..{self.slots - 1}")
        mask = torch.zeros(self.slots, dtype=torch.int32)
        mask[list(ranks)] = 1
        spec = OpSpec(OpKind.MEMBERSHIP, dtype_code(torch.int32), self.slots, -1, kind_code)
        union = mask.clone()

        def exchange(ctx: OpContext) -> None:
            for p in ctx.peers:
                ctx.send(p, 0, mask)
            for p in ctx.peers:
                got = ctx.recv(p, 0, torch.int32, self.slots)
                if got is not None:
                    union.bitwise_or_(got)

        self.run_op(spec, exchange)
        return {int(r) for r in union.nonzero().flatten()}

    def deactivate(self, ranks: list[int]) -> View:
        """Collective: remove `ranks` (planned scale-down, graceful leave, framework decision)."""
        agreed = self.agree_on_ranks(ranks, kind_code=0)
        start = self._seq

        def make(base: View) -> View | None:
            todo = [r for r in agreed if base.is_active(r)]
            return base.after_deactivation(todo, start) if todo else None

        self.views.decide(make)
        return self.view

    def activate(self, ranks: list[int]) -> tuple[View, list[int], list[int]]:
        """Collective: admit the agreed-ready ones of `ranks`. Returns (view, admitted, dropped).

        The MEMBERSHIP exchange itself refreshes the agreed readiness, so members that polled
        get_peer_state on different steps still admit the same set, at the same sequence number.
        """
        agreed = self.agree_on_ranks(ranks, kind_code=1)
        todo = sorted(r for r in agreed if not self.view.is_active(r))
        admit = [r for r in todo if self.agreed_ready >> r & 1]
        dropped = [r for r in todo if r not in admit]
        if not admit:
            return self.view, [], dropped
        start = self._seq
        incs = {r: self._joiner_inc.get(r, 0) for r in admit}

        def make(base: View) -> View | None:
            new, _ = base.after_activation([r for r in admit if not base.is_active(r)],
                                           set(admit), start)
            return new

        self.views.decide(make)
        admitted = [r for r in admit if self.view.is_active(r)]
        for r in admitted:
            self.control.store.set(f"joined/{r}/{incs[r]}", str(self.view.epoch))
        return self.view, admitted, dropped

    def join(self, timeout: float | None = None) -> View:
        """Joiner side of deferred join: quiesce, declare ready, block until activated."""
        if self._destroyed:
            raise GroupStateError(f"group {self.group_id!r} was destroyed")
        if self._joining:
            raise GroupStateError("join_group is already in progress for this group")
        if self.mode == ExecMode.NORMAL and self.view.is_active(self.rank):
            raise GroupStateError(f"rank {self.rank} is already active in group "
                                  f"{self.group_id!r}; join_group is for extension ranks and "
                                  f"deactivated ranks")
        bound = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        self._joining, previous = True, self.mode
        self.mode = ExecMode.QUIESCING
        try:
            base = self._live_view(deadline)
            with self.views.lock:
                self.views.applied = base
            for peer in base.active:
                try:
                    self.ensure_link(peer, deadline)
                    self.transport.send(peer, Header(MsgType.JOIN, self.rank, 0,
                                                     epoch=self.incarnation))
                except (PeerFailedError, OperationTimeoutError, OSError):
                    pass  # a dead member will be excluded by the others
            key = f"joined/{self.rank}/{self.incarnation}"
            epoch = int(self.control.wait_key(key, max(deadline - time.monotonic(), 0.001)))
            view = self.control.view(epoch)
            with self.views.lock:
                self.views._apply(view)
            for r in view.active:  # a rejoiner may have written its peers off while it was out
                if r != self.rank:
                    self.mailbox.revive_peer(r)
            self._seq = view.start_seq
            self.mode = ExecMode.NORMAL
            self.views.catch_up()
            return self.view
        except BaseException:
            self.mode = previous
            raise
        finally:
            self._joining = False

    def _live_view(self, deadline: float) -> View:
        """The latest decided view, waiting (bounded) until our slot is free in it."""
        founders = int(self.control.wait_key("founders", max(deadline - time.monotonic(), 0.001)))
        while True:
            latest = self.control.latest_epoch()
            view = (self.control.view(latest) if latest else
                    View.initial(self.slots, range(founders)))
            if not view.is_active(self.rank):
                return view
            # the previous process in this slot is not excluded yet: wait for the next decision
            left = deadline - time.monotonic()
            if left <= 0:
                raise OperationTimeoutError(
                    f"slot {self.rank} is still active in the live group (epoch {view.epoch}); "
                    f"its previous process must be excluded before a replacement can join")
            try:
                self.control.view(latest + 1, timeout=left)
            except OperationTimeoutError:
                pass

    def sync_after_failure(self) -> tuple[str, View]:
        """Report failures seen here, wait for the decision, apply the latest view."""
        if self._destroyed:
            raise GroupStateError(f"group {self.group_id!r} was destroyed")
        before = self.view.epoch
        known = [r for r in self.mailbox.failed() if self.view.is_active(r)]
        if known and self.auto_deactivate:
            self.views.exclude(known, self._seq)
        else:
            self.views.catch_up()
        self._dirty = False
        if not self.view.is_active(self.rank):
            return "Rejected", self.view
        return ("Reconciled" if self.view.epoch != before else "NoPending"), self.view

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
        self.shm.wake_all()
        self.transport.close(goodbye=True)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)
        self.shm.close()
