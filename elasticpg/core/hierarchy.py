"""The plan of a hierarchical collective: which participants share a host, who leads each host,
and what a rank does in which round, as a pure function of the participants and their host ids.

Every participant computes the plan from the same published facts (the view's active set and
the host ids in the store), so all of them make the same choice without talking.

Rounds of a hierarchical all_reduce at rank r (host group G, leader L = min(G)):

1. inside the host, the one-host shared-memory all_reduce over G, unchanged (so a rank that
   already applied a one-host failure view and one still on the multi-host view run the same
   rounds first: the constraint in the README, "Across hosts"). Every rank of G then holds the
   host's partial result;
2. the leaders exchange partial results over TCP, each with the ranks it covers;
3. inside the host, the leader posts the combined result (and whom it covers) in the rounds
   after those of step 1; the members copy it.

Broadcast from root R: R sends the tensor once per other host, to that host's leader, over TCP
(the flat form's frame, unchanged); then inside every host its source (R on R's host, the
leader elsewhere) broadcasts it in shared memory, the leader with a word on whether R's tensor
came (`broadcast_source`, `broadcast_targets`).

all_gather: (1) inside the host, the one-host shared-memory all_gather over G; (2) the leaders
send each other their host's blocks over TCP, with whom they cover; (3) the leader posts the
blocks of every remote rank (`remote_ranks`, in ascending rank order, a block each) in the
rounds after step 1's, the members copy those its table says arrived whole.

Each runs only where it pays (`pays`: the op's kind and per-rank bytes, alike everywhere).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .framing import OpKind
from .reduction import WIDENED, Reduce

# Per-rank tensor bytes from which each collective runs hierarchically (below: the flat forms).
# Measured with `elasticpg hier-bench` over 2 namespaces x 2 ranks (README, "Across hosts"),
# two runs: the smallest size from which the hierarchy was ahead of the flat TCP form in both
# (all_reduce 0.62-0.93x at 256 KiB, 1.07 at 128 KiB; broadcast 0.64-0.76x from 2 MiB, 0.66
# and 1.08 at 1 MiB; all_gather 0.75-0.91x at 1 MiB, 0.98-1.35 below). Below, the ops are
# latency-bound: two or three steps in series (and full shared-memory exchanges where the flat
# broadcast's root only sends) cost more than the bytes they save.
MIN_BYTES: dict[OpKind, int] = {
    OpKind.ALLREDUCE: 256 << 10,
    OpKind.BROADCAST: 2 << 20,
    OpKind.ALLGATHER: 1 << 20,
    OpKind.ALLGATHER_INTO_TENSOR: 1 << 20,
}


def pays(kind: OpKind, nbytes: int) -> bool:
    """Whether a collective of this kind with `nbytes` per rank (the same at every participant
    of one call) runs hierarchically by default: kinds without a hierarchical form never do."""
    least = MIN_BYTES.get(kind)
    return least is not None and nbytes >= least


@dataclass(frozen=True)
class HierPlan:
    """One rank's part in a hierarchical collective over `groups` (see module docstring)."""

    me: int
    groups: tuple[tuple[int, ...], ...]  # ranks per host, ascending, ordered by leader
    mine: tuple[int, ...]  # this rank's host group

    @property
    def leader(self) -> int:
        return self.mine[0]

    @property
    def is_leader(self) -> bool:
        return self.me == self.mine[0]

    @property
    def leaders(self) -> tuple[int, ...]:
        return tuple(g[0] for g in self.groups)

    @property
    def remote_leaders(self) -> tuple[int, ...]:
        """The leaders this rank exchanges with over TCP (none unless it leads)."""
        return tuple(g[0] for g in self.groups if g[0] != self.me) if self.is_leader else ()

    def group_of(self, rank: int) -> tuple[int, ...]:
        for g in self.groups:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} is not a participant")


def broadcast_source(plan: HierPlan, root: int) -> int:
    """Whom this rank's host gets a broadcast from `root` through: the root on its own host,
    the host's leader elsewhere (which gets it from the root over TCP)."""
    return root if root in plan.mine else plan.leader


