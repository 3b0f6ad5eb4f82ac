"""Several group runtimes in one process (threads, real sockets, one HashStore): the shell's
own behaviour, without the cost of a process per rank."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from elasticpg.core.group_state import Phase
from elasticpg.options import Options
from elasticpg.torch_binding.process_group import ElasticProcessGroup


def _groups(n: int, **opts) -> list[ElasticProcessGroup]:
    store = dist.HashStore()
    opts.setdefault("failure_timeout", 10.0)
    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda r: ElasticProcessGroup(store, r, n, timedelta(seconds=20),
                                                         "g", Options(**opts)), range(n)))


def _on_all(groups, fn: Callable[[ElasticProcessGroup], object]) -> list:
    with ThreadPoolExecutor(len(groups)) as ex:
        return list(ex.map(fn, groups))


def _leave_and_wait(leaver: ElasticProcessGroup, observer) -> None:
    """`leaver` destroys its group; return once `observer` has recorded the failure."""
    seen = threading.Event()
    real = observer.fail_peer

    def spy(peer: int, reason: str, how: str = "", incarnation: int | None = None) -> None:
        real(peer, reason, how, incarnation)
        if peer == leaver.runtime.rank:
            seen.set()

    observer.fail_peer = spy
    leaver.runtime.destroy()
    assert seen.wait(20)
    observer.fail_peer = real


@pytest.fixture
def made():
    groups: list[ElasticProcessGroup] = []
    yield groups
    for g in groups:
        g.runtime.destroy()


def test_coalesced_forms_report_a_peer_that_failed_inside(made):
    # Before: all_reduce_coalesced returned a fresh successful Work whatever its inner
    # all_reduces saw.
    made += _groups(3, auto_deactivate_on_failure=False, auto_sync_on_failure=False)
    _on_all(made, lambda g: g.barrier().wait())
    made[2].runtime.destroy()  # a graceful leave: the survivors see it go
    survivors = made[:2]

    def coalesced(g):
        w = g.allreduce_coalesced([torch.ones(3), torch.ones(2)])
        w.wait()
        return w.local_success, list(w.failed_ranks)

    results = _on_all(survivors, coalesced)
    assert results == [(False, [2]), (False, [2])]


def test_the_liveness_thread_survives_a_tick_that_raises(made):
    # Before: one exception ended hang detection for the life of the group.
    made += _groups(2, heartbeat_interval=0.05)
    rt = made[0].runtime
    ticks = threading.Semaphore(0)
    real_closed, real_poll = rt.transport.closed_outgoing, rt.poll_decisions
    calls = {"n": 0}

    def flaky(wait: float):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in one tick")
        return real_closed(wait)

    def counted() -> None:
        real_poll()
        ticks.release()

    rt.transport.closed_outgoing = flaky
    rt.poll_decisions = counted
    assert ticks.acquire(timeout=30) and ticks.acquire(timeout=30)
    assert rt.liveness.thread.is_alive() and calls["n"] >= 2


def test_a_failure_reported_while_sync_after_failure_talks_to_the_store_stays_pending(made):
    # Before: sync_after_failure cleared its dirty flag after its store I/O, erasing a failure
    # that arrived meanwhile.
    made += _groups(4, auto_sync_on_failure=False)
    _on_all(made, lambda g: g.barrier().wait())
    rt = made[0].runtime
    _leave_and_wait(made[3], rt)
    real = rt.control.propose_view
    fired = {"done": False}

    def propose_with_a_concurrent_failure(view, by=-1):
        if not fired["done"]:
            fired["done"] = True
            _leave_and_wait(made[2], rt)  # rank 2 goes while rank 0 talks to the store
        return real(view, by)

    rt.control.propose_view = propose_with_a_concurrent_failure
    status, view = rt.sync_after_failure()
    assert status == "Reconciled" and not view.is_active(3)
    assert fired["done"]
    # rank 2's failure is covered by the applied view (another rank's decider may have been
    # quicker), or it is still pending for the next boundary: never forgotten
    assert not rt.view.is_active(2) or (2 in rt.state.failed and rt.state.dirty)


def test_a_destroyed_group_refuses_everything_and_leaves_no_thread(made):
    made += _groups(2)
    _on_all(made, lambda g: g.barrier().wait())
    before = {t.name for t in threading.enumerate() if t.name.startswith("elasticpg")}
    assert any("liveness" in n for n in before)
    for g in made:
        g.runtime.destroy()
    assert all(g.runtime.state.phase is Phase.DESTROYED for g in made)
    left = [t.name for t in threading.enumerate()
            if t.name.startswith("elasticpg") and t.name != "elasticpg-completion"]
    assert left == [], left
    from elasticpg.errors import GroupStateError
    with pytest.raises(GroupStateError, match="destroyed"):
        made[0].allreduce([torch.ones(1)])
