"""GroupRuntime: one group's live state in one process, and the glue between the shells.

Theory of operation
-------------------
What state a group handle is in, and what moves it, is in `core/group_state.py` (a pure state
machine). This module is its shell: it feeds the machine events from its threads, under one
lock (`self._lock`), and carries out the decisions with I/O — links (`transport/tcp.py`),
frames matched to waiting operations (`transport/mailbox.py`), shared memory (`shm_host.py`),
the store (`control/group_store.py`), views (`views.py`).

Threads, and what each may write:

* the **caller** (the application's thread) runs every operation, the operation boundary
  (settling membership), join_group and the membership calls. It alone applies views (through
  ViewKeeper, under its lock) and advances the sequence number `_seq`.
* one **reader** per incoming link (transport) hands frames to the mailbox, and reports JOIN,
  VIEW and ABORT frames and broken links here. During a collective wait over TCP the caller
  reads the links it waits on itself and hands their frames over the same way (`_on_frame`);
  the reader then parks, and takes the link back when the caller's lease ends
  (`TcpTransport.pump`); a broken link is still reported by its reader. A reader never blocks
  on I/O of ours except a link-back thread start, and an exception while it handles a frame
  fails that link, reported.
* the **liveness** thread (`liveness.py`): heartbeats, silence, closed links, one store read per
  tick for decisions no VIEW frame brought.
* a short-lived **link-back** thread per JOIN: opens our link to the joiner and maps its
  shared memory, then counts it ready.
* in mode (b) at most one **decider** thread: decides failure views in the store, applies none.
* the **completion** thread of `torch_binding/work.py`: resolves Futures of receives, so user
  callbacks never run on a transport thread.

Every thread writes GroupState only under `self._lock` and never does I/O while holding it.

A failure, from a closed socket to an applied view: the kernel closes a dead peer's sockets; a
reader sees EOF (or the liveness thread sees the outgoing link readable at EOF, or a send
fails, or silence lasts past `failure_timeout`) and calls `fail_peer`. The machine records it
(once); the shell drops the peer's links, fails its waiters in the mailbox and wakes every
shared-memory sleeper, so the running collective completes without it (exclusion rule,
`collectives/context.py`). At the end of that collective, in mode (a), `run` decides the view
without it (compare-and-set of `view/<epoch>`; the winner tells everyone with a VIEW frame) and
applies it before returning. In mode (b) the decider thread decides in the background and
`sync_after_failure` applies; in mode (c) nothing happens until `deactivate_ranks`. Every other
rank applies the decided view at its next operation boundary (`prepare`).

The join handshake (joiner J for slot r, members M):
  1. J (in join_group, phase JOINING) waits until slot r is free in the live view, takes that
     view, writes `join/r/<inc>.<n>` = "waiting", links to every member, maps their shared
     memory and sends each a JOIN frame naming the attempt.
  2. Each M links back to J (and maps J's shared memory), then counts the attempt READY. Every
     all-to-all collective carries each member's readiness digest; when all are equal, every
     member agrees on the same ready set at the same step, and get_peer_state reports it.
  3. The members call recover_ranks (a collective exchange of the requested ranks); each
     compare-and-sets the attempt's key "waiting" -> "admitting@<seq>" (all with the same
     value, all see the same outcome), decides the view that activates the winners, and writes
     `joined/...` = epoch.
  4. J waits for `joined/...`. If its bound runs out first it compare-and-sets "waiting" ->
     "abandoned": if that wins, no member can admit it any more; J leaves its links (the
     members forget the attempt: nothing of it remains) and raises. If the members won, J
     finishes joining. Admitted, J applies the view and takes the group's sequence number.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from .. import events
from ..collectives import algorithms, shm_algorithms
from ..collectives.context import OpContext, OpSpec
from ..collectives.shm_exchange import ShmOp
from ..control.group_store import GroupStore
from ..core import hierarchy
from ..core.dtypes import ITEMSIZE_BY_CODE, dtype_code
from ..core.framing import Header, MsgType, OpKind, pack_join, pack_slots, unpack_join, unpack_slots
from ..core.group_state import (
    BoundaryAction,
    Call,
    CallRefusedError,
    Event,
    GroupState,
    JoinAttempt,
    Phase,
)
from ..core.hierarchy import HierPlan
from ..core.membership import ExecMode, View
from ..core.reduction import Reduce
from ..errors import (
    CollectiveMismatchError,
    ControlPlaneError,
    GroupStateError,
    OperationTimeoutError,
    PeerFailedError,
)
from ..options import Options, positive_env
from ..telemetry import prometheus
from ..telemetry.counters import GroupMetrics
from ..transport.mailbox import Mailbox
from ..transport.tcp import SendTimeoutError, TcpTransport
from .acks import Acker
from .lane import Lane
from .liveness import Liveness
from .shm_host import ShmHost
from .views import ViewKeeper

log = logging.getLogger("elasticpg.runtime")

DEFAULT_FAILURE_TIMEOUT = 3.0  # seconds; a hung peer is declared failed after this much silence
# collectives in which every participant receives a frame from every other participant
AGREEING_KINDS = frozenset({OpKind.ALLREDUCE, OpKind.ALLGATHER, OpKind.ALLGATHER_INTO_TENSOR,
                            OpKind.REDUCE_SCATTER, OpKind.REDUCE_SCATTER_TENSOR, OpKind.ALLTOALL,
                            OpKind.ALLTOALL_SINGLE, OpKind.BARRIER, OpKind.MEMBERSHIP})
STORE_TROUBLE = (ControlPlaneError, OperationTimeoutError)


def env_failure_timeout() -> float | None:
    """$ELASTICPG_FAILURE_TIMEOUT (seconds): the hang-detection bound when Options gives none,
    so that operators can tune it for a loaded machine without changing code."""
    return positive_env("ELASTICPG_FAILURE_TIMEOUT", "seconds")


def default_host() -> str:
    return os.environ.get("ELASTICPG_HOST", "127.0.0.1")


# Groups of this process that are not destroyed yet. A script may return (or a rank simulate a
# crash by returning) with its groups alive; their threads then sit in store and socket calls
# while the interpreter finalizes, which can abort the process (std::terminate) instead of a
# clean exit. At exit they are destroyed first: the peers see an orderly leave.
_LIVE: weakref.WeakSet[GroupRuntime] = weakref.WeakSet()


@atexit.register
def _destroy_live_groups() -> None:
    for rt in list(_LIVE):
        rt.destroy()


class GroupRuntime:
    def __init__(self, store: dist.Store, rank: int, world_size: int, group_id: str,
                 timeout: float, options: Options) -> None:
        options.validate(world_size)
        self.rank = rank
        self.world_size = world_size
        self.timeout = options.timeout_seconds() or timeout
        self.control = GroupStore(store, self.timeout)
        self.slots = options.max_group_size or world_size
        if options.is_extension:
            self.slots = self._adopt_capacity(self.slots)
        if not 0 <= rank < self.slots:
            raise ValueError(f"rank {rank} is outside the group's {self.slots} slots")
        self.group_id = group_id
        self.options = options
        self.mailbox = Mailbox()
        self.metrics = GroupMetrics()
        self.acker = Acker(f"elasticpg-acks-r{rank}", self._send_ack)
        self.failure_timeout = (options.failure_timeout or env_failure_timeout()
                                or min(self.timeout, DEFAULT_FAILURE_TIMEOUT))
        self.heartbeat_interval = options.heartbeat_interval or self.failure_timeout / 6
        self.auto_deactivate = options.auto_deactivate_on_failure
        self.auto_sync = options.auto_sync_on_failure
        self._lock = threading.Lock()  # guards self.state (see the theory of operation)
        self._news = threading.Condition(self._lock)  # a joiner became ready, a peer failed
        self._reported: set[int] = set()  # peers P2P operations completed without
        # members the newest noted (not yet applied) view excludes: see note_decision
        self.noted_out: frozenset[int] = frozenset()
        self.state = GroupState(rank, Phase.ISOLATED if options.is_extension else Phase.ACTIVE,
                                self.auto_deactivate, self.auto_sync)
        self._seq = 0
        self._lane: Lane | None = None  # see lane()
        self._peek_seq = -1  # op sequence number at the last peer_state call
        self._join_attempts = 0
        self._helpers: list[threading.Thread] = []  # link-back, decider, connect threads
        self._link_locks: dict[int, threading.Lock] = {}
        self._linked_inc: dict[int, int] = {}  # incarnation each outgoing link was opened to
        self._newest_inc: dict[int, int] = {}  # the newest process seen in each slot
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}  # see scratch
        # hierarchical collectives across hosts (see hier_plan); set alike on every rank:
        # "0" never, "always" at every size, else where core.hierarchy.pays says so
        hier_env = os.environ.get("ELASTICPG_HIERARCHICAL", "1")
        self.hierarchical = hier_env != "0"
        self.hier_every_size = hier_env == "always"
        self._hier: tuple[tuple[int, tuple[int, ...]], HierPlan | None] | None = None
        initial = View.initial(self.slots, range(world_size))
        self.views = ViewKeeper(self.control, rank, initial, on_applied=self._view_applied,
                                announce=self._announce_view, on_decided=self._view_decided)
        self.state.view_applied(0, initial.active)
        self._export_metrics()  # first: a port that cannot be served fails before any I/O

        secret = self.control.secret()
        self.incarnation = self.control.register(rank)
        self.shm, self.transport = self._open_data_plane(secret)
        pump = getattr(self.transport, "pump", None)  # scale-sim's in-process plane has none
        if pump is not None and os.environ.get("ELASTICPG_CALLER_READS", "1") != "0":
            self.mailbox.attach_pump(pump)
        host, port = self.transport.endpoint
        self.control.publish_endpoint(rank, host, port, self.incarnation)
        if not options.is_extension:
            self.control.announce_founders(world_size, self.slots)
        self._mirror_mask()
        self.liveness = Liveness(self)
        self._start_threads()

    def _open_data_plane(self, secret: bytes) -> tuple[ShmHost, TcpTransport]:
        """Shared memory and TCP links (overridden by `elasticpg scale-sim`, which runs the
        control plane of many ranks in one process with frames delivered in-process)."""
        # published before the TCP endpoint: whoever can reach us knows whether we share a host
        shm = ShmHost(self.control, self.rank, self.slots)
        shm.publish()
        return shm, TcpTransport(
            self.rank, secret, scope=self.group_id, host=self.options.host or default_host(),
            on_frame=self._on_frame, on_lost=self._on_lost,
            on_connected=self._on_connected, incarnation=self.incarnation,
            buffer_for=self.mailbox.buffer_for,
            handshake_timeout=min(10.0, self.failure_timeout), on_rejected=self._rejected)

    def _start_threads(self) -> None:
        self.liveness.start()
        _LIVE.add(self)
        if self.state.phase is Phase.ACTIVE:
            # Open our outgoing links now, so that every peer holds a socket from us and sees
            # at once when this process dies, even before the first collective.
            self._spawn(self._connect_all, "connect")

    def _adopt_capacity(self, declared: int) -> int:
        """A joiner takes the live group's slot capacity when it declared no more than that
        (e.g. a replacement that sized its active_ranks mirror by the world size, joining a
        group that reserved spare slots); declaring more than the group has is an error."""
        live = self.control.capacity()
        if live is None or live == declared:
            return declared
        if declared > live:
            raise ValueError(f"this rank declares {declared} slots, but the live group has "
                             f"{live} (its founders' max_group_size)")
        return live

    @property
    def view(self) -> View:
        return self.views.applied

    @property
    def mode(self) -> ExecMode:
        return self.state.exec_mode

    def _spawn(self, target: Callable, what: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, daemon=True,
                             name=f"elasticpg-{what}-r{self.rank}")
        with self._lock:
            self._helpers = [h for h in self._helpers if h.is_alive()]
            self._helpers.append(t)
        t.start()

    def _event(self, kind: str, level: int = logging.INFO, **fields: object) -> None:
        fields.setdefault("epoch", self.views.applied.epoch)
        events.emit(kind, self.group_id, self.rank, level, **fields)

    # ---- metrics ------------------------------------------------------------------------------
    def metrics_snapshot(self) -> dict:
        """Counters (telemetry/counters.py) plus the gauges read now: see elasticpg.metrics."""
        view = self.views.applied
        return self.metrics.snapshot(
            group=self.group_id, rank=self.rank, phase=self.state.phase.name.lower(),
            epoch=view.epoch, active_ranks=list(view.active),
            rejected_connections=getattr(getattr(self, "transport", None), "rejected", 0))

    def _export_metrics(self) -> None:
        prometheus.register(id(self), self.metrics_snapshot)
        port = self.options.metrics_port
        if port is None:
            port = prometheus.env_port()
        if port is None:
            return
        host = self.options.metrics_host or os.environ.get("ELASTICPG_METRICS_HOST",
                                                           "127.0.0.1")
        try:
            host, port = prometheus.serve(id(self), port, host)
        except BaseException:
            prometheus.unregister(id(self))
            raise
        self._event("metrics_endpoint", host=host, port=port)

    # ---- data-plane callbacks (reader threads) ------------------------------------------------
    def _on_frame(self, header: Header, payload: torch.Tensor) -> None:
        t = header.type
        if t == MsgType.COLL:
            self.mailbox.deliver_coll(header, payload)
        elif t == MsgType.P2P:
            self.mailbox.deliver_p2p(header, payload)
            if header.src != self.rank:
                self.acker.submit(header.src, header.seq)
        elif t == MsgType.P2P_ACK:
            self.mailbox.deliver_ack(header.src, header.seq)
        elif t == MsgType.VIEW:
            self.note_decision(header.epoch, unpack_slots(payload.numpy()))
        elif t == MsgType.JOIN:
            self._joiner_announced(JoinAttempt(header.src, *unpack_join(payload.numpy())))
        elif t == MsgType.ABORT:
            self._aborted(header.src, header.seq, bytes(payload.numpy()).decode(errors="replace"))

    def _on_lost(self, peer: int, reason: str, incarnation: int) -> None:
        # the transport's reasons: a GOODBYE, a closed or reset link, or a frame it could not
        # take (corrupt, truncated into a close, or a handler error): see TcpTransport._read_loop
        how = ("left" if reason == "peer left the group" else
               "bad_frame" if reason.startswith(("FramingError", "reader error")) else "eof")
        self.fail_peer(peer, reason, how=how, incarnation=incarnation)

    def _on_connected(self, peer: int, incarnation: int) -> None:
        self._seen_incarnation(peer, incarnation)
        self.mailbox.revive_peer(peer)
        with self._lock:
            self.state.revived(peer)

    def _rejected(self, remote: object, reason: str, seconds: float) -> None:
        """A connection to our data port did not prove membership (a foreign client, or a
        peer that died mid-handshake): it was closed unheard."""
        self._event("connection_rejected", logging.WARNING, remote=remote, reason=reason,
                    seconds=round(seconds, 3))

    def _seen_incarnation(self, peer: int, incarnation: int) -> None:
        with self._lock:
            if incarnation > self._newest_inc.get(peer, 0):
                self._newest_inc[peer] = incarnation

    def _aborted(self, src: int, seq: int, reason: str) -> None:
        """A participant reported a mismatch in collective `seq`: the group is poisoned."""
        with self._lock:
            if self.state.phase not in (Phase.ACTIVE, Phase.POISONED):
                return  # not a participant of anything: a straggler from before we left
            self.state.mismatch(reason)
            self.metrics.mismatches += 1
        self._event("mismatch", logging.WARNING, seq=seq, reported_by=src, reason=reason)
        self.mailbox.abort(seq, reason)
        self.shm.wake_all()

    # ---- failures and decisions ---------------------------------------------------------------
    def fail_peer(self, peer: int, reason: str, how: str = "",
                  incarnation: int | None = None) -> None:
        """Record that `peer` is gone; membership reacts at the next operation boundary.

        `incarnation`: the process the report is about, if known. A report about a process
        older than the newest one seen in that slot (a dead predecessor's link closing late,
        a connect to its old endpoint failing) is about nobody alive and changes nothing."""
        with self._lock:
            if self.state.phase is Phase.DESTROYED:
                return
            if incarnation is not None and incarnation < self._newest_inc.get(peer, 0):
                log.debug("rank %d: ignoring a failure of rank %d's earlier process %d: %s",
                          self.rank, peer, incarnation, reason)
                return
            note = self.state.note_failure(peer, reason)
            member = peer in self.state.active
            epoch = self.state.applied_epoch  # read with `member`: the caller may apply a view
            if note.first:
                self.metrics.failure(how or "other")
            self._news.notify_all()
        if not note.first:
            return
        self._event("peer_failed", logging.WARNING if member else logging.INFO, peer=peer,
                    reason=reason, how=how or "other", member=member, epoch=epoch)
        self.transport.drop(peer)
        self.transport.drop_incoming(peer)
        self.mailbox.fail_peer(peer, reason)
        self.shm.wake_all()  # a wait on its shared memory ends as fast as one on its socket
        if note.start_decider:
            self._spawn(self._decide_in_background, "decide")

    def link_broke(self, peer: int, reason: str, how: str, sock: object = None) -> None:
        """Our link to `peer` (the link `sock`, if given) broke. Wait for its incoming link to
        close too, so every frame it sent before going away is delivered first; fail it now if
        it has none."""
        inc = self.transport.drop(peer, sock)
        if sock is not None and inc is None:
            return  # a newer link replaced that one meanwhile: nothing of it broke
        if not self.transport.has_incoming(peer):
            self.fail_peer(peer, reason, how=how, incarnation=inc)

    def note_decision(self, epoch: int, active: frozenset[int]) -> None:
        """A view newer than ours was decided: release at once every wait it makes pointless.

        Waits on peers it excluded end (their contribution is not coming), and if it excluded
        this rank, all of its waits end: the operation then settles and reports the exclusion
        instead of waiting out its timeout for peers that no longer send to us."""
        with self._lock:
            if not self.state.note_decision(epoch):
                return
            me_out = self.rank not in active
            # (set difference: a view of 1024 slots, heard by each of 1023 members)
            out = frozenset(set(self.view.active).difference(() if me_out else active))
            # Kept apart from the mailbox's failure marks: an in-place rejoiner's JOIN, right
            # behind its leave's VIEW frame, revives it there (_link_back) before a waiter on
            # it may have looked, and a shared-memory wait would then wait out its timeout.
            self.noted_out = out
        for r in sorted(out):
            if r != self.rank:
                self.mailbox.fail_peer(r, f"rank {self.rank} was excluded in epoch {epoch}"
                                       if me_out else f"excluded in epoch {epoch}")
        self.shm.wake_all()  # shared-memory waits re-check who failed

    def excluded_after(self, peer: int, epoch: int) -> bool:
        """Does a view decided after `epoch` (noted here, maybe not applied) exclude `peer`?
        Then it takes no part in an operation of `epoch` that has not heard from it yet."""
        return self.state.noted_epoch > epoch and peer in self.noted_out

    def poll_decisions(self) -> None:
        """Liveness thread: one store read per tick for decisions no VIEW frame brought."""
        if self.state.phase is not Phase.ACTIVE:
            return
        try:
            latest = self.control.latest_epoch(bound=self.heartbeat_interval)
            if latest > max(self.view.epoch, self.state.noted_epoch):
                view = self.control.view(latest, timeout=self.heartbeat_interval)
                self.note_decision(latest, frozenset(view.active))
        except STORE_TROUBLE as exc:
            log.debug("rank %d: polling the store for views failed (retrying): %s",
                      self.rank, exc)

    def _decide_in_background(self) -> None:
        """Mode (b): decide failure views in the store; sync_after_failure applies them."""
        while True:
            with self._lock:
                todo = self.state.decider_work()
            if not todo:
                return
            try:
                self.views.exclude(todo, self._seq, apply=False, cause=self._failure_cause(todo))
            except STORE_TROUBLE as exc:
                log.warning("rank %d: deciding the exclusion of %s failed: %s (sync_after_"
                            "failure will retry)", self.rank, todo, exc)
                with self._lock:
                    self.state.deciding = False
                return

    def _failure_cause(self, peers: list[int]) -> str:
        with self._lock:
            why = {p: self.state.failed.get(p, "failed") for p in peers}
        return "; ".join(f"rank {p}: {r} (seen by rank {self.rank})" for p, r in why.items())

    # ---- joiners (member side) -----------------------------------------------------------------
    def _joiner_announced(self, join: JoinAttempt) -> None:
        with self._lock:
            if self.state.phase is not Phase.ACTIVE or not self.state.joiners.announced(join):
                return
        self._spawn(self._link_back, "linkback", join)

    def _link_back(self, join: JoinAttempt) -> None:
        """A joiner announced itself: open our link to its process, map its shared memory,
        then count the attempt ready (see the join handshake)."""
        r = join.slot
        # No "still active?" check: a rank rejoining in place may announce itself before we
        # applied the view that deactivated it; readiness of active slots never counts.
        self._seen_incarnation(r, join.incarnation)
        if self._linked_inc.get(r) != join.incarnation:
            # a new process in that slot: our link (if any) goes to its dead predecessor. An
            # in-place rejoin keeps the live link: dropping it could make the rejoiner see us
            # as failed before our new link arrived.
            self.transport.drop(r)
        self.mailbox.revive_peer(r)
        with self._lock:
            self.state.revived(r)
        deadline = time.monotonic() + self.timeout
        try:
            self.ensure_link(r, deadline)
            self.shm.prepare(r, max(deadline - time.monotonic(), 0.001))
        except (PeerFailedError, *STORE_TROUBLE) as exc:
            with self._lock:
                self.state.joiners.forget(r, join)
            self._event("joiner_gone", slot=r, incarnation=join.incarnation,
                        attempt=join.attempt, reason=f"linking back failed: {exc}")
            return
        with self._lock:
            ready = self.state.joiners.linked(join)
            self._news.notify_all()
        if ready:
            self._event("joiner_ready", slot=r, incarnation=join.incarnation,
                        attempt=join.attempt)

    def _agree_ready(self, ctx: OpContext) -> None:
        """After a collective in which every participant heard every other one, all of them
        hold the same readiness digests: see core.group_state.agree."""
        if ctx.failed or len(ctx.heard_ready) != len(ctx.peers):  # heard only from peers
            return
        joiners = self.state.joiners
        if not ctx.ready and not joiners.agreed and not any(ctx.heard_ready.values()):
            return  # the steady state: nobody is waiting to join
        with self._lock:
            if joiners.digest == ctx.ready:
                joiners.settle_agreement(ctx.heard_ready.values())
            else:
                joiners.agreed = frozenset()  # ours changed during the op: agree next time

    def peer_state(self, ranks: list[int]) -> list[bool]:
        """Readiness as agreed at the last all-to-all collective, so that every member of a
        serving loop (collective, poll, collective, poll...) gets the same answer at the same
        step. A caller polling with no collective in between (a wait loop) sees its local
        readiness instead: recover_ranks re-agrees in its own exchange, so that is safe too."""
        idle = self._seq == self._peek_seq
        self._peek_seq = self._seq
        with self._lock:
            ready = self.state.joiners.ready_slots(agreed=not idle)
            failed = set(self.state.failed)  # members seen failed, not yet out of the view
        return [(self.view.is_active(r) and r not in failed) or r in ready for r in ranks]

    def wait_ready(self, slots: list[int], timeout: float | None = None) -> None:
        """Wait (bounded) until this rank has seen a joiner ready in each of `slots` (the
        legacy scale-up, extend_group_size_to, admits joiners that may still be starting)."""
        bound = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        with self._news:
            while True:
                missing = [r for r in slots
                           if r not in self.state.joiners.ready_slots(agreed=False)]
                left = deadline - time.monotonic()
                if not missing:
                    return
                if left <= 0:
                    raise OperationTimeoutError(
                        f"no joiner became ready in slots {missing} within {bound:.1f}s")
                self._news.wait(left)

    def await_fewer(self, count: int, bound: float) -> None:
        """The caller laid out its buffers for `count` participants, fewer than this rank's
        view has: it knows of a member that is gone (a process exit races the caller's news of
        it) before this rank saw it fail. Wait (bounded) until no more than `count` members
        remain unfailed here, then settle the boundary."""
        deadline = time.monotonic() + bound
        with self._news:
            while len([r for r in self.view.active if r not in self.state.failed]) > count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._news.wait(left)
        if self.state.dirty:
            self._settle()

    def joiner_slots(self) -> list[int]:
        """Slots with a joiner this rank knows of or all members agreed ready, ascending."""
        with self._lock:
            joiners = self.state.joiners
            return sorted(set(joiners.slots()).union(joiners.ready_slots(agreed=True)))

    def num_agreed_ready(self) -> int:
        return len(self.state.joiners.agreed)

    # ---- views ----------------------------------------------------------------------------------
    def _view_applied(self, old: View, new: View) -> None:
        for r in old.changed_activity(new):  # (not every slot: usually 1 of 1024 changed)
            if r == self.rank:
                continue
            if old.is_active(r):
                self.shm.forget(r)  # its process left: a replacement has another region
                self.mailbox.fail_peer(r, f"deactivated in epoch {new.epoch}")
                dropped = self.mailbox.discard_p2p(r)
                if dropped:
                    log.info("rank %d: dropped %d unreceived message(s) from rank %d, which "
                             "left the group", self.rank, dropped, r)
            else:
                self.mailbox.revive_peer(r)  # mapped already when it became ready
        if old.active != new.active:
            self.shm.membership_changed()
        with self._lock:
            self.state.view_applied(new.epoch, new.active)
            self._reported &= set(new.active)  # failures this view covers are done
        self._mirror_mask()
        if new.epoch != old.epoch:  # (a joiner adopting the view it already had changes nothing)
            self.metrics.view_changes += 1
            self._event("view_applied", epoch=new.epoch, active=list(new.active),
                        cause=new.cause)

    def _view_decided(self, base: View, view: View) -> None:
        self._event("view_decided", epoch=view.epoch, active=list(view.active),
                    removed=sorted(set(base.active) - set(view.active)),
                    added=sorted(set(view.active) - set(base.active)), cause=view.cause)

    def _announce_view(self, view: View) -> None:
        payload = pack_slots(view.active)
        header = Header(MsgType.VIEW, self.rank, len(payload), epoch=view.epoch)
        deadline = time.monotonic() + min(self.timeout, 1.0)
        for peer in range(self.slots):
            if peer != self.rank and self.transport.connected(peer):
                try:
                    self.transport.send(peer, header, payload, deadline)
                except OSError:
                    pass  # a peer we cannot tell learns the view from the store within a tick

    def _settle(self) -> None:
        """At an operation boundary: bring membership up to date according to the mode."""
        with self._lock:
            action = self.state.boundary_action()
            token = self.state.begin_settle()
            failed = sorted(self.state.failed)
        try:
            if action is BoundaryAction.EXCLUDE:
                self.views.exclude(failed, self._seq, cause=self._failure_cause(failed))
            elif action is BoundaryAction.CATCH_UP:
                self.views.catch_up()
            elif action is BoundaryAction.CATCH_UP_IF_REMOVED:
                # modes (b) and (c) apply failure views only when asked, but a view that
                # removes this rank is applied at once so that it gets a clear error
                if any(not v.is_active(self.rank) for v in self.views.decided(self.view.epoch)):
                    self.views.catch_up()
        except STORE_TROUBLE as exc:
            raise GroupStateError(f"cannot reach the store to settle membership: {exc}") from exc
        with self._lock:
            self.state.end_settle(token)

    # ---- links --------------------------------------------------------------------------------
    def _connect_all(self) -> None:
        for peer in self.view.active:
            if peer == self.rank or self.state.phase is Phase.DESTROYED:
                continue
            try:
                self.ensure_link(peer, time.monotonic() + self.timeout)
            except (PeerFailedError, *STORE_TROUBLE):
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
                try:
                    self.transport.connect(peer, host, port,
                                           max(deadline - time.monotonic(), 0.01), incarnation=inc)
                except ConnectionRefusedError:
                    # The endpoint may be an earlier process's: a group created again on the
                    # same store, whose new process has not published yet. Wait (bounded) for
                    # a newer one; a peer that is really gone publishes none.
                    host, port, inc = self._newer_endpoint(peer, (host, port, inc), deadline)
                    self.transport.connect(peer, host, port,
                                           max(deadline - time.monotonic(), 0.01), incarnation=inc)
                self._linked_inc[peer] = inc
            except OSError as exc:
                self.fail_peer(peer, f"cannot connect: {exc}", how="connect", incarnation=inc)
                raise PeerFailedError([peer], f"cannot connect: {exc}") from None

    def _newer_endpoint(self, peer: int, stale: tuple[str, int, int],
                        deadline: float) -> tuple[str, int, int]:
        """An endpoint of `peer` other than `stale`, within failure_timeout (and `deadline`);
        raises ConnectionRefusedError if none appears."""
        until = min(deadline, time.monotonic() + self.failure_timeout)
        # (a destroyed group stops at once: destroy() joins its connect thread only briefly)
        while time.monotonic() < until and self.state.phase is not Phase.DESTROYED:
            current = self.control.endpoint(peer, timeout=max(until - time.monotonic(), 0.001))
            if current != stale:
                return current
            time.sleep(0.02)  # the store cannot wait for a key to change: poll it, bounded
        raise ConnectionRefusedError(f"rank {peer} refused the connection and published no "
                                     f"newer endpoint within {self.failure_timeout:.1f}s")

    def release_links(self) -> None:
        """Before a point-to-point operation (and before its wait blocks): links that the
        caller reads itself during collectives go back to their reader threads, so that the
        frame or acknowledgement awaited is delivered at once rather than when the caller's
        lease on the link runs out (`TcpTransport.pump`)."""
        release = getattr(self.transport, "release", None)
        if release is not None:
            release()

    def send_frame(self, peer: int, header: Header, payload: memoryview | bytes,
                   deadline: float) -> None:
        if peer == self.rank:
            copy = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if len(payload) \
                else torch.empty(0, dtype=torch.uint8)
            self._on_frame(header, copy)
            return
        self.ensure_link(peer, deadline)
        try:
            self.transport.send(peer, header, payload, deadline)
        except OSError as exc:
            # Declare the peer failed only once its incoming link has closed too, so every
            # frame it sent before going away (an ABORT, its last contribution) is seen first.
            self.link_broke(peer, f"send failed: {exc}",
                            how="send_timeout" if isinstance(exc, SendTimeoutError) else "send")
            raise PeerFailedError([peer], f"send failed: {exc}") from None

    def shm_probe(self, peer: int, seq: int, epoch: int) -> Callable[[], bool] | None:
        """For a TCP wait on `peer` in collective `seq` (run in view `epoch`): None unless the
        peer shares our host; then a check whether, once a newer view is known to be decided,
        it posted that collective (or a later one) in shared memory.

        Ranks of one host use shared memory only when every participant shares the host, so
        when a failure view spreads, a rank still on the old (multi-host) view waits on TCP
        while its neighbour, on the new (one-host) view, posts in shared memory. Without this
        each would wait for the other until the timeout; with it both see view lag (the shared-
        memory side sees our TCP frame: shm_exchange) and go on to apply the newer view."""
        shm = self.shm
        if shm.mine is None or shm.host_of(peer) != shm.host_id:
            return None

        def posted() -> bool:
            if self.state.noted_epoch <= epoch:
                return False  # no view change under way: the peer runs this op as we do
            region = shm.region(peer, 0.5)
            return region is not None and region.newest_seq() >= seq

        return posted

    def hier_plan(self, participants: tuple[int, ...], kind: OpKind | None = None,
                  nbytes: int = 0) -> HierPlan | None:
        """The hierarchical plan of a collective over `participants` (core.hierarchy), or
        None for the flat forms: a function of the view, the published host ids and (with
        `kind`) the op's kind and per-rank bytes only, so every participant picks alike. Kept
        for the current view (a slot's host may change with a replacement, and with it the
        view)."""
        if not self.hierarchical or (kind is not None and not self.hier_every_size
                                     and not hierarchy.pays(kind, nbytes)):
            return None
        key = (self.view.epoch, participants)
        if self._hier is None or self._hier[0] != key:
            hosts = {p: self.shm.host_of(p, self.timeout) for p in participants}
            self._hier = (key, hierarchy.plan(self.rank, participants, hosts))
        return self._hier[1]

    def scratch(self, peer: int, seq: int, nbytes: int) -> torch.Tensor:
        """A receive buffer for `peer`'s frame in collective `seq`, kept for the next calls of
        that size: a fresh large buffer costs a page fault per 4 KiB on every call. Two per
        peer, by the parity of `seq`, so a frame of the last op can never share one with the
        next (one size each: a loop of mixed sizes reallocates, as without them)."""
        key = (peer, seq & 1)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() != nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8)
            self._scratch[key] = buf
        return buf
    def _send_ack(self, peer: int, seq: int) -> None:
        """Acker thread: tell `peer` its message `seq` arrived (a peer that is gone is not
        told: its own send completes, unsuccessfully, through its failure)."""
        header = Header(MsgType.P2P_ACK, self.rank, 0, seq=seq)
        try:
            self.send_frame(peer, header, b"", time.monotonic() + min(self.timeout, 5.0))
        except (PeerFailedError, *STORE_TROUBLE) as exc:
            log.debug("rank %d: acknowledging message %d to rank %d failed: %s",
                      self.rank, seq, peer, exc)

    def report_mismatch(self, seq: int, peers: list[int], reason: str) -> None:
        """Tell the other participants that collective `seq` is broken, then poison the group."""
        with self._lock:
            if self.state.phase is Phase.ACTIVE:
                self.state.mismatch(reason)
            self.metrics.mismatches += 1
        self._event("mismatch", logging.WARNING, seq=seq, reported_by=self.rank, reason=reason)
        data = reason.encode()
        for p in peers:
            try:
                self.send_frame(p, Header(MsgType.ABORT, self.rank, len(data), seq=seq), data,
                                time.monotonic() + 1.0)
            except (PeerFailedError, *STORE_TROUBLE):
                pass  # a peer we cannot tell sees the mismatch itself, or is gone

    # ---- operations ---------------------------------------------------------------------------
    def refuse(self, call: Call) -> None:
        """Raise the caller's GroupStateError if this handle's phase does not run `call`."""
        try:
            self.state.check(call, self.group_id)
        except CallRefusedError as exc:
            raise GroupStateError(str(exc)) from None

    def check_usable(self) -> None:
        self.refuse(Call.COLLECTIVE)

    def participants(self) -> tuple[int, ...]:
        return (self.rank,) if self.state.phase is Phase.ISOLATED else self.view.active

    def prepare(self) -> tuple[int, ...]:
        """Bring membership up to date at this operation boundary; return who takes part.

        The binding lays out list/flat buffers by these participants, so the operation must then
        run over exactly them: pass them to run_op (views change only on this thread)."""
        if self.state.dirty:
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
                        time.monotonic() + self.timeout, ready=self.state.joiners.digest)
        regions = self.shm.regions_for(participants, self.timeout)
        if regions is not None:
            ctx.shm = ShmOp(ctx, self.shm, regions)
        return ctx

    def run_op(self, spec: OpSpec, body: Callable[[OpContext], None],
               participants: tuple[int, ...] | None = None) -> OpContext:
        return self.run(self.new_op(spec, participants), body)

    def lane(self) -> Lane | None:
        """The reusable per-op state of the healthy steady state (see group.lane), or None when
        the general path must run: membership to settle, poison, join in progress, a peer's
        shared memory gone."""
        st = self.state
        if st.phase is not Phase.ACTIVE or st.generation != st.settled_generation:
            return None
        lane = self._lane
        view = self.view
        if lane is not None and lane.view is view:
            return lane
        self._lane = None
        if len(view.active) < 2:
            return None
        regions = self.shm.regions_for(view.active, self.timeout)
        if regions is not None and len(regions) < len(view.active) - 1:
            return None  # a peer's region is gone: the general path handles it
        self._lane = Lane(self, view, regions)  # regions None: over TCP, the context alone
        return self._lane

    def run(self, ctx: OpContext, body: Callable[[OpContext], None]) -> OpContext:
        """Run one collective's body, then what every collective needs afterwards."""
        try:
            body(ctx)
            if self.state.poison is not None:  # a peer reported a mismatch while we ran
                raise CollectiveMismatchError(self.state.poison)
            if ctx.spec.kind in AGREEING_KINDS:
                self._agree_ready(ctx)
            if ctx.failed_peers and self.auto_deactivate and self.auto_sync:
                # mode (a): the failed operation returns only once the hole is in the view
                failed = sorted(ctx.failed_peers)
                self.views.exclude(failed, self._seq, cause=self._failure_cause(failed))
        except CollectiveMismatchError as exc:
            with self._lock:
                if self.state.phase is Phase.ACTIVE:
                    self.state.mismatch(str(exc))
            raise
        except OperationTimeoutError as exc:
            self.metrics.op_timeouts += 1
            self._event("op_timeout", logging.WARNING, op=ctx.spec.kind.name.lower(),
                        seq=ctx.seq, ranks=list(ctx.participants), reason=str(exc))
            raise
        finally:
            self.mailbox.forget_seq(ctx.seq)
        spec = ctx.spec
        # the context's deadline is its start + timeout: one clock read per op for the latency
        self.metrics.op(spec.kind, spec.numel * ITEMSIZE_BY_CODE[spec.dtype],
                        time.monotonic() - ctx.deadline + self.timeout)
        return ctx

    # ---- membership calls ---------------------------------------------------------------------
    def agree_on_ranks(self, ranks: list[int], kind_code: int) -> set[int]:
        """A collective exchange of requested rank sets among the active members; the union.

        Members that called with different sets still agree: everyone computes the union of
        what it received (a bitwise-or all_reduce of slot masks, over shared memory where the
        members share a host). A member that fails during the exchange contributes nothing.
        `kind_code` (in the root field) tells activation from deactivation, so members that
        made different calls get a mismatch error instead of a wrong decision.
        """
        self.refuse(Call.MEMBERSHIP)
        bad = [r for r in ranks if not 0 <= r < self.slots]
        if bad:
            raise ValueError(f"ranks {bad} outside the group's slots 0..{self.slots - 1}")
        mask = torch.zeros(self.slots, dtype=torch.int32)
        mask[list(ranks)] = 1
        spec = OpSpec(OpKind.MEMBERSHIP, dtype_code(torch.int32), self.slots, kind_code,
                      int(Reduce.BOR))

        def exchange(ctx: OpContext) -> None:
            if ctx.shm is not None:
                shm_algorithms.allreduce(ctx.shm, mask, Reduce.BOR)
            else:
                algorithms.allreduce(ctx, mask, Reduce.BOR)

        self.run_op(spec, exchange)
        return {int(r) for r in mask.nonzero().flatten()}

    def deactivate(self, ranks: list[int]) -> View:
        """Collective: remove `ranks` (planned scale-down, graceful leave, framework decision)."""
        agreed = self.agree_on_ranks(ranks, kind_code=0)
        start = self._seq

        def make(base: View) -> View | None:
            todo = [r for r in agreed if base.is_active(r)]
            return base.after_deactivation(todo, start, f"ranks {sorted(todo)} deactivated "
                                                        f"by the members") if todo else None

        self.views.decide(make)
        self._event("ranks_deactivated", ranks=sorted(agreed), epoch=self.view.epoch)
        return self.view

    def leave(self) -> View:
        """Local: this rank leaves alone (the reference's self-deactivation, used by the compat
        layer): it decides the view without itself and tells the members, who apply it at
        their next boundary as they would a failure; a replacement may then take the slot."""
        self.refuse(Call.MEMBERSHIP)
        if self.state.dirty:
            self._settle()  # the base must be the latest view this rank can know
        start = self._seq

        def make(base: View) -> View | None:
            if not base.is_active(self.rank):
                return None
            return base.after_deactivation([self.rank], start, f"rank {self.rank} left")

        self.views.decide(make)
        self._event("rank_left", epoch=self.view.epoch)
        return self.view

    def activate(self, ranks: list[int]) -> tuple[View, list[int], dict[int, str]]:
        """Collective: admit the agreed-ready ones of `ranks`. Returns (view, admitted, dropped
        ranks with the reason for each).

        The MEMBERSHIP exchange itself refreshes the agreed readiness, so members that polled
        get_peer_state on different steps still admit the same set, at the same sequence
        number; the store then settles, per joiner, its race against its own give-up.
        """
        agreed = self.agree_on_ranks(ranks, kind_code=1)
        todo = sorted(r for r in agreed if not self.view.is_active(r))
        with self._lock:
            ready = {j.slot: j for j in self.state.joiners.agreed}
        dropped = {r: "not ready: not registered, not waiting in join_group, or not yet seen "
                      "ready by every active member" for r in todo if r not in ready}
        start = self._seq
        admit = []
        for r in todo:
            if r in ready:
                if self.control.admit_join(ready[r], start):
                    admit.append(r)
                else:
                    dropped[r] = "it gave up joining (its join_group timed out)"
                    with self._lock:
                        self.state.joiners.forget(r, ready[r])
                    self._event("joiner_gone", slot=r, incarnation=ready[r].incarnation,
                                attempt=ready[r].attempt, reason=dropped[r])
        if not admit:
            return self.view, [], dropped

        def make(base: View) -> View | None:
            new, _ = base.after_activation([r for r in admit if not base.is_active(r)],
                                           set(admit), start, f"ranks {admit} joined")
            return new

        self.views.decide(make, announce=False)
        admitted = [r for r in admit if self.view.is_active(r)]
        for r in admitted:
            self.control.announce_joined(ready[r], self.view)
        self._event("ranks_activated", ranks=admitted, dropped=sorted(dropped),
                    epoch=self.view.epoch)
        return self.view, admitted, dropped

    def join(self, timeout: float | None = None) -> View:
        """Joiner side of deferred join (see the join handshake in the module docstring)."""
        bound = self.timeout if timeout is None else timeout
        if not bound > 0:
            raise ValueError(f"join_group timeout must be positive, got {timeout!r}")
        deadline = time.monotonic() + bound
        with self._lock:
            try:
                self.state.check(Call.JOIN, self.group_id)
            except CallRefusedError as exc:
                raise GroupStateError(str(exc)) from None
            self.state.fire(Event.JOIN_STARTED)
        self._join_attempts += 1
        join = JoinAttempt(self.rank, self.incarnation, self._join_attempts)
        self._event("join_started", attempt=join.attempt, timeout=bound)
        opened = False
        base: View | None = None
        try:
            base = self._live_view(deadline)
            self.shm.forget_all()  # peers may be other processes than when we last ran
            self.views.adopt(base)
            self.control.open_join(join)
            opened = True
            self._announce_join(join, base, deadline)
            view = self._wait_admission(join, deadline, bound)
        except BaseException:
            if opened and not self._give_up(join):
                # the members claimed us first: they are activating us right now
                view = self.control.wait_joined(join, self.timeout)
            else:
                for peer in base.active if base is not None else ():
                    self.transport.leave(peer)  # the members forget this attempt
                with self._lock:
                    self.state.fire(Event.ABANDONED)
                self._event("join_abandoned", attempt=join.attempt)
                raise
        self._admitted(view)
        self._event("join_admitted", attempt=join.attempt, epoch=self.view.epoch)
        return self.view

    def _wait_admission(self, join: JoinAttempt, deadline: float, bound: float) -> View:
        """The view that activated `join`; at the deadline, give up unless the members have
        claimed the attempt already (then wait for them: they are activating us)."""
        try:
            return self.control.wait_joined(join, max(deadline - time.monotonic(), 0.001))
        except OperationTimeoutError:
            if self.control.abandon_join(join):
                raise OperationTimeoutError(
                    f"rank {self.rank} was not admitted to group {self.group_id!r} within "
                    f"{bound:.1f}s and gave up; the live group is unaffected, and join_group "
                    f"may be called again") from None
            return self.control.wait_joined(join, self.timeout)

    def _give_up(self, join: JoinAttempt) -> bool:
        """After an error inside join: withdraw the attempt; False if the members won."""
        try:
            return self.control.abandon_join(join)
        except ControlPlaneError:
            return True  # the store is gone: nobody can admit us either

    def _announce_join(self, join: JoinAttempt, base: View, deadline: float) -> None:
        payload = pack_join(join.incarnation, join.attempt)
        header = Header(MsgType.JOIN, self.rank, len(payload))
        for peer in base.active:
            # an earlier attempt's links were closed (or a member we saw go was replaced)
            self.mailbox.revive_peer(peer)
            with self._lock:
                self.state.revived(peer)
            try:
                self.ensure_link(peer, deadline)
                self.transport.send(peer, header, payload, deadline)
                self.shm.prepare(peer, max(deadline - time.monotonic(), 0.001))
            except (PeerFailedError, OSError):
                pass  # a dead member will be excluded by the others

    def _admitted(self, view: View) -> None:
        self.views.adopt(view)
        for r in view.active:  # a rejoiner may have written its peers off while it was out
            if r != self.rank:
                self.mailbox.revive_peer(r)
        self._seq = view.start_seq
        self.mailbox.restart_at(view.start_seq)
        with self._lock:
            self.state.fire(Event.ADMITTED)
            if not self.state.failed:  # what happened while isolated is covered by the view
                self.state.end_settle(self.state.begin_settle())
        # No store round trip here: every member waits for our first post, so each costs all
        # of them. Views decided after this one reach us as VIEW frames (or the store poll).

    def _live_view(self, deadline: float) -> View:
        """The latest decided view, waiting (bounded) until our slot is free in it."""
        founders = self.control.founders(max(deadline - time.monotonic(), 0.001))
        while True:
            latest = self.control.latest_epoch()
            view = (self.control.view(latest, timeout=max(deadline - time.monotonic(), 0.001))
                    if latest else View.initial(self.slots, range(founders)))
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
                pass  # the loop re-reads the latest view and reports the timeout

    def sync_after_failure(self) -> tuple[str, View]:
        """Report failures seen here, wait for the decision, apply the latest view."""
        self.refuse(Call.SYNC)
        before = self.view.epoch
        with self._lock:
            token = self.state.begin_settle()
            known = sorted(self.state.failed)
        if known and self.auto_deactivate:
            self.views.exclude(known, self._seq, cause=self._failure_cause(known))
        else:
            self.views.catch_up()
        with self._lock:
            self.state.end_settle(token)
        if not self.view.is_active(self.rank):
            return "Rejected", self.view
        return ("Reconciled" if self.view.epoch != before else "NoPending"), self.view

    def p2p_deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _mirror_mask(self) -> None:
        t = self.options.active_ranks
        if t is not None:  # a joiner's mirror may be shorter than the capacity it adopted
            t.copy_(torch.tensor(self.view.mask()[:t.numel()], dtype=torch.int32))

    def op_saw_failure(self, ranks: Iterable[int]) -> None:
        """A point-to-point operation completed without these peers (any thread)."""
        with self._lock:
            self._reported.update(ranks)

    def active_mask(self) -> torch.Tensor:
        """The mask, after settling what the next boundary would settle when it concerns a
        decision made elsewhere or a failure an operation has reported (in mode (a) a failed
        P2P operation's peer is a hole once the operation completed). A departure noticed
        only by the liveness thread waits for the next operation, as in every other call."""
        st = self.state
        with self._lock:
            reported = bool(self._reported & set(st.failed))
        if st.dirty and st.phase is Phase.ACTIVE and (reported or
                                                      st.noted_epoch > self.view.epoch):
            self._settle()
        return torch.tensor(self.view.mask(), dtype=torch.int32)

    def destroy(self) -> None:
        with self._lock:
            if self.state.phase is Phase.DESTROYED:
                return
            self.state.fire(Event.DESTROYED)
        prometheus.unregister(id(self))
        self.mailbox.close("group destroyed")
        self.shm.wake_all()
        self.acker.stop()
        self.liveness.stop()
        self.transport.close(goodbye=True)
        self.mailbox.dispose()
        with self._lock:
            helpers, self._helpers = self._helpers, []
        for t in helpers:  # each is bounded by the group's timeout; most end at once now
            if t is not threading.current_thread():
                t.join(timeout=1.0)
        self.shm.close()
