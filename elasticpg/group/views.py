"""ViewKeeper: decides membership views in the store and applies them locally.

Decisions are compare-and-set on `view/<epoch>` (GroupStore.propose_view), so two ranks that see
the same failure produce one decision, and every member applies the same sequence of views. The
decider pushes a VIEW frame to everyone it can reach, so the others learn of a decision without
polling the store on the hot path; they apply it at their next operation boundary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from ..control.group_store import GroupStore
from ..core.membership import View


class ViewKeeper:
    def __init__(self, control: GroupStore, me: int, initial: View,
                 on_applied: Callable[[View, View], None],
                 announce: Callable[[View], None]) -> None:
        self.control = control
        self.me = me
        self.applied = initial
        self._on_applied = on_applied
        self._announce = announce
        self.lock = threading.RLock()

    def _apply(self, view: View) -> None:
        old, self.applied = self.applied, view
        self._on_applied(old, view)

    def decided(self, after: int) -> list[View]:
        """Views decided in the store with epochs above `after`, in order."""
        out = []
        latest = self.control.latest_epoch()
        for e in range(after + 1, latest + 1):
            out.append(self.control.view(e))
        return out

    def catch_up(self, only_if: Callable[[View], bool] | None = None) -> bool:
        """Apply the decided views past ours (all, or up to the first one `only_if` refuses)."""
        with self.lock:
            changed = False
            for v in self.decided(self.applied.epoch):
                if only_if is not None and not only_if(v):
                    break
                self._apply(v)
                changed = True
            return changed

    def decide(self, make: Callable[[View], View | None], apply: bool = True) -> View | None:
        """Decide the view `make(base)` on top of the latest decided view.

        `make` returns None when nothing needs to change any more. Losing a compare-and-set to
        another decision just moves the base forward (and applies that decision too, if
        `apply`). Returns the last view this call decided itself, or None.
        """
        with self.lock:
            mine = None
            base = self.applied
            if apply:
                self.catch_up()
                base = self.applied
            else:
                pending = self.decided(base.epoch)
                base = pending[-1] if pending else base
            while True:
                proposal = make(base)
                if proposal is None:
                    break
                won = self.control.propose_view(proposal)
                if won == proposal:
                    mine = won
                if apply:
                    self._apply(won)
                base = won
            if mine is not None:
                self._announce(mine)
            return mine

    def exclude(self, failed: Iterable[int], start_seq: int, apply: bool = True) -> View | None:
        failed = set(failed)

        def make(base: View) -> View | None:
            todo = [r for r in failed if base.is_active(r) and r != self.me]
            if not todo or not base.is_active(self.me):
                return None
            return base.after_failure(todo, start_seq)

        return self.decide(make, apply)
