"""The view keeper and the store keys over a real c10d HashStore, in-process: racing
deciders make one decision per epoch, and a join's give-up races its admission on one key."""

from __future__ import annotations

import threading

import torch.distributed as dist

from elasticpg.control.group_store import GroupStore
from elasticpg.core.group_state import JoinAttempt
from elasticpg.core.membership import View
from elasticpg.group.views import ViewKeeper


def _keepers(store: dist.Store, ranks, size: int = 6) -> dict[int, ViewKeeper]:
    control = GroupStore(store, timeout=10.0)
    initial = View.initial(size, ranks)
    applied: dict[int, list[View]] = {r: [] for r in ranks}
    keepers = {}
    for r in ranks:
        k = ViewKeeper(control, r, initial, on_applied=lambda old, new, r=r: applied[r].append(new),
                       announce=lambda view: None)
        k.history = applied[r]  # type: ignore[attr-defined]
        keepers[r] = k
    return keepers


def test_racing_deciders_of_the_same_failure_make_one_decision():
    store = dist.HashStore()
    keepers = _keepers(store, range(5))
    barrier = threading.Barrier(4)
    decided: dict[int, View | None] = {}

    def decide(r: int) -> None:
        barrier.wait()
        decided[r] = keepers[r].exclude([4], start_seq=10)

    threads = [threading.Thread(target=decide, args=(r,)) for r in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # one decision in the store (deciders that proposed the identical view may each call it
    # theirs: it is the same view), and everyone applied it
    assert GroupStore(store, 1.0).latest_epoch() == 1
    winners = {v for v in decided.values() if v is not None}
    assert len(winners) == 1
    for r in range(4):
        assert keepers[r].applied in winners and keepers[r].applied.active == (0, 1, 2, 3)


def test_racing_deciders_of_different_failures_build_on_each_other():
    store = dist.HashStore()
    keepers = _keepers(store, range(6))
    barrier = threading.Barrier(2)

    def decide(r: int, failed: int) -> None:
        barrier.wait()
        keepers[r].exclude([failed], start_seq=3)

    threads = [threading.Thread(target=decide, args=(0, 4)),
               threading.Thread(target=decide, args=(1, 5))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # one of them won epoch 1, the other re-proposed on top of it: both holes, two epochs
    # (the first winner learns of epoch 2 at its next boundary)
    for r in (0, 1):
        keepers[r].catch_up()
        assert keepers[r].applied.epoch == 2 and keepers[r].applied.active == (0, 1, 2, 3)
    # a third rank catches up to the same sequence of views
    assert keepers[2].catch_up()
    assert [v.epoch for v in keepers[2].history] == [1, 2]
    assert keepers[2].applied == keepers[0].applied


def test_a_decision_without_applying_leaves_the_view_to_sync():
    store = dist.HashStore()
    keepers = _keepers(store, range(3))
    keepers[0].exclude([2], start_seq=0, apply=False, cause="rank 2: eof")
    assert keepers[0].applied.epoch == 0  # mode (b): sync_after_failure applies it
    assert keepers[0].catch_up() and keepers[0].applied.cause == "rank 2: eof"


def test_a_joiners_give_up_and_its_admission_cannot_both_win():
    # The founders of the reproducer admitted a joiner that had given up; the two
    # sides now race on one compare-and-set key, in either order.
    for joiner_first in (True, False):
        control = GroupStore(dist.HashStore(), timeout=1.0)
        join = JoinAttempt(3, incarnation=1, attempt=1)
        control.open_join(join)
        if joiner_first:
            assert control.abandon_join(join)
            assert not any(control.admit_join(join, start_seq=40) for _ in range(3))
        else:
            assert all(control.admit_join(join, start_seq=40) for _ in range(3))
            assert not control.abandon_join(join)


def test_many_members_admitting_concurrently_agree_with_a_racing_give_up():
    control = GroupStore(dist.HashStore(), timeout=1.0)
    join = JoinAttempt(3, 2, 1)
    control.open_join(join)
    results: dict[str, bool] = {}
    barrier = threading.Barrier(5)

    def member(i: int) -> None:
        barrier.wait()
        results[f"m{i}"] = control.admit_join(join, start_seq=7)

    def joiner() -> None:
        barrier.wait()
        results["joiner"] = control.abandon_join(join)

    threads = [threading.Thread(target=member, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=joiner))
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    members = {v for k, v in results.items() if k != "joiner"}
    assert len(members) == 1  # every member saw the same outcome
    assert members != {results["joiner"]}  # and exactly one side won


def test_a_later_attempt_is_a_fresh_key():
    control = GroupStore(dist.HashStore(), timeout=1.0)
    first, second = JoinAttempt(3, 1, 1), JoinAttempt(3, 1, 2)
    control.open_join(first)
    assert control.abandon_join(first)
    control.open_join(second)
    assert control.admit_join(second, start_seq=9)
    view = View.initial(4, range(4))
    control.announce_joined(second, view)
    assert control.wait_joined(second, timeout=1.0) == view
