"""The group handle's protocol state machine: its tables, its refusals, and random event
histories driven against a model (hypothesis), as ViewHistory drives views."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from elasticpg.core.group_state import (
    ALLOWED,
    REFUSALS,
    TRANSITIONS,
    BoundaryAction,
    Call,
    CallRefusedError,
    Event,
    GroupState,
    IllegalTransitionError,
    JoinAttempt,
    JoinerTable,
    Phase,
    agree,
    readiness_digest,
)
from elasticpg.core.membership import ExecMode

FAST = settings(max_examples=60, deadline=None)


def _state(phase=Phase.ACTIVE, mode="a", active=(0, 1, 2, 3)) -> GroupState:
    deact, sync = {"a": (True, True), "b": (True, False), "c": (False, False)}[mode]
    st_ = GroupState(0, phase, deact, sync)
    st_.active = frozenset(active)
    return st_


# ---------------------------------------------------------------- the tables


def test_every_phase_has_a_row_and_every_target_is_a_phase():
    assert set(TRANSITIONS) == set(Phase) == set(ALLOWED)
    for row in TRANSITIONS.values():
        assert set(row.values()) <= set(Phase)


def test_destroyed_is_terminal_and_reachable_from_everywhere():
    for phase in Phase:
        assert TRANSITIONS[phase][Event.DESTROYED] is Phase.DESTROYED
    assert set(TRANSITIONS[Phase.DESTROYED].values()) == {Phase.DESTROYED}


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", list(Event))
def test_an_event_a_phase_does_not_accept_raises_a_named_error(phase, event):
    s = _state(phase)
    if event in TRANSITIONS[phase]:
        assert s.fire(event) is TRANSITIONS[phase][event]
    else:
        with pytest.raises(IllegalTransitionError, match=event.value):
            s.fire(event)
        assert s.phase is phase  # an illegal event changes nothing


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("call", list(Call))
def test_every_refused_call_has_a_reason_for_the_caller(phase, call):
    s = _state(phase)
    s.poison = "rank 2 called BROADCAST"
    reason = s.refusal(call, "g")
    if call in ALLOWED[phase]:
        assert reason is None
        s.check(call, "g")
        return
    assert reason and "{" not in reason, reason  # every placeholder filled in
    assert (phase, call) in REFUSALS or phase in REFUSALS
    with pytest.raises(CallRefusedError, match="rank 0|'g'"):
        s.check(call, "g")


def test_the_refusals_say_what_to_do():
    assert "call join_group to rejoin" in _state(Phase.REMOVED).refusal(Call.COLLECTIVE, "g")
    assert "already active" in _state(Phase.ACTIVE).refusal(Call.JOIN, "g")
    assert "already in progress" in _state(Phase.JOINING).refusal(Call.JOIN, "g")
    assert "isolated" in _state(Phase.ISOLATED).refusal(Call.P2P, "g")
    s = _state(Phase.ACTIVE)
    s.mismatch("rank 1 used dtype float32")
    assert "rank 1 used dtype float32" in s.refusal(Call.COLLECTIVE, "g")


def test_exec_modes_follow_the_spec():
    assert _state(Phase.ISOLATED).exec_mode is ExecMode.ISOLATED
    assert _state(Phase.JOINING).exec_mode is ExecMode.QUIESCING
    assert _state(Phase.REJOINING).exec_mode is ExecMode.QUIESCING
    assert _state(Phase.ACTIVE).exec_mode is ExecMode.NORMAL


def test_a_join_that_gives_up_returns_where_it_came_from():
    s = _state(Phase.ISOLATED)
    s.fire(Event.JOIN_STARTED)
    assert s.fire(Event.ABANDONED) is Phase.ISOLATED
    s = _state(Phase.REMOVED)
    s.fire(Event.JOIN_STARTED)
    assert s.phase is Phase.REJOINING
    assert s.fire(Event.ABANDONED) is Phase.REMOVED


# ---------------------------------------------------------------- failures and boundaries


def test_a_failure_seen_twice_is_recorded_once():
    s = _state()
    first = s.note_failure(2, "eof")
    again = s.note_failure(2, "silence")
    assert first.first and not again.first
    assert s.failed == {2: "eof"}


def test_mode_b_starts_one_decider_for_concurrent_failures():
    # the old runtime checked "already failed?" and then started a thread: two reports of
    # failures could start two deciders
    s = _state(mode="b")
    starts = [s.note_failure(r, "eof").start_decider for r in (1, 2, 3)]
    assert starts == [True, False, False]
    assert s.decider_work() == [1, 2, 3]
    s.note_failure(1, "again")  # already known: nothing new for the decider
    assert s.decider_work() == []
    assert not s.deciding
    assert s.note_failure(0, "self").start_decider is False  # never this rank itself


@pytest.mark.parametrize("mode", ["a", "c"])
def test_only_mode_b_decides_in_the_background(mode):
    assert not _state(mode=mode).note_failure(1, "eof").start_decider


def test_a_failure_during_settling_is_not_erased():
    # the old sync_after_failure cleared its dirty flag after its store I/O: a failure that
    # arrived meanwhile was forgotten until something else made the group dirty
    s = _state()
    s.note_failure(1, "eof")
    token = s.begin_settle()
    s.note_failure(2, "eof")  # arrives while the shell talks to the store
    s.view_applied(1, (0, 2, 3))
    s.end_settle(token)
    assert s.dirty and s.failed == {2: "eof"}
    assert s.boundary_action() is BoundaryAction.EXCLUDE


def test_boundary_actions_per_mode():
    for mode, action in (("a", BoundaryAction.EXCLUDE), ("b", BoundaryAction.CATCH_UP_IF_REMOVED),
                         ("c", BoundaryAction.CATCH_UP_IF_REMOVED)):
        s = _state(mode=mode)
        assert s.boundary_action() is BoundaryAction.NONE
        s.note_failure(3, "eof")
        assert s.boundary_action() is action
    s = _state()
    assert s.note_decision(4) and not s.note_decision(4) and not s.note_decision(2)
    assert s.boundary_action() is BoundaryAction.CATCH_UP
    assert _state(Phase.ISOLATED).boundary_action() is BoundaryAction.NONE


def test_a_view_without_this_rank_removes_it():
    s = _state()
    s.view_applied(1, (1, 2))
    assert s.phase is Phase.REMOVED
    assert s.refusal(Call.COLLECTIVE, "g")


def test_failures_of_non_members_are_not_membership_work():
    s = _state(active=(0, 1))
    note = s.note_failure(5, "eof")  # e.g. a joiner that went away
    assert note.first and not s.dirty and not s.failed


# ---------------------------------------------------------------- readiness


J = JoinAttempt


def test_digest_is_zero_only_for_nobody_and_depends_on_the_attempt():
    assert readiness_digest([]) == 0
    a, b = readiness_digest([J(3, 1, 1)]), readiness_digest([J(3, 1, 2)])
    assert a and b and a != b and a < 2**63
    assert readiness_digest([J(1, 1, 1), J(2, 1, 1)]) == readiness_digest([J(2, 1, 1),
                                                                         J(1, 1, 1)])


def test_agreement_needs_every_digest_equal():
    assert agree(7, [7, 7, 7])
    assert not agree(7, [7, 0, 7])
    assert agree(0, [])


def test_joiner_table_lifecycle():
    t = JoinerTable()
    j = J(3, 2, 1)
    assert t.announced(j) and not t.announced(j)  # a repeated JOIN links back once
    assert t.digest == 0  # linking: not ready yet
    assert t.linked(j) and t.digest == readiness_digest([j])
    t.settle_agreement([t.digest, t.digest])
    assert t.ready_slots(agreed=True) == {3}
    # a later attempt of the same process replaces it; an older one is stale
    j2 = J(3, 2, 2)
    assert t.announced(j2) and not t.announced(j)
    assert not t.linked(j)  # the old attempt's link-back finishing late changes nothing
    assert t.ready_slots(agreed=False) == set()
    assert t.forget(3, j) is None and t.forget(3, j2) == j2
    assert t.digest == 0 and t.attempt(3) is None


def test_agreement_is_what_every_member_saw_and_survives_a_local_change():
    # Members must keep answering get_peer_state alike: a joiner that fails after the
    # agreement does not change the agreed set until the next all-to-all collective.
    t = JoinerTable()
    j = J(2, 1, 1)
    t.announced(j)
    t.linked(j)
    t.settle_agreement([t.digest])
    t.forget(2)
    assert t.ready_slots(agreed=True) == {2}
    t.settle_agreement([0])
    assert t.ready_slots(agreed=True) == set()


def test_disagreeing_members_agree_on_nobody():
    t = JoinerTable()
    t.announced(J(1, 1, 1))
    t.linked(J(1, 1, 1))
    t.settle_agreement([t.digest, readiness_digest([J(1, 1, 1), J(2, 1, 1)])])
    assert t.agreed == frozenset()


# ---------------------------------------------------------------- random histories


class HandleHistory(RuleBasedStateMachine):
    """Random event sequences against a plain model of what the handle may do."""

    def __init__(self) -> None:
        super().__init__()
        self.s = GroupState(0, Phase.ACTIVE, True, True)
        self.s.active = frozenset({0, 1, 2, 3})
        self.epoch = 0

    @rule(event=st.sampled_from(list(Event)))
    def fire(self, event):
        before = self.s.phase
        if event in TRANSITIONS[before]:
            self.s.fire(event)
        else:
            with pytest.raises(IllegalTransitionError):
                self.s.fire(event)
            assert self.s.phase is before

    @rule(peer=st.integers(0, 5))
    def failure(self, peer):
        was_down = peer in self.s.down
        note = self.s.note_failure(peer, "eof")
        assert note.first == (peer != 0 and not was_down)
        if note.first:
            assert (peer in self.s.failed) == (peer in self.s.active
                                               and self.s.phase is Phase.ACTIVE)

    @rule(peer=st.integers(1, 5))
    def reconnect(self, peer):
        pending = dict(self.s.failed)
        self.s.revived(peer)
        assert peer not in self.s.down and self.s.failed == pending

    @rule(keep=st.sets(st.integers(0, 5)))
    def view(self, keep):
        if self.s.phase in (Phase.REMOVED, Phase.JOINING, Phase.REJOINING, Phase.ISOLATED) \
                and 0 in keep:
            keep = keep - {0}  # only an admission makes a removed rank active again
        self.epoch += 1
        self.s.view_applied(self.epoch, keep)
        assert set(self.s.failed) <= keep

    @rule()
    def settle(self):
        token = self.s.begin_settle()
        self.s.end_settle(token)
        assert not self.s.dirty

    @invariant()
    def the_phase_decides_what_runs(self):
        for call in Call:
            assert (self.s.refusal(call, "g") is None) == (call in ALLOWED[self.s.phase])

    @invariant()
    def only_a_member_has_membership_work(self):
        assert set(self.s.failed) <= self.s.active - {0}
        if self.s.phase is not Phase.ACTIVE:
            assert not self.s.failed


HandleHistory.TestCase.settings = settings(max_examples=60, stateful_step_count=30,
                                           deadline=None)
TestHandleHistory = HandleHistory.TestCase


@FAST
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(1, 3), st.integers(1, 3)),
                max_size=12))
def test_joiner_table_keeps_only_the_newest_attempt_per_slot(announcements):
    t = JoinerTable()
    newest: dict[int, tuple[int, int]] = {}
    for slot, inc, att in announcements:
        t.announced(J(slot, inc, att))
        newest[slot] = max(newest.get(slot, (0, 0)), (inc, att))
    for slot, (inc, att) in newest.items():
        assert t.attempt(slot) == J(slot, inc, att)
