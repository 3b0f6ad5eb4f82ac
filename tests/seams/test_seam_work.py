"""Work objects in-process: user callbacks never run on the thread that completes a receive,
and a finalizer that fails becomes the work's error instead of killing that thread."""

from __future__ import annotations

import threading

import pytest
import torch

from elasticpg.errors import ElasticPGError, OperationTimeoutError, PeerFailedError
from elasticpg.torch_binding.work import ElasticWork


def _finish_on(name: str, work: ElasticWork, **kwargs) -> BaseException | None:
    """Finish `work` on a thread called `name` (standing in for a transport reader)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            work.finish(**kwargs)
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            raised.append(exc)

    t = threading.Thread(target=run, name=name)
    t.start()
    t.join(10)
    return raised[0] if raised else None


def test_future_callbacks_do_not_run_on_the_completing_thread():
    work = ElasticWork([torch.zeros(1)], timeout=5.0)
    ran_on: list[str] = []
    done = threading.Event()

    def callback(fut):
        ran_on.append(threading.current_thread().name)
        done.set()
        raise RuntimeError("a user callback that fails")

    work.get_future().then(callback)
    assert _finish_on("elasticpg-link-r0", work) is None  # the reader is not hurt
    assert done.wait(10)
    assert ran_on and ran_on[0] != "elasticpg-link-r0"
    assert work.wait() and work.is_success()


def test_a_failing_finalizer_becomes_the_works_error():
    work = ElasticWork([torch.zeros(1)], timeout=5.0)

    def copy_back():
        raise RuntimeError("CUDA copy failed")

    work.add_finalizer(copy_back)
    assert _finish_on("elasticpg-link-r0", work) is None
    with pytest.raises(ElasticPGError, match="CUDA copy failed"):
        work.wait()
    assert not work.local_success


def test_a_receive_from_a_failed_peer_completes_and_says_so():
    """Like a collective that lost a member: wait() returns, the future resolves, and the
    work reports the failure (local_success, the failed-ranks hint, exception())."""
    out = [torch.zeros(1)]
    work = ElasticWork(out, timeout=5.0)
    fut = work.get_future()
    _finish_on("elasticpg-liveness-r0", work, error=PeerFailedError([2], "eof"))
    assert [t.data_ptr() for t in fut.wait()] == [out[0].data_ptr()] and work.wait()
    assert work.failed_ranks == [2] and not work.local_success and not work.is_success()
    assert isinstance(work.exception(), PeerFailedError)


def test_a_receive_that_is_not_a_peer_failure_still_raises():
    work = ElasticWork([torch.zeros(1)], timeout=5.0)
    fut = work.get_future()
    _finish_on("elasticpg-liveness-r0", work, error=OperationTimeoutError("cancelled"))
    with pytest.raises(OperationTimeoutError):
        fut.wait()
    with pytest.raises(OperationTimeoutError):
        work.wait()


def test_a_completed_collectives_future_is_ready_at_once():
    out = [torch.ones(2)]
    w = ElasticWork.completed(out, failed={3}, group_slots=4)
    assert w.get_future().wait() is out
    assert not w.local_success and w.failed_ranks == [3]
