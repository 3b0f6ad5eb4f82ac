"""core.hierarchy: the hierarchical plan, its rounds, the coverage rule, the broadcast and
all_gather data flows and the size rule, in-process: every host assignment of up to 6
participants exhaustively, wider groups by hypothesis."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from elasticpg.core.framing import OpKind
from elasticpg.core.hierarchy import (
    FAILED,
    INCLUDED,
    MIN_BYTES,
    MISSING,
    broadcast_source,
    broadcast_targets,
    classify,
    host_groups,
    pays,
    plan,
    reduces_hierarchically,
    remote_ranks,
    result_rounds,
    windows,
)
from elasticpg.core.reduction import WIDENED, Reduce


def _check(participants: tuple[int, ...], hosts: dict[int, str]) -> None:
    plans = {me: plan(me, participants, hosts) for me in participants}
    distinct_hosts = {hosts.get(r) or f"tcp{r}" for r in participants}
    flat = len(distinct_hosts) == 1 or len(distinct_hosts) == len(participants) or \
        not all(hosts.get(r) for r in participants)
    if flat:  # one host (shared memory), one rank per host (TCP) or a TCP opt-out: flat
        assert all(p is None for p in plans.values())
        return
    groups = plans[participants[0]].groups
    # every participant makes the same choice
    assert all(p is not None and p.groups == groups for p in plans.values())
    # a partition of the participants, each group on one host, ascending, ordered by leader
    assert sorted(r for g in groups for r in g) == sorted(participants)
    for g in groups:
        assert list(g) == sorted(g)
        assert len({hosts.get(r) or f"tcp{r}" for r in g}) == 1
        if not hosts.get(g[0]):
            assert len(g) == 1  # no host id: a host of its own, never sharing memory
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)
    # ranks of one host share a group: the plan never splits a host
    for a, b in itertools.combinations(participants, 2):
        if hosts.get(a) and hosts.get(a) == hosts.get(b):
            assert plans[a].mine == plans[b].mine
    for me, p in plans.items():
        assert me in p.mine and p.leader == min(p.mine)
        assert p.is_leader == (me == p.leader)
        # a leader talks TCP to every other leader, a member to nobody
        assert set(p.remote_leaders) == ({g[0] for g in groups} - {me} if p.is_leader
                                         else set())
        assert p.leaders == tuple(g[0] for g in groups)


def _check_broadcast(participants: tuple[int, ...], hosts: dict[int, str]) -> None:
    """Every non-root gets the root's tensor along exactly one path: from the root in shared
    memory on the root's host, elsewhere from its host's leader, which alone gets it from the
    root over TCP: one TCP message per other host."""
    plans = {me: plan(me, participants, hosts) for me in participants}
    if plans[participants[0]] is None:
        return
    groups = plans[participants[0]].groups
    for root in participants:
        tcp = {me: broadcast_targets(p, root) for me, p in plans.items()}
        assert all(not t for me, t in tcp.items() if me != root)
        assert sorted(tcp[root]) == sorted(g[0] for g in groups if root not in g)
        assert len(tcp[root]) == len(groups) - 1
        for p in plans.values():
            src = broadcast_source(p, root)
            assert src in p.mine  # inside the host: shared memory
            if root in p.mine:
                assert src == root
            else:
                assert src == p.leader and src in tcp[root]


def _check_all_gather(participants: tuple[int, ...], hosts: dict[int, str]) -> None:
    """The three steps carry every block to every rank exactly once, and the step-3 stream
    holds each remote block once, in one layout that every rank of a host computes alike."""
    plans = {me: plan(me, participants, hosts) for me in participants}
    if plans[participants[0]] is None:
        return
    have = {me: set(p.mine) for me, p in plans.items()}  # step 1: the host's blocks
    for me, p in plans.items():  # step 2: a leader gets the other leaders' host blocks
        if p.is_leader:
            for q in p.remote_leaders:
                have[me] |= set(plans[q].mine)
    for me, p in plans.items():  # step 3: members copy their leader's remote blocks
        remote = remote_ranks(p)
        assert remote == tuple(sorted(set(participants) - set(p.mine)))
        assert remote == remote_ranks(plans[p.leader])
        if not p.is_leader:
            assert set(remote) <= have[p.leader]
            have[me] |= set(remote)
    assert all(h == set(participants) for h in have.values())


def test_every_host_assignment_of_up_to_6_ranks():
    for n in range(1, 7):
        parts = tuple(range(n))
        for labels in itertools.product(["a", "b", "c", ""], repeat=n):
            hosts = dict(zip(parts, labels, strict=True))
            _check(parts, hosts)
            _check_broadcast(parts, hosts)
            _check_all_gather(parts, hosts)


@given(st.lists(st.tuples(st.integers(0, 1023), st.sampled_from(["", "h0", "h1", "h2", "h3"])),
                min_size=1, max_size=64, unique_by=lambda x: x[0]))
def test_wide_groups(entries):
    parts = tuple(sorted(r for r, _ in entries))
    _check(parts, dict(entries))
    _check_broadcast(parts, dict(entries))
    _check_all_gather(parts, dict(entries))


def test_size_rule():
    """Hierarchical from MIN_BYTES of its kind on, never for kinds without the form; a pure
    function of the kind and per-rank bytes, which every participant of one call shares."""
    assert set(MIN_BYTES) == {OpKind.ALLREDUCE, OpKind.BROADCAST, OpKind.ALLGATHER,
                              OpKind.ALLGATHER_INTO_TENSOR}
    for kind in OpKind:
        least = MIN_BYTES.get(kind)
        for n in (0, 4, 1 << 10, 16 << 10, 64 << 10, 1 << 20, 64 << 20, 1 << 34):
            assert pays(kind, n) == (least is not None and n >= least)
        if least is not None:
            assert not pays(kind, least - 1) and pays(kind, least)


def test_a_rank_outside_the_participants_is_refused():
    with pytest.raises(ValueError):
        plan(5, (0, 1), {0: "a", 1: "b"})
    with pytest.raises(ValueError):
        plan(0, (0, 1, 2), {0: "a", 1: "a", 2: "b"}).group_of(7)


def test_host_groups_examples():
    hosts = {0: "a", 1: "b", 2: "a", 3: "b", 4: ""}
    assert host_groups((0, 1, 2, 3, 4), hosts) == ((0, 2), (1, 3), (4,))
    assert plan(3, (0, 1, 2, 3, 4), hosts) is None  # rank 4 opted out of shared memory
    p = plan(3, (0, 1, 2, 3), hosts)
    assert p is not None and p.mine == (1, 3) and p.leader == 1 and not p.is_leader
    assert plan(1, (0, 1, 2, 3), hosts).remote_leaders == (0,)


@given(st.integers(0, 1 << 30), st.integers(1, 1 << 24))
def test_result_rounds_follow_the_one_host_rounds(nbytes, window):
    """Step 3's rounds start right after the one-host all_reduce's (which cover every byte in
    windows of `window`) and are as many: the multi-host form is a prefix-compatible
    superset of the one-host form."""
    n = windows(nbytes, window)
    assert n >= 1 and (n - 1) * window < max(nbytes, 1) <= n * window
    rr = result_rounds(nbytes, window)
    assert rr.start == n and len(rr) == n


@given(st.integers(0, 1 << 30), st.integers(1, 1 << 24), st.integers(0, 1 << 32))
def test_result_rounds_of_another_stream(nbytes, window, stream):
    """all_gather's step 3 carries the remote blocks (`stream` bytes) after step 1's rounds."""
    rr = result_rounds(nbytes, window, stream)
    assert rr.start == windows(nbytes, window) and len(rr) == windows(stream, window)


def test_classify_the_coverage_table():
    parts = (0, 1, 2, 3)
    table = {0: INCLUDED, 1: INCLUDED, 2: FAILED, 3: MISSING}
    assert classify(1, parts, table) == ({0}, {2}, {3})
    # what this process saw fail itself is failed even where the table has no news
    assert classify(1, parts, table, seen_failed=[3]) == ({0}, {2, 3}, set())
    # a leader lost: only the host's partial, every remote rank missing, none called failed
    assert classify(3, parts, {2: INCLUDED, 3: INCLUDED}) == ({2}, set(), {0, 1})
    assert classify(0, parts, {r: MISSING for r in parts}) == (set(), set(), {1, 2, 3})


@given(st.dictionaries(st.integers(0, 15), st.sampled_from([MISSING, INCLUDED, FAILED])),
       st.sets(st.integers(0, 15)))
def test_classify_partitions_the_others(table, seen):
    parts = tuple(range(16))
    inc, failed, missing = classify(4, parts, table, seen)
    assert inc | failed | missing == set(parts) - {4}
    assert not (inc & failed or inc & missing or failed & missing)
    assert inc == {r for r in parts if r != 4 and table.get(r) == INCLUDED}
    # a rank is called failed only on evidence: a FAILED entry or a failure seen here
    assert all(table.get(r) == FAILED or r in seen for r in failed)


def test_which_reductions_run_hierarchically():
    for op in Reduce:
        for dtype in (torch.float32, torch.int64, torch.bool, *WIDENED):
            assert reduces_hierarchically(op, dtype) == (op != Reduce.AVG and dtype not in WIDENED)
