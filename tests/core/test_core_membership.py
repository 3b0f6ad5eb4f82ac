"""Membership views: transitions, their invariants and their refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from elasticpg.core.membership import (
    ExecMode,
    MembershipError,
    MemberState,
    View,
)

FAST = settings(max_examples=50, deadline=None)

# D: inactive (failed or deactivated)
A, D, N = MemberState.ACTIVE, MemberState.INACTIVE, MemberState.NONE


@st.composite
def views(draw, min_size=1, max_size=12):
    size = draw(st.integers(min_size, max_size))
    members = tuple(draw(st.lists(st.sampled_from(list(MemberState)), min_size=size,
                                  max_size=size)))
    return View(draw(st.integers(0, 2**31)), members, draw(st.integers(0, 2**48)))


def _subset(data, view, label="subset"):
    return data.draw(st.lists(st.integers(0, view.size - 1), max_size=view.size * 2), label=label)


# ---------------------------------------------------------------- enums and basics


def test_enum_values_are_stable():
    # Views are stored (JSON) in the control plane with these numbers.
    assert [(s.name, int(s)) for s in MemberState] == [
        ("NONE", 0), ("INACTIVE", 1), ("ACTIVE", 2)]
    assert [int(m) for m in (ExecMode.ISOLATED, ExecMode.QUIESCING, ExecMode.NORMAL)] == [0, 1, 2]


def test_initial_view():
    v = View.initial(6, [0, 2, 3])
    assert v.epoch == 0 and v.start_seq == 0 and v.size == 6
    assert v.members == (A, N, A, A, N, N)
    assert v.active == (0, 2, 3)
    assert v.mask() == [1, 0, 1, 1, 0, 0]
    assert [v.is_active(r) for r in range(-1, 7)] == [False, True, False, True, True, False,
                                                      False, False]


def test_initial_accepts_any_iterable_and_duplicates():
    assert View.initial(3, iter([2, 2, 0])).active == (0, 2)
    assert View.initial(4, range(4)).mask() == [1, 1, 1, 1]


@pytest.mark.parametrize("size", [0, -1])
def test_initial_rejects_non_positive_size(size):
    with pytest.raises(MembershipError, match="size must be positive"):
        View.initial(size, [])


@pytest.mark.parametrize("founders", [[4], [-1], [0, 1, 9]])
def test_initial_rejects_out_of_range_founders(founders):
    with pytest.raises(MembershipError, match="outside"):
        View.initial(4, founders)


def test_membership_error_is_value_error():
    assert issubclass(MembershipError, ValueError)


@FAST
@given(views())
def test_mask_active_is_active_agree(v):
    assert v.mask() == [1 if s == A else 0 for s in v.members]
    assert v.active == tuple(r for r in range(v.size) if v.mask()[r])
    assert all(v.is_active(r) == (r in v.active) for r in range(-2, v.size + 2))


@FAST
@given(views())
def test_encode_decode_round_trip(v):
    raw = v.encode()
    assert isinstance(raw, bytes)
    back = View.decode(raw)
    assert back == v
    assert all(type(s) is MemberState for s in back.members)


def test_decode_rejects_unknown_member_state():
    with pytest.raises(ValueError):
        View.decode(b'{"e": 1, "m": [3, 9], "s": 0}')


# ---------------------------------------------------------------- failure


def test_after_failure_example():
    v = View.initial(4, range(4))
    w = v.after_failure([1], start_seq=17)
    assert w is not None
    assert (w.epoch, w.members, w.start_seq) == (1, (A, D, A, A), 17)
    assert v.members == (A, A, A, A)  # the old view is untouched
    assert w.after_failure([1], start_seq=20) is None  # already inactive: nothing to decide


@FAST
@given(views(), st.data())
def test_after_failure_properties(v, data):
    failed = _subset(data, v)
    seq = data.draw(st.integers(0, 2**40))
    w = v.after_failure(failed, seq)
    hit = {r for r in failed if v.members[r] == A}
    if not hit:
        assert w is None
        return
    assert w.epoch == v.epoch + 1
    assert w.start_seq == seq
    assert w.size == v.size
    for r in range(v.size):
        assert w.members[r] == (D if r in hit else v.members[r])
    assert set(w.active) == set(v.active) - hit


@pytest.mark.parametrize("failed", [[4], [-1], [0, 100]])
def test_after_failure_rejects_out_of_range(failed):
    with pytest.raises(MembershipError, match="outside"):
        View.initial(4, range(4)).after_failure(failed, 0)


def test_after_failure_of_every_active_rank_leaves_an_empty_view():
    w = View.initial(3, [0, 2]).after_failure([0, 2], 5)
    assert w is not None and w.active == () and w.members == (D, N, D)


def test_ranks_may_be_torch_scalars():
    v = View.initial(4, range(4))
    w = v.after_failure(torch.tensor([2]), 1)
    assert w is not None and w.active == (0, 1, 3)
    assert v.after_deactivation([torch.tensor(3)], 1).active == (0, 1, 2)


# ---------------------------------------------------------------- deactivation


def test_after_deactivation_example():
    v = View.initial(4, range(4))
    w = v.after_deactivation([3, 1, 3], start_seq=9)  # duplicates count once
    assert (w.epoch, w.members, w.start_seq) == (1, (A, D, A, D), 9)


@FAST
@given(views(), st.data())
def test_after_deactivation_properties(v, data):
    ranks = _subset(data, v)
    seq = data.draw(st.integers(0, 2**40))
    want = set(ranks)
    if any(v.members[r] != A for r in want):
        with pytest.raises(MembershipError, match="not active"):
            v.after_deactivation(ranks, seq)
        return
    if len(want) >= len(v.active):
        with pytest.raises(MembershipError, match="every active rank"):
            v.after_deactivation(ranks, seq)
        return
    w = v.after_deactivation(ranks, seq)
    assert (w.epoch, w.start_seq) == (v.epoch + 1, seq)
    for r in range(v.size):
        assert w.members[r] == (D if r in want else v.members[r])
    assert len(w.active) >= 1


def test_deactivating_all_is_refused():
    v = View.initial(3, range(3))
    with pytest.raises(MembershipError, match="every active rank"):
        v.after_deactivation([0, 1, 2], 0)
    with pytest.raises(MembershipError, match="every active rank"):
        View.initial(3, [1]).after_deactivation([1], 0)


def test_deactivating_inactive_rank_is_refused():
    v = View.initial(4, [0, 1, 2])
    with pytest.raises(MembershipError, match=r"not active"):
        v.after_deactivation([3], 0)
    w = v.after_deactivation([1], 0)
    with pytest.raises(MembershipError, match=r"\[1\]"):
        w.after_deactivation([0, 1], 0)


def test_deactivation_rejects_out_of_range():
    with pytest.raises(MembershipError, match="outside"):
        View.initial(2, range(2)).after_deactivation([2], 0)
    with pytest.raises(MembershipError, match="outside"):
        View.initial(2, range(2)).after_deactivation([-1], 0)


# ---------------------------------------------------------------- activation


def test_after_activation_example():
    v = View.initial(5, [0, 1, 2]).after_failure([1], 3)
    assert v is not None
    w, dropped = v.after_activation([1, 3, 4, 0], ready={1, 4}, start_seq=8)
    assert dropped == [3]  # 0 is already active: neither admitted again nor dropped
    assert w is not None
    assert (w.epoch, w.members, w.start_seq) == (2, (A, A, A, N, A), 8)


def test_after_activation_with_nothing_ready():
    v = View.initial(3, [0])
    w, dropped = v.after_activation([1, 2], ready=set(), start_seq=1)
    assert w is None and dropped == [1, 2]
    w, dropped = v.after_activation([0], ready={0}, start_seq=1)
    assert w is None and dropped == []


@FAST
@given(views(), st.data())
def test_after_activation_properties(v, data):
    ranks = _subset(data, v, "ranks")
    ready = set(_subset(data, v, "ready"))
    seq = data.draw(st.integers(0, 2**40))
    w, dropped = v.after_activation(ranks, ready, seq)
    requested = set(ranks)
    admitted = {r for r in requested if v.members[r] != A and r in ready}
    assert dropped == sorted(r for r in requested if r not in ready and v.members[r] != A)
    if not admitted:
        assert w is None
        return
    assert w is not None
    assert (w.epoch, w.start_seq, w.size) == (v.epoch + 1, seq, v.size)
    assert set(w.active) == set(v.active) | admitted
    for r in range(v.size):
        assert w.members[r] == (A if r in admitted else v.members[r])
    assert not set(dropped) & set(w.active) - set(v.active)


def test_activation_rejects_out_of_range():
    with pytest.raises(MembershipError, match="outside"):
        View.initial(2, [0]).after_activation([5], {5}, 0)


# ---------------------------------------------------------------- random histories


class ViewHistory(RuleBasedStateMachine):
    """Random sequences of events, with invariants that must hold after each one."""

    def __init__(self):
        super().__init__()
        self.view = View.initial(6, [0, 1, 2, 3])
        self.epochs = [0]
        self.seq = 0

    def _commit(self, new: View | None) -> None:
        if new is not None:
            assert new.epoch > self.view.epoch
            assert new.start_seq >= self.view.start_seq
            self.epochs.append(new.epoch)
            self.view = new

    @rule(failed=st.lists(st.integers(0, 5), max_size=3), gap=st.integers(0, 5))
    def fail(self, failed, gap):
        self.seq += gap
        before = self.view
        self._commit(before.after_failure(failed, self.seq))
        for r in failed:
            assert not self.view.is_active(r)

    @rule(ranks=st.lists(st.integers(0, 5), min_size=1, max_size=3), gap=st.integers(0, 5))
    def deactivate(self, ranks, gap):
        self.seq += gap
        before = self.view
        try:
            new = before.after_deactivation(ranks, self.seq)
        except MembershipError:
            assert (any(not before.is_active(r) for r in ranks)
                    or len(set(ranks)) >= len(before.active))
            return
        self._commit(new)
        assert set(self.view.active) == set(before.active) - set(ranks)
        assert self.view.active

    @precondition(lambda self: len(self.view.active) < self.view.size)
    @rule(ranks=st.lists(st.integers(0, 5), min_size=1, max_size=4),
          ready=st.sets(st.integers(0, 5)), gap=st.integers(0, 5))
    def activate(self, ranks, ready, gap):
        self.seq += gap
        before = self.view
        new, dropped = before.after_activation(ranks, ready, self.seq)
        self._commit(new)
        admitted = set(self.view.active) - set(before.active)
        assert admitted <= ready
        assert admitted | set(dropped) == {r for r in ranks if not before.is_active(r)}
        assert not admitted & set(dropped)

    @invariant()
    def epochs_strictly_increase_and_slots_are_fixed(self):
        assert self.epochs == sorted(set(self.epochs))
        assert self.view.epoch == self.epochs[-1]
        assert self.view.size == 6
        assert View.decode(self.view.encode()) == self.view
        assert View.decode(self.view.encode()).cause == self.view.cause


ViewHistory.TestCase.settings = settings(max_examples=40, stateful_step_count=20, deadline=None)
TestViewHistory = ViewHistory.TestCase
