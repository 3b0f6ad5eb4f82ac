"""Algorithm schedules: peer orders and slicing, checked over every small case and at random."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elasticpg.core.schedules import even_splits, peer_order, split_offsets

FAST = settings(max_examples=50, deadline=None)

rank_sets = st.lists(st.integers(0, 1023), min_size=1, max_size=40, unique=True)


# ---------------------------------------------------------------- peer_order


def test_peer_order_examples():
    assert peer_order(0, [0, 1, 2, 3]) == [1, 2, 3]
    assert peer_order(2, [0, 1, 2, 3]) == [3, 0, 1]
    assert peer_order(3, [0, 1, 2, 3]) == [0, 1, 2]
    assert peer_order(5, [0, 2, 5, 7]) == [7, 0, 2]  # holes in the active set
    assert peer_order(4, [4]) == []
    assert peer_order(1, (3, 1, 2)) == [2, 3]  # follows the given order, not sorted order


@FAST
@given(rank_sets, st.data())
def test_peer_order_is_a_rotation_excluding_me(ranks, data):
    me = data.draw(st.sampled_from(ranks))
    order = peer_order(me, ranks)
    i = ranks.index(me)
    assert order == ranks[i + 1:] + ranks[:i]
    assert me not in order
    assert sorted(order) == sorted(r for r in ranks if r != me)
    assert len(order) == len(ranks) - 1


@FAST
@given(rank_sets)
def test_peer_order_rounds_are_permutations(ranks):
    # In round k every rank targets a distinct peer: no receiver is hit by all senders at once,
    # and every ordered pair of distinct ranks meets exactly once.
    orders = {me: peer_order(me, ranks) for me in ranks}
    for k in range(len(ranks) - 1):
        targets = [orders[me][k] for me in ranks]
        assert sorted(targets) == sorted(ranks)
        assert all(t != me for t, me in zip(targets, ranks, strict=True))
    pairs = {(me, p) for me, o in orders.items() for p in o}
    assert len(pairs) == len(ranks) * (len(ranks) - 1)


@FAST
@given(rank_sets, st.integers(0, 2000))
def test_peer_order_rejects_non_member(ranks, me):
    if me in ranks:
        return
    with pytest.raises(ValueError, match=f"rank {me} is not in"):
        peer_order(me, ranks)


def test_peer_order_empty_ranks():
    with pytest.raises(ValueError):
        peer_order(0, [])


# ---------------------------------------------------------------- even_splits


def _check_cover(splits, numel):
    off = 0
    for o, c in splits:
        assert o == off
        assert c >= 0
        off += c
    assert off == numel


def test_even_splits_examples():
    assert even_splits(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert even_splits(9, 3) == [(0, 3), (3, 3), (6, 3)]
    assert even_splits(2, 4) == [(0, 1), (1, 1), (2, 0), (2, 0)]
    assert even_splits(0, 2) == [(0, 0), (0, 0)]
    assert even_splits(7, 1) == [(0, 7)]


@FAST
@given(st.integers(0, 10**12), st.integers(1, 300))
def test_even_splits_cover_exactly_and_evenly(numel, parts):
    splits = even_splits(numel, parts)
    assert len(splits) == parts
    _check_cover(splits, numel)
    counts = [c for _, c in splits]
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # the larger slices come first
    assert counts[0] == -(-numel // parts)


def test_even_splits_every_small_case():
    for numel in range(0, 40):
        for parts in range(1, 12):
            splits = even_splits(numel, parts)
            covered = [i for o, c in splits for i in range(o, o + c)]
            assert covered == list(range(numel)), (numel, parts)


@pytest.mark.parametrize("parts", [0, -1, -10])
def test_even_splits_rejects_non_positive_parts(parts):
    with pytest.raises(ValueError, match="parts must be positive"):
        even_splits(10, parts)


# ---------------------------------------------------------------- split_offsets


def test_split_offsets_examples():
    assert split_offsets([3, 0, 2, 5]) == [(0, 3), (3, 0), (3, 2), (5, 5)]
    assert split_offsets([]) == []
    assert split_offsets((0, 0)) == [(0, 0), (0, 0)]


@FAST
@given(st.lists(st.integers(0, 10**9), max_size=64))
def test_split_offsets_cover_contiguously(sizes):
    splits = split_offsets(sizes)
    assert [c for _, c in splits] == sizes
    _check_cover(splits, sum(sizes))


@FAST
@given(st.lists(st.integers(0, 100), max_size=10), st.integers(-100, -1), st.data())
def test_split_offsets_rejects_negative_sizes(sizes, neg, data):
    at = data.draw(st.integers(0, len(sizes)))
    bad = sizes[:at] + [neg] + sizes[at:]
    with pytest.raises(ValueError, match="non-negative"):
        split_offsets(bad)


# ---------------------------------------------------------------- split_allreduce


def test_split_allreduce_is_for_large_tensors_at_more_than_two_ranks():
    from elasticpg.core.schedules import SPLIT_ALLREDUCE_FROM, split_allreduce

    big = SPLIT_ALLREDUCE_FROM
    assert split_allreduce(big, big // 4, 2) is None  # two ranks: the direct exchange
    assert split_allreduce(big - 1, big, 4) is None  # small: the direct exchange
    assert split_allreduce(big, 3, 4) is None  # fewer elements than ranks
    assert split_allreduce(big, 10, 3) == [(0, 4), (4, 3), (7, 3)]


@FAST
@given(st.integers(0, 1 << 30), st.integers(0, 1 << 28), st.integers(1, 1024))
def test_split_allreduce_slices_cover_the_tensor_once(nbytes, numel, ranks):
    from elasticpg.core.schedules import split_allreduce

    slices = split_allreduce(nbytes, numel, ranks)
    if slices is None:
        return
    assert len(slices) == ranks and all(c > 0 for _, c in slices)
    assert [o for o, _ in slices] == [sum(c for _, c in slices[:i]) for i in range(ranks)]
    assert sum(c for _, c in slices) == numel


@FAST
@given(st.integers(1, 1 << 27), st.integers(2, 64), st.sampled_from([1, 2, 4, 8, 16]))
def test_pipeline_chunks_tile_every_slice_alike(numel, ranks, itemsize):
    from elasticpg.core.schedules import PIPELINE_CHUNK, even_splits, pipeline_chunks

    if numel < ranks:
        return
    slices = even_splits(numel, ranks)
    chunks = pipeline_chunks(slices, itemsize)
    assert len({len(c) for c in chunks}) == 1  # every reducer runs the same number of steps
    for (o, c), parts in zip(slices, chunks, strict=True):
        assert all(cc > 0 for _, cc in parts)  # an empty frame means "incomplete"
        assert [po for po, _ in parts] == [o + sum(cc for _, cc in parts[:i])
                                           for i in range(len(parts))]
        assert sum(cc for _, cc in parts) == c
        if len(parts) > 1:
            assert max(cc for _, cc in parts) * itemsize <= PIPELINE_CHUNK + itemsize


def test_pipeline_chunks_examples():
    from elasticpg.core.schedules import PIPELINE_CHUNK, pipeline_chunks

    assert pipeline_chunks([(0, 4), (4, 3)], 4) == [[(0, 4)], [(4, 3)]]  # small: one chunk
    n = PIPELINE_CHUNK // 4
    a, b = pipeline_chunks([(0, 2 * n + 1), (2 * n + 1, 2 * n)], 4)
    assert len(a) == len(b) == 3  # the largest slice sets the count, for every reducer
    assert a[0] == (0, (2 * n + 1 + 2) // 3) and b[0][0] == 2 * n + 1
    assert pipeline_chunks([(0, 2), (2, 1)], 1 << 30) == [[(0, 2)], [(2, 1)]]  # never empty
    with pytest.raises(ValueError):
        pipeline_chunks([(0, 0)], 4)


def test_split_broadcast_is_for_large_tensors_at_more_than_two_ranks():
    from elasticpg.core.schedules import SPLIT_BROADCAST_FROM, split_broadcast

    big = SPLIT_BROADCAST_FROM
    assert split_broadcast(big, big // 4, 2) is None  # two ranks: the direct broadcast
    assert split_broadcast(big - 1, big, 4) is None  # small: direct
    assert split_broadcast(big, 2, 4) is None  # fewer elements than non-roots
    assert split_broadcast(big, 10, 4) == [(0, 4), (4, 3), (7, 3)]  # one per non-root
