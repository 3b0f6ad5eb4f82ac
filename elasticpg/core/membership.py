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

import numpy as np


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


class View:
    """One decided membership (immutable). Slot states are kept as one byte per slot: with 1024
    slots every rank decodes, derives and applies each decided view, so these are C-level
    operations; `members` (a tuple of MemberState) is made on first use.

    Equality is (epoch, members, start_seq); `cause` (why it was decided, for operators) and
    `by` (the rank whose proposal won the compare-and-set, -1 before a decision and for the
    initial view: ranks proposing the same view learn from it which of them won) are not
    compared."""

    __slots__ = ("epoch", "start_seq", "cause", "by", "_raw", "_members", "_active")

    def __init__(self, epoch: int, members: Iterable[MemberState] | bytes, start_seq: int = 0,
                 cause: str = "", by: int = -1) -> None:
        raw = members if isinstance(members, bytes) else bytes(members)
        if raw.translate(None, _STATE_BYTES):
            raise MembershipError(f"unknown member state in {sorted(set(raw))}")
        self.epoch, self.start_seq, self.cause, self.by = epoch, start_seq, cause, by
        self._raw = raw
        self._members: tuple[MemberState, ...] | None = None
        self._active: tuple[int, ...] | None = None

    def __setattr__(self, name: str, value: object) -> None:
        if hasattr(self, "_active") and name not in ("_members", "_active"):
            raise AttributeError(f"View is immutable (cannot set {name})")
        object.__setattr__(self, name, value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, View):
            return NotImplemented
        return (self.epoch, self._raw, self.start_seq) == (other.epoch, other._raw,
                                                           other.start_seq)

    def __hash__(self) -> int:
        return hash((self.epoch, self._raw, self.start_seq))

    def __repr__(self) -> str:
        return (f"View(epoch={self.epoch}, members={self._raw.translate(_DIGITS).decode()}, "
                f"start_seq={self.start_seq}, cause={self.cause!r}, by={self.by})")

    @property
    def members(self) -> tuple[MemberState, ...]:
        if self._members is None:
            self._members = tuple(map(_STATES.__getitem__, self._raw))
        return self._members

    @property
    def active(self) -> tuple[int, ...]:
        """The active slots, ascending (derived once: every collective asks for it)."""
        if self._active is None:
            self._active = tuple(np.flatnonzero(
                np.frombuffer(self._raw, dtype=np.uint8) == MemberState.ACTIVE).tolist())
        return self._active

    @classmethod
    def initial(cls, size: int, founders: Iterable[int]) -> View:
        founders = set(founders)
        if size <= 0:
            raise MembershipError(f"group size must be positive, got {size}")
        bad = [r for r in founders if not 0 <= r < size]
        if bad:
            raise MembershipError(f"founding ranks {bad} outside 0..{size - 1}")
        raw = bytearray(size)
        for r in founders:
            raw[r] = MemberState.ACTIVE
        return cls(0, bytes(raw))

    @property
    def size(self) -> int:
        return len(self._raw)

    def mask(self) -> list[int]:
        return list(self._raw.translate(_ACTIVE_BIT))

    def changed_activity(self, other: View) -> list[int]:
        """The slots active in exactly one of the two views (of one group), ascending."""
        a = np.frombuffer(self._raw, dtype=np.uint8) == MemberState.ACTIVE
        b = np.frombuffer(other._raw, dtype=np.uint8) == MemberState.ACTIVE
        return np.flatnonzero(a != b).tolist()

    def is_active(self, rank: int) -> bool:
        return 0 <= rank < len(self._raw) and self._raw[rank] == MemberState.ACTIVE

    def encode(self, by: int | None = None) -> bytes:
        """JSON with the members as one digit per slot (about a byte per slot). `by`: sign the
        encoding as the proposal of that rank (see the class docstring)."""
        return json.dumps({"e": self.epoch, "m": self._raw.translate(_DIGITS).decode(),
                           "s": self.start_seq, "c": self.cause,
                           "b": self.by if by is None else by}).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> View:
        try:
            d = json.loads(raw)
            digits = d["m"].encode()
            if digits.translate(None, _DIGIT_BYTES):
                raise ValueError(f"member states must be digits {_DIGIT_BYTES.decode()}")
            return cls(d["e"], digits.translate(_FROM_DIGITS), d["s"], d.get("c", ""),
                       d.get("b", -1))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MembershipError(f"not an encoded view ({type(exc).__name__}: {exc}): "
                                  f"{raw[:80]!r}") from None

    def _with(self, changes: dict[int, MemberState], start_seq: int, cause: str) -> View:
        raw = bytearray(self._raw)
        for r, s in changes.items():
            raw[r] = s
        return View(self.epoch + 1, bytes(raw), start_seq, cause)

    def _check_ranks(self, ranks: Iterable[int]) -> list[int]:
        ranks = sorted(set(int(r) for r in ranks))
        bad = [r for r in ranks if not 0 <= r < self.size]
        if bad:
            raise MembershipError(f"ranks {bad} outside the group's slots 0..{self.size - 1}")
        return ranks

    def after_failure(self, failed: Iterable[int], start_seq: int,
                      cause: str = "") -> View | None:
        """The next view without `failed`; None when none of them is active (nothing to do)."""
        hit = [r for r in self._check_ranks(failed) if self._raw[r] == MemberState.ACTIVE]
        if not hit:
            return None
        return self._with({r: MemberState.INACTIVE for r in hit}, start_seq,
                          cause or f"ranks {hit} failed")

    def after_deactivation(self, ranks: Iterable[int], start_seq: int,
                           cause: str = "") -> View:
        ranks = self._check_ranks(ranks)
        not_active = [r for r in ranks if self._raw[r] != MemberState.ACTIVE]
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
        todo = [r for r in ranks if self._raw[r] != MemberState.ACTIVE]
        admit = [r for r in todo if r in ready]
        dropped = [r for r in todo if r not in ready]
        if not admit:
            return None, dropped
        return self._with({r: MemberState.ACTIVE for r in admit}, start_seq,
                          cause or f"ranks {admit} activated"), dropped



_STATES = tuple(MemberState)  # by value: 0, 1, 2
_STATE_BYTES = bytes(range(len(_STATES)))
_DIGIT_BYTES = "".join(str(int(st)) for st in _STATES).encode()
_DIGITS = bytes.maketrans(_STATE_BYTES, _DIGIT_BYTES)  # state byte -> its digit
_FROM_DIGITS = bytes.maketrans(_DIGIT_BYTES, _STATE_BYTES)
_ACTIVE_BIT = bytes(1 if b == MemberState.ACTIVE else 0 for b in range(256))
