"""ViewKeeper: decides membership views in the store and applies them locally.

Decisions are compare-and-set on `view/<epoch>` (GroupStore.propose_view), so two ranks that see
the same failure produce one decision, and every member applies the same sequence of views. The
decider pushes a VIEW frame to everyone it can reach, so the others learn of a decision without
polling the store on the hot path; they apply it at their next operation boundary.

Only the caller thread applies views (and the mode (b) decider thread decides without
applying); `lock` orders them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from ..control.group_store import GroupStore
from ..core.membership import View


class ViewKeeper:
    def __init__(self, control: GroupStore, me: int, initial: View,
                 on_applied: Callable[[View, View], None],
                 announce: Callable[[View], None],
                 on_decided: Callable[[View, View], None] | None = None) -> None:
        self.control = control
        self.me = me
        self.applied = initial
        self._on_applied = on_applied
        self._announce = announce
        self._on_decided = on_decided  # (base, view) for every view this process decided
        self.lock = threading.RLock()

    def _apply(self, view: View) -> None:
        old, self.applied = self.applied, view
        self._on_applied(old, view)

    def adopt(self, view: View) -> None:
        """Apply `view` even though it does not follow ours (a joiner taking the live view)."""
        with self.lock:
            self._apply(view)

    def decided(self, after: int) -> list[View]:
        """Views decided in the store with epochs above `after`, in order."""
        latest = self.control.latest_epoch()
        return [self.control.view(e) for e in range(after + 1, latest + 1)]

    def catch_up(self) -> bool:
        """Apply every decided view past ours; True if any was applied."""
        with self.lock:
            pending = self.decided(self.applied.epoch)
            for v in pending:
                self._apply(v)
            return bool(pending)

    def decide(self, make: Callable[[View], View | None], apply: bool = True,
               announce: bool = True) -> View | None:
        """Decide the view `make(base)` on top of the latest decided view.

        `make` returns None when nothing needs to change any more. Losing a compare-and-set to
        another decision just moves the base forward (and applies that decision too, if
        `apply`). Returns the last view this call decided itself, or None. A base that is
        already current costs one store round trip per decision. `announce`: push the decision
        to every peer (a view that only adds ranks needs no push: every member applies it in
        the same collective call).
        """
        with self.lock:
            mine = None
            base = self.applied
            # No read of the latest view first: a proposal on a stale base loses its
            # compare-and-set and returns the decided view instead, which becomes the base.
            while True:
                proposal = make(base)
                if proposal is None:
                    break
                # Signed: every survivor of a failure proposes the same view, and only the one
                # whose compare-and-set wrote it announces it (else N ranks send N frames each).
                won = self.control.propose_view(proposal, by=self.me)
                if won.by == self.me and won == proposal:
                    mine = won
                    if self._on_decided is not None:
                        self._on_decided(base, won)
                if apply:
                    self._apply(won)
                base = won
            if mine is not None and announce:
                self._announce(mine)
            return mine

    def exclude(self, failed: Iterable[int], start_seq: int, apply: bool = True,
                cause: str = "") -> View | None:
        failed = set(failed)

        def make(base: View) -> View | None:
            todo = [r for r in failed if base.is_active(r) and r != self.me]
            if not todo or not base.is_active(self.me):
                return None
            return base.after_failure(todo, start_seq, cause)

        return self.decide(make, apply)