def broadcast_targets(plan: HierPlan, root: int) -> tuple[int, ...]:
    """The ranks the root sends to over TCP (one per other host: its leader); () elsewhere."""
    if plan.me != root:
        return ()
    return tuple(g[0] for g in plan.groups if root not in g)


def remote_ranks(plan: HierPlan) -> tuple[int, ...]:
    """The participants on other hosts, ascending: the order of their blocks in an
    all_gather's step-3 stream."""
    return tuple(sorted(r for g in plan.groups if g != plan.mine for r in g))


def host_groups(participants: Sequence[int],
                hosts: Mapping[int, str]) -> tuple[tuple[int, ...], ...]:
    """Participants grouped by host id, each group ascending, groups by their smallest rank.

    A rank with no host id (shared memory off, or its record unreadable) is a host of its own:
    it never maps anyone's memory, as on the flat paths."""
    by: dict[str, list[int]] = {}
    for r in sorted(participants):
        h = hosts.get(r, "")
        by.setdefault(h if h else f"\0tcp{r}", []).append(r)
    return tuple(sorted((tuple(g) for g in by.values()), key=lambda g: g[0]))


def plan(me: int, participants: Sequence[int], hosts: Mapping[int, str]) -> HierPlan | None:
    """The hierarchical plan for `me`, or None where the flat forms run: every participant on
    one host (shared memory), one participant per host (TCP between all, nothing to gain), or
    a participant without a host id (ELASTICPG_TRANSPORT=tcp opts its collectives out of shared
    memory altogether)."""
    if me not in participants:
        raise ValueError(f"rank {me} is not in {list(participants)}")
    if not all(hosts.get(r) for r in participants):
        return None
    groups = host_groups(participants, hosts)
    if len(groups) < 2 or all(len(g) == 1 for g in groups):
        return None
    mine = next(g for g in groups if me in g)
    return HierPlan(me, groups, mine)


def reduces_hierarchically(op: Reduce, dtype: object) -> bool:
    """Whether an all_reduce with this op and dtype may run hierarchically: partial results
    must combine to what the flat form computes. AVG does not (an average of per-host
    averages), nor dtypes the flat form reduces in a wider type in one pass (float16,
    bfloat16, float8: a per-host partial would be rounded back first)."""
    return op != Reduce.AVG and dtype not in WIDENED


MISSING, INCLUDED, FAILED = 0, 1, 2  # what a coverage table says of a participant


def windows(nbytes: int, window: int) -> int:
    """Shared-memory rounds that `nbytes` take in windows of `window` bytes (at least one)."""
    return max(1, -(-nbytes // window))


def result_rounds(nbytes: int, window: int, stream: int | None = None) -> range:
    """The round numbers of step 3 (the leader's `stream` bytes to its members, default
    `nbytes`): right after the one-host form's rounds 0 .. windows(nbytes) - 1, which step 1
    runs unchanged, so the multi-host form is the one-host form plus later rounds (a
    prefix-compatible superset)."""
    n = windows(nbytes, window)
    return range(n, n + windows(nbytes if stream is None else stream, window))


def classify(me: int, participants: Sequence[int], table: Mapping[int, int],
             seen_failed: Iterable[int] = ()) -> tuple[set[int], set[int], set[int]]:
    """(included, failed, missing) of the other participants for a result whose coverage
    table is `table` (participant -> MISSING / INCLUDED / FAILED; absent: MISSING).

    Failed: someone on the way saw it fail, or this process did (`seen_failed`): named in the
    failed-ranks hint, excluded in mode (a). Missing: no news of it (its leader, or ours, is
    gone or on another form): the result is incomplete, but it is not called failed, so no
    healthy host is excluded (README, "Across hosts", constraint 2)."""
    seen = set(seen_failed)
    included, failed, missing = set(), set(), set()
    for r in participants:
        if r == me:
            continue
        s = table.get(r, MISSING)
        if s == INCLUDED:
            included.add(r)
        elif s == FAILED or r in seen:
            failed.add(r)
        else:
            missing.add(r)
    return included, failed, missing
