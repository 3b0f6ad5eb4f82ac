"""Slot sets of groups from 1 to 1024 slots (and the 4096 bound): masks, their one-word keys and
full words, the VIEW payload, views in the store, and membership decisions at width."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticpg.core.framing import pack_slots, unpack_slots
from elasticpg.core.group_state import JoinAttempt, JoinerTable, agree, readiness_digest
from elasticpg.core.membership import MembershipError, MemberState, View
from elasticpg.core.slot_masks import (
    KEY_EXACT_SLOTS,
    MAX_SLOTS,
    mask_bytes,
    mask_from_bytes,
    mask_key,
    mask_of,
    ranks_of,
    words_for,
)
from elasticpg.options import Options

FAST = settings(max_examples=100, deadline=None)
A, D, N = MemberState.ACTIVE, MemberState.INACTIVE, MemberState.NONE


@st.composite
def slot_sets(draw, max_slots=1024):
    """(slots, a subset of range(slots)): dense, sparse, empty, full and edge-bit sets."""
    slots = draw(st.one_of(st.integers(1, max_slots),
                           st.sampled_from([1, 63, 64, 65, 127, 128, 129, 1023, 1024])))
    kind = draw(st.sampled_from(["any", "full", "empty", "edges"]))
    if kind == "full":
        return slots, set(range(slots))
    if kind == "empty":
        return slots, set()
    if kind == "edges":
        return slots, {r for r in (0, 62, 63, 64, slots - 1) if r < slots}
    return slots, draw(st.sets(st.integers(0, slots - 1), max_size=min(slots, 300)))


@FAST
@given(slot_sets())
def test_masks_round_trip_through_ranks_bytes_and_frames(case):
    slots, members = case
    mask = mask_of(members)
    assert ranks_of(mask) == sorted(members)
    raw = mask_bytes(mask, slots)
    assert len(raw) == 8 * words_for(slots) and mask_from_bytes(raw) == mask
    assert unpack_slots(pack_slots(members)) == frozenset(members)


@FAST
@given(slot_sets(), slot_sets())
def test_keys_fit_one_signed_word_are_exact_up_to_63_slots_and_equal_for_equal_masks(a, b):
    (slots, x), (_, y) = a, b
    y = {r for r in y if r < slots}
    kx, ky = mask_key(mask_of(x), slots), mask_key(mask_of(y), slots)
    assert 0 <= kx < 2**63
    if slots <= KEY_EXACT_SLOTS:
        assert kx == mask_of(x)
    if x == y:
        assert kx == ky
    # different sets may share a key above 63 slots: the full words then tell them apart
    assert (mask_bytes(mask_of(x), slots) == mask_bytes(mask_of(y), slots)) == (x == y)


def test_a_mask_wider_than_its_group_or_negative_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        mask_bytes(1 << 100, 100)
    with pytest.raises(ValueError, match="does not fit"):
        mask_bytes(-1, 8)
    with pytest.raises(ValueError, match="not negative"):
        ranks_of(-5)


@st.composite
def wide_views(draw):
    slots, active = draw(slot_sets())
    inactive = draw(st.sets(st.integers(0, slots - 1), max_size=20)) - active
    members = tuple(A if r in active else D if r in inactive else N for r in range(slots))
    return View(draw(st.integers(0, 2**31)), members, draw(st.integers(0, 2**48)),
                draw(st.text(max_size=20)), draw(st.integers(-1, slots - 1)))


@FAST
@given(wide_views())
def test_views_of_1_to_1024_slots_round_trip_through_the_store_encoding(v):
    raw = v.encode()
    back = View.decode(raw)
    assert back == v and hash(back) == hash(v)
    assert (back.cause, back.by, back.members, back.active) == (v.cause, v.by, v.members,
                                                                 v.active)
    assert all(type(s) is MemberState for s in back.members)
    assert back.active == tuple(r for r, s in enumerate(v.members) if s == A)
    assert back.mask() == [int(s == A) for s in v.members]
    assert len(raw) < v.size + 120 + len(json.dumps(v.cause))  # about a byte per slot
    assert View.decode(v.encode(by=7)).by == 7 and View.decode(v.encode(by=7)) == v


def test_views_are_immutable_and_reject_unknown_states():
    v = View.initial(1024, range(1000))
    with pytest.raises(AttributeError):
        v.epoch = 3
    with pytest.raises(MembershipError):
        View(0, bytes([0, 1, 3]))
    for raw in (b'{"e": 1, "m": "0129", "s": 0}', b'{"e": 1, "m": [2, 2], "s": 0}',
                b'{"e": 1, "s": 0}', b"not json"):
        with pytest.raises(MembershipError, match="not an encoded view"):
            View.decode(raw)


@FAST
@given(wide_views(), st.data())
def test_decisions_at_width_change_exactly_the_named_slots(v, data):
    failed = data.draw(st.sets(st.integers(0, v.size - 1), max_size=10))
    w = v.after_failure(failed, start_seq=5)
    hit = {r for r in failed if v.is_active(r)}
    if not hit:
        assert w is None
        return
    assert w.epoch == v.epoch + 1 and w.by == -1 and w.start_seq == 5
    assert set(w.active) == set(v.active) - hit
    assert [r for r in range(v.size) if w.members[r] != v.members[r]] == sorted(hit)
    assert v.changed_activity(w) == w.changed_activity(v) == sorted(hit)
    back, dropped = w.after_activation(sorted(hit), ready=hit, start_seq=9)
    assert back is not None and dropped == [] and back.active == v.active


def test_readiness_agreement_among_1023_members():
    table = JoinerTable()
    join = JoinAttempt(511, 2, 1)
    assert table.announced(join) and table.linked(join)
    d = table.digest
    assert d == readiness_digest([join]) and 0 < d < 2**63
    assert agree(d, [d] * 1022)
    assert not agree(d, [d] * 1021 + [0])
    table.settle_agreement([d] * 1022)
    assert table.ready_slots(agreed=True) == {511}


def test_options_accept_up_to_max_slots_and_reject_more():
    Options(max_group_size=1024).validate(3)
    Options(max_group_size=MAX_SLOTS).validate(MAX_SLOTS)
    with pytest.raises(ValueError, match=f"at most {MAX_SLOTS} slots"):
        Options(max_group_size=MAX_SLOTS + 1).validate(3)
    with pytest.raises(ValueError, match=f"at most {MAX_SLOTS} slots"):
        Options().validate(MAX_SLOTS + 1)
