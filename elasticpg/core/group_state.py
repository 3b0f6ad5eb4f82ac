"""The protocol state of one group handle in one process, as a pure state machine.

Theory of operation
-------------------
A group handle is driven by events that arrive on several threads — a reader thread sees a
peer's socket close, the liveness thread notices silence, a JOIN frame announces a joiner, the
caller starts a collective or calls join_group. None of them may act on a half-updated state,
and none of the decisions may depend on which thread got there first in a way that differs
between ranks. So every piece of state that more than one thread touches lives here, in one
object that does no I/O. The shell (`group/runtime.py`) feeds it events under one lock and
carries out the decisions it returns (open a link, start a background decision, apply a view).

Three things make up the state:

* The **phase** of the handle (`Phase`): what the caller may do now. Transitions are data
  (`TRANSITIONS`); an event a phase does not accept raises `IllegalTransitionError`, a call the
  phase does not allow raises `CallRefusedError` with the reason the caller will read (`REFUSALS`).

    ISOLATED --join_started--> JOINING --admitted--> ACTIVE --removed--> REMOVED
        ^                         |                    |  ^                  |
        +-------abandoned---------+                    |  +--admitted--REJOINING <--join_started
                                                       +--mismatch--> POISONED
    (any) --destroyed--> DESTROYED

* **Pending membership work**: failures seen but not yet covered by a view, and the newest
  decided epoch this rank heard of. An operation boundary asks `boundary_action` what to do;
  settling is bracketed by a generation number, so an event that arrives while the shell talks
  to the store is never erased by the settle that began before it. In mode (b) at most one
  background decision runs at a time (`note_failure` / `decider_finished`).

* **Joiners, as seen by a member** (`JoinerTable`): a JOIN frame makes a slot LINKING; once our
  link back to it is open it is READY. Readiness names one join attempt of one process
  (slot, incarnation, attempt), so a stale announcement can never admit a later attempt or the
  wrong process. A joiner that gives up, fails, or becomes active leaves the table: nothing of
  it remains. Members agree on readiness by exchanging a digest of their READY sets with every
  all-to-all collective (`agree`): when every digest is equal, that set is agreed by all of
  them at the same step; otherwise nothing is. (A digest instead of a bit mask keeps a frame
  header fixed-size for any number of slots.)

The admission itself is decided in the store, not here: a joiner's give-up and the members'
admission race on one compare-and-set key (see `group/runtime.py`, join protocol), so they can
never both win.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from .membership import ExecMode


class IllegalTransitionError(RuntimeError):
    """An event this phase does not accept: a bug in the shell, never a user error."""


class CallRefusedError(Exception):
    """A call the handle cannot run in its phase; the message is for the caller."""


class Phase(enum.Enum):
    ISOLATED = "isolated"  # extension/replacement before join: collectives run over {self}
    JOINING = "joining"  # inside join_group, coming from ISOLATED (quiescing: no new work)
    ACTIVE = "active"  # a member of the applied view
    REMOVED = "removed"  # alive but not in the applied view (deactivated, excluded)
    REJOINING = "rejoining"  # inside join_group, coming from REMOVED (in-place rejoin)
    POISONED = "poisoned"  # a collective mismatch desynchronised the sequence numbers
    DESTROYED = "destroyed"


class Event(enum.Enum):
    JOIN_STARTED = "join_started"
    ADMITTED = "admitted"  # the joiner's admission won in the store and its view is applied
    ABANDONED = "abandoned"  # the joiner gave up, and its give-up won in the store
    VIEW_WITH_ME = "view_with_me"  # a view that keeps this rank active was applied
    VIEW_WITHOUT_ME = "view_without_me"  # a view without this rank was applied
    MISMATCH = "mismatch"
    DESTROYED = "destroyed"


class Call(enum.Enum):
    COLLECTIVE = "collective"
    P2P = "point-to-point"
    MEMBERSHIP = "membership change"  # activate/deactivate (collective among members)
    JOIN = "join_group"
    SYNC = "sync_after_failure"


P, E, C = Phase, Event, Call

TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    P.ISOLATED: {E.JOIN_STARTED: P.JOINING, E.DESTROYED: P.DESTROYED},
    P.JOINING: {E.ADMITTED: P.ACTIVE, E.ABANDONED: P.ISOLATED,
                E.VIEW_WITHOUT_ME: P.JOINING, E.DESTROYED: P.DESTROYED},
    P.ACTIVE: {E.VIEW_WITH_ME: P.ACTIVE, E.VIEW_WITHOUT_ME: P.REMOVED,
               E.MISMATCH: P.POISONED, E.DESTROYED: P.DESTROYED},
    P.REMOVED: {E.VIEW_WITHOUT_ME: P.REMOVED, E.JOIN_STARTED: P.REJOINING,
                E.DESTROYED: P.DESTROYED},
    P.REJOINING: {E.ADMITTED: P.ACTIVE, E.ABANDONED: P.REMOVED,
                  E.VIEW_WITHOUT_ME: P.REJOINING, E.DESTROYED: P.DESTROYED},
    P.POISONED: {E.VIEW_WITH_ME: P.POISONED, E.VIEW_WITHOUT_ME: P.POISONED,
                 E.MISMATCH: P.POISONED, E.DESTROYED: P.DESTROYED},
    # threads that were already running may still report a view or a mismatch: harmless
    P.DESTROYED: {E.DESTROYED: P.DESTROYED, E.VIEW_WITH_ME: P.DESTROYED,
                  E.VIEW_WITHOUT_ME: P.DESTROYED, E.MISMATCH: P.DESTROYED},
}

EXEC_MODE: dict[Phase, ExecMode] = {
    P.ISOLATED: ExecMode.ISOLATED, P.JOINING: ExecMode.QUIESCING,
    P.REJOINING: ExecMode.QUIESCING, P.ACTIVE: ExecMode.NORMAL, P.REMOVED: ExecMode.NORMAL,
    P.POISONED: ExecMode.NORMAL, P.DESTROYED: ExecMode.NORMAL,
}

# Which calls each phase runs (a collective in ISOLATED runs over {self} only).
ALLOWED: dict[Phase, frozenset[Call]] = {
    P.ISOLATED: frozenset({C.COLLECTIVE, C.JOIN}),
    P.JOINING: frozenset(),
    P.ACTIVE: frozenset({C.COLLECTIVE, C.P2P, C.MEMBERSHIP, C.SYNC}),
    P.REMOVED: frozenset({C.JOIN, C.SYNC}),
    P.REJOINING: frozenset(),
    P.POISONED: frozenset(),
    P.DESTROYED: frozenset(),
}

# Why a phase refuses a call: {rank}, {group}, {epoch} and {poison} are filled in by `refusal`.
REFUSALS: dict[tuple[Phase, Call] | Phase, str] = {
    (P.ISOLATED, C.P2P): "rank {rank} is isolated (not yet joined): point-to-point needs the "
                         "live group",
    (P.ISOLATED, C.MEMBERSHIP): "rank {rank} is isolated (not yet joined): only active members "
                                "change membership",
    (P.ISOLATED, C.SYNC): "rank {rank} is isolated (not yet joined): it has no failures to sync",
    (P.ACTIVE, C.JOIN): "rank {rank} is already active in group {group!r}; join_group is for "
                        "extension ranks and deactivated ranks",
    P.JOINING: "group {group!r} is quiescing inside join_group: no new work",
    P.REJOINING: "group {group!r} is quiescing inside join_group: no new work",
    P.REMOVED: "rank {rank} is not active in group {group!r} (epoch {epoch}); call join_group "
               "to rejoin",
    P.POISONED: "group {group!r} is unusable after an earlier collective mismatch: {poison}",
    P.DESTROYED: "group {group!r} was destroyed",
}
REFUSALS[(P.JOINING, C.JOIN)] = REFUSALS[(P.REJOINING, C.JOIN)] = \
    "join_group is already in progress for group {group!r}"


class BoundaryAction(enum.Enum):
    """What an operation boundary must do about membership before the operation starts."""

    NONE = "none"
    EXCLUDE = "exclude"  # mode (a): decide a view without the failed peers and apply it
    CATCH_UP = "catch_up"  # apply the views decided by others
    CATCH_UP_IF_REMOVED = "catch_up_if_removed"  # modes (b), (c): apply only a view that
    # removes this rank (so its next call fails clearly); others wait for sync/deactivate


class JoinerState(enum.Enum):
    LINKING = "linking"  # its JOIN arrived; our link back to it is being opened
    READY = "ready"  # linked back: counts in our readiness digest


@dataclass(frozen=True, slots=True)
class JoinAttempt:
    """One join_group call of one process: a later attempt or another process is another one."""

    slot: int
    incarnation: int
    attempt: int


def readiness_digest(ready: Iterable[JoinAttempt]) -> int:
    """A 63-bit digest of a set of ready joiners; 0 for the empty set (the steady state)."""
    entries = sorted((j.slot, j.incarnation, j.attempt) for j in ready)
    if not entries:
        return 0
    raw = ";".join(f"{s}.{i}.{a}" for s, i, a in entries).encode()
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") >> 1 | 1


def agree(mine: int, heard: Iterable[int]) -> bool:
    """Whether readiness is agreed after an all-to-all collective: every member's digest equals
    ours. Every participant heard the same digests, so all of them decide alike."""
    heard = list(heard)
    return heard.count(mine) == len(heard)  # C-level: a member hears 1023 of them at scale


class JoinerTable:
    """Joiners as one member sees them (see module docstring)."""

    def __init__(self) -> None:
        self._joiners: dict[int, tuple[JoinAttempt, JoinerState]] = {}
        self.digest = 0  # of the READY attempts
        self.agreed: frozenset[JoinAttempt] = frozenset()

    def announced(self, join: JoinAttempt) -> bool:
        """A JOIN frame arrived. True: open the link back to this attempt (a repeated or
        stale announcement, older than what we know of that slot, changes nothing)."""
        cur = self._joiners.get(join.slot)
        if cur is not None and (cur[0].incarnation, cur[0].attempt) >= (join.incarnation,
                                                                        join.attempt):
            return False
        self._joiners[join.slot] = (join, JoinerState.LINKING)
        self._refresh()
        return True

    def linked(self, join: JoinAttempt) -> bool:
        """Our link back to `join` is open; True if it now counts as ready."""
        cur = self._joiners.get(join.slot)
        if cur is None or cur[0] != join:
            return False  # it gave up, failed or was superseded meanwhile
        self._joiners[join.slot] = (join, JoinerState.READY)
        self._refresh()
        return True

    def forget(self, slot: int, join: JoinAttempt | None = None) -> JoinAttempt | None:
        """The slot's joiner gave up (that attempt, if given), failed or became active."""
        cur = self._joiners.get(slot)
        if cur is None or (join is not None and cur[0] != join):
            return None
        del self._joiners[slot]
        self._refresh()
        return cur[0]

    def slots(self) -> list[int]:
        """The slots that have a joiner in the table."""
        return list(self._joiners)

    def attempt(self, slot: int) -> JoinAttempt | None:
        cur = self._joiners.get(slot)
        return cur[0] if cur is not None else None

    def ready(self) -> frozenset[JoinAttempt]:
        return frozenset(j for j, s in self._joiners.values() if s is JoinerState.READY)

    def ready_slots(self, agreed: bool) -> frozenset[int]:
        return frozenset(j.slot for j in (self.agreed if agreed else self.ready()))

    def settle_agreement(self, heard: Iterable[int]) -> None:
        """After an all-to-all collective without failures: adopt the agreed set (or none)."""
        self.agreed = self.ready() if self.digest and agree(self.digest, heard) \
            else frozenset()

    def _refresh(self) -> None:
        # `agreed` stays as it is: members must keep answering get_peer_state alike, so it
        # changes only with the next agreement (or a view that activates the slot)
        self.digest = readiness_digest(self.ready())


