"""Membership as a sequence of views (SPEC section 1).

A view is (epoch, per-slot member state, the collective sequence number from which it applies).
Slots are never renumbered: a dead rank leaves a hole, a replacement takes the same slot. The
functions here decide the next view from the current one and an event; the control plane only
stores the decisions (atomically), and the process group only applies them.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace


class MemberState(enum.IntEnum):
    """A slot's state in a view. (A joiner waiting for activation is not a view state: that
    is its join attempt's key in the store, see control/group_store.py.)"""

    NONE = 0  # never a member
    INACTIVE = 1  # was a member (failed, left or deactivated), not participating
    ACTIVE = 2  # participates in collectives


class ExecMode(enum.IntEnum):
    ISOLATED = 0  # extension rank before join: collectives run over {self}
    QUIESCING = 1  # inside join_group: rejects new work
    NORMAL = 2


class MembershipError(ValueError):
    """A membership request that cannot be applied to the current view."""


@dataclass(frozen=True, slots=True)
class View:
    epoch: int
    members: tuple[MemberState, ...]
    start_seq: int = 0  # the first collective sequence number this view governs
    cause: str = field(default="", compare=False)  # why it was decided (for operators)
    # derived once: every collective asks for them
    active: tuple[int, ...] = field(init=False, repr=False, compare=False)
    active_mask: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        active = tuple(r for r, s in enumerate(self.members) if s == MemberState.ACTIVE)
        object.__setattr__(self, "active", active)
        object.__setattr__(self, "active_mask", sum(1 << r for r in active))

    @classmethod
    def initial(cls, size: int, founders: Iterable[int]) -> View:
        founders = set(founders)
        if size <= 0:
            raise MembershipError(f"group size must be positive, got {size}")
        bad = [r for r in founders if not 0 <= r < size]
        if bad:
            raise MembershipError(f"founding ranks {bad} outside 0..{size - 1}")
        return cls(0, tuple(MemberState.ACTIVE if r in founders else MemberState.NONE
                            for r in range(size)))

    @property
    def size(self) -> int:
        return len(self.members)

    def mask(self) -> list[int]:
        return [1 if s == MemberState.ACTIVE else 0 for s in self.members]

    def is_active(self, rank: int) -> bool:
        return 0 <= rank < self.size and self.members[rank] == MemberState.ACTIVE

    def encode(self) -> bytes:
        return json.dumps({"e": self.epoch, "m": [int(s) for s in self.members],
                           "s": self.start_seq, "c": self.cause}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> View:
        d = json.loads(raw)
        return cls(d["e"], tuple(MemberState(s) for s in d["m"]), d["s"], d.get("c", ""))

    def _with(self, changes: dict[int, MemberState], start_seq: int, cause: str) -> View:
        members = list(self.members)
        for r, s in changes.items():
            members[r] = s
        return replace(self, epoch=self.epoch + 1, members=tuple(members), start_seq=start_seq,
                       cause=cause)

    def _check_ranks(self, ranks: Iterable[int]) -> list[int]:
        ranks = sorted(set(int(r) for r in ranks))
        bad = [r for r in ranks if not 0 <= r < self.size]
        if bad:
            raise MembershipError(f"ranks {bad} outside the group's slots 0..{self.size - 1}")
        return ranks

    def after_failure(self, failed: Iterable[int], start_seq: int,
                      cause: str = "") -> View | None:
        """The next view without `failed`; None when none of them is active (nothing to do)."""
        hit = [r for r in self._check_ranks(failed) if self.members[r] == MemberState.ACTIVE]
        if not hit:
            return None
        return self._with({r: MemberState.INACTIVE for r in hit}, start_seq,
                          cause or f"ranks {hit} failed")

    def after_deactivation(self, ranks: Iterable[int], start_seq: int,
                           cause: str = "") -> View:
        ranks = self._check_ranks(ranks)
        not_active = [r for r in ranks if self.members[r] != MemberState.ACTIVE]
        if not_active:
            raise MembershipError(f"cannot deactivate ranks {not_active}: not active")
        if len(ranks) >= len(self.active):
            raise MembershipError("cannot deactivate every active rank")
        return self._with({r: MemberState.INACTIVE for r in ranks}, start_seq,
                          cause or f"ranks {ranks} deactivated")

    def after_activation(self, ranks: Iterable[int], ready: set[int], start_seq: int,
                         cause: str = "") -> tuple[View | None, list[int]]:
        """Activate the ready ones of `ranks`. Returns (view or None, ranks dropped as not ready).

        Ranks already active are neither activated again nor counted as dropped.
        """
        ranks = self._check_ranks(ranks)
        todo = [r for r in ranks if self.members[r] != MemberState.ACTIVE]
        admit = [r for r in todo if r in ready]
        dropped = [r for r in todo if r not in ready]
        if not admit:
            return None, dropped
        return self._with({r: MemberState.ACTIVE for r in admit}, start_seq,
                          cause or f"ranks {admit} activated"), dropped