@dataclass
class FailureNote:
    """What the shell must do after a failure was reported."""

    first: bool  # first report since the peer was last (re)connected: drop links, wake waiters
    start_decider: bool  # mode (b): start the background decision thread now


@dataclass
class GroupState:
    """Everything the threads of one group handle share (see module docstring)."""

    rank: int
    phase: Phase
    auto_deactivate: bool
    auto_sync: bool
    active: frozenset[int] = frozenset()  # of the applied view
    poison: str | None = None
    applied_epoch: int = 0
    noted_epoch: int = 0  # the newest decided epoch heard of (VIEW frame, store poll, post)
    down: set[int] = field(default_factory=set)  # declared failed since last (re)connected
    failed: dict[int, str] = field(default_factory=dict)  # down and still in the applied view
    generation: int = 0  # bumped by every event that gives a boundary something to do
    settled_generation: int = 0
    deciding: bool = False  # mode (b): a background decision thread runs
    proposed: set[int] = field(default_factory=set)  # failures the decider already proposed
    joiners: JoinerTable = field(default_factory=JoinerTable)

    # ---- the phase ------------------------------------------------------------------------
    def fire(self, event: Event) -> Phase:
        nxt = TRANSITIONS[self.phase].get(event)
        if nxt is None:
            raise IllegalTransitionError(f"event {event.value} is illegal in phase "
                                         f"{self.phase.value}")
        if nxt is not Phase.ACTIVE and self.phase is Phase.ACTIVE:
            self.failed.clear()  # no longer a member: its membership work is void
            self.proposed.clear()
        self.phase = nxt
        return nxt

    @property
    def exec_mode(self) -> ExecMode:
        return EXEC_MODE[self.phase]

    def refusal(self, call: Call, group: str) -> str | None:
        """None if the phase runs `call`; else the reason, phrased for the caller."""
        if call in ALLOWED[self.phase]:
            return None
        text = REFUSALS.get((self.phase, call)) or REFUSALS.get(self.phase) \
            or f"{call.value} is not possible while the group is {self.phase.value}"
        return text.format(rank=self.rank, group=group, epoch=self.applied_epoch,
                           poison=self.poison)

    def check(self, call: Call, group: str) -> None:
        reason = self.refusal(call, group)
        if reason is not None:
            raise CallRefusedError(reason)

    def mismatch(self, reason: str) -> None:
        self.poison = self.poison or reason
        self.fire(Event.MISMATCH)

    # ---- failures and decisions --------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        """Whether the next operation boundary has membership work to do."""
        return self.generation != self.settled_generation

    def note_failure(self, peer: int, reason: str) -> FailureNote:
        if peer == self.rank or peer in self.down:
            return FailureNote(first=False, start_decider=False)
        self.down.add(peer)
        self.joiners.forget(peer)
        start = False
        if peer in self.active and self.phase is Phase.ACTIVE:
            # (a handle that is not a member has no membership work: isolated, joining or
            # removed, it leaves the exclusion to the members)
            self.failed[peer] = reason
            self.generation += 1
            if self.auto_deactivate and not self.auto_sync and not self.deciding:
                start = self.deciding = True
        return FailureNote(first=True, start_decider=start)

    def decider_work(self) -> list[int]:
        """Mode (b): failures the background decider has not proposed yet; none ends it."""
        todo = sorted(set(self.failed) - self.proposed)
        self.proposed.update(todo)
        self.deciding = bool(todo)
        return todo

    def note_decision(self, epoch: int) -> bool:
        """A view was decided elsewhere; True if it is news (newer than any we knew)."""
        if epoch <= max(self.applied_epoch, self.noted_epoch):
            return False
        self.noted_epoch = epoch
        self.generation += 1
        return True

    def revived(self, peer: int) -> None:
        """A process in `peer`'s slot (re)connected: its next failure is news again. A failure
        still awaiting its view stays pending: the process it was seen in is gone either way."""
        self.down.discard(peer)

    # ---- operation boundaries ----------------------------------------------------------------
    def boundary_action(self) -> BoundaryAction:
        if not self.dirty or self.phase is not Phase.ACTIVE:
            return BoundaryAction.NONE
        if self.auto_deactivate and self.auto_sync:
            return BoundaryAction.EXCLUDE if self.failed else BoundaryAction.CATCH_UP
        return BoundaryAction.CATCH_UP_IF_REMOVED

    def begin_settle(self) -> int:
        return self.generation

    def end_settle(self, token: int) -> None:
        """The boundary handled everything up to `token`; later events stay pending."""
        self.settled_generation = max(self.settled_generation, token)

    def view_applied(self, epoch: int, active: Iterable[int]) -> None:
        """A view was applied: failures it covers and joiners it activated are done."""
        self.active = frozenset(active)
        self.applied_epoch = epoch
        self.noted_epoch = max(self.noted_epoch, epoch)
        for r in list(self.failed):
            if r not in self.active:
                del self.failed[r]
        self.proposed &= set(self.failed)
        for r in self.joiners.slots():  # (not every active slot: 1024 of them, at scale)
            if r in self.active:
                self.joiners.forget(r)
        self.joiners.agreed = frozenset(j for j in self.joiners.agreed
                                        if j.slot not in self.active)
        if self.phase in (Phase.JOINING, Phase.REJOINING, Phase.ISOLATED):
            if self.rank not in self.active and self.phase is not Phase.ISOLATED:
                self.fire(Event.VIEW_WITHOUT_ME)  # a joiner applying its base view
            return
        self.fire(Event.VIEW_WITH_ME if self.rank in self.active else Event.VIEW_WITHOUT_ME)
