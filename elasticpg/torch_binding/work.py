"""Work objects returned by every operation, as torch.distributed documents them.

A Work knows, besides completion, whether every transfer this rank attempted succeeded
(`local_success`) and which ranks it saw fail (`failed_ranks`): the per-operation result of
SPEC section 3. An operation that lost a peer completes, point-to-point ones included: `wait()`
returns, `local_success` is False and the failed-ranks hint names that peer (`exception()`
keeps the PeerFailedError). Only errors that are no peer failure (a timeout, a mismatch, a
message of the wrong shape) make `wait()` raise.

A receive completes on the transport's reader thread. Its Future's callbacks are the user's
code, so they never run there (a callback that blocks or raises would stall or kill the link):
`finish` hands the Future to one completion thread per process.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Collection, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ElasticPGError, OperationTimeoutError, PeerFailedError

log = logging.getLogger("elasticpg.work")


class _Completions:
    """The completion thread: resolves Futures in the order their works finished."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="elasticpg-completion")
                self._thread.start()
        self._queue.put(fn)

    def _run(self) -> None:
        while True:
            fn = self._queue.get()
            try:
                fn()
            except Exception:  # noqa: BLE001 - a user's callback failed; the next ones still run
                log.exception("a Future callback of an elasticpg work raised")


_COMPLETIONS = _Completions()


class ElasticWork(dist._Work):
    """Collectives return it already complete, so the common case carries no Event, lock or
    Future (they cost more than a small collective's data movement); a pending work (irecv)
    has an Event to wait on, and a Future exists only once someone asks for it."""

    # a completed work's state; instances override what differs
    _outputs: Sequence[torch.Tensor] = ()
    _timeout = 0.0
    _on_timeout: Callable[[], bool] | None = None
    _complete = True
    _done: threading.Event | None = None
    _lock: threading.Lock | None = None
    _error: BaseException | None = None
    _peer_failure: PeerFailedError | None = None
    _future: torch.futures.Future | None = None
    _finalizers: tuple = ()
    # called before wait() blocks: hands the links the caller reads itself back to their
    # readers, which deliver what this work waits for (transport.tcp.TcpTransport.release)
    before_block: Callable[[], None] | None = None
    local_success = True
    failed_ranks: Sequence[int] = ()
    group_slots = 0  # length of the failed-ranks hint mask
    src = -1

    def __init__(self, outputs: Sequence[torch.Tensor], timeout: float,
                 on_timeout: Callable[[], bool] | None = None) -> None:
        """A pending work (sends, receives): it gets an Event to wait on and a lock that orders
        finish against get_future; everything else starts from the class defaults."""
        super().__init__()
        self._outputs = list(outputs)
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._complete = False
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._finalizers: list[Callable[[], None]] = []  # type: ignore[misc]

    @classmethod
    def completed(cls, outputs: Sequence[torch.Tensor], failed: Collection[int] = (),
                  group_slots: int = 0, incomplete: bool = False) -> ElasticWork:
        """A finished operation: `failed`, the peers it saw fail (the failed-ranks hint);
        `incomplete`, it left out peers for another reason (view lag), so it is no success."""
        w = cls.__new__(cls)  # skips __init__: the class attributes hold a completed work's state
        dist._Work.__init__(w)
        w._outputs = outputs
        w.group_slots = group_slots
        if failed:
            w.failed_ranks = sorted(failed)
        if failed or incomplete:
            w.local_success = False
        return w

    def add_finalizer(self, fn: Callable[[], None]) -> None:
        """Run `fn` (e.g. copy a staged result back to the GPU) when the work succeeds."""
        self._finalizers.append(fn)

    def finish(self, error: BaseException | None = None, failed: Sequence[int] = ()) -> None:
        if self._complete:
            return
        with self._lock:
            if self._complete:
                return
            self.failed_ranks = sorted(set(failed))
            if isinstance(error, PeerFailedError):
                # completed without that peer, as a collective does; the outputs it would
                # have written are left as they were (no finalizer copies them back)
                self._peer_failure = error
                self.failed_ranks = sorted(set(failed) | set(error.ranks))
                error = None
                self.local_success = False
            else:
                self.local_success = error is None and not self.failed_ranks
            if error is None and self.local_success:
                try:
                    for fn in self._finalizers:
                        fn()
                except Exception as exc:  # noqa: BLE001 - reported as the work's error
                    error = ElasticPGError(f"completing the work failed: {exc}")
                    error.__cause__ = exc
                    self.local_success = False
            self._error = error
            self._complete = True
            future = self._future
        self._done.set()
        if future is not None:
            _COMPLETIONS.submit(lambda: self._resolve(future))

    def _resolve(self, future: torch.futures.Future) -> None:
        if self._error is None:
            future.set_result(self._outputs)
        else:
            future.set_exception(self._error)

    # ---- the dist._Work interface -------------------------------------------------------------
    def wait(self, timeout: timedelta | None = None) -> bool:
        if self._complete:
            if self._error is not None:
                raise self._error
            return True
        bound = timeout.total_seconds() if timeout else self._timeout
        if self.before_block is not None:
            self.before_block()
        if not self._done.wait(bound) and not self._done.is_set():
            if self._on_timeout is None or self._on_timeout():
                self.finish(OperationTimeoutError(f"operation did not complete in {bound:.1f}s"))
            else:
                self._done.wait()
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._complete

    def is_success(self) -> bool:
        return self._complete and self._error is None and self.local_success

    def exception(self) -> BaseException | None:
        return self._error or self._peer_failure

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._outputs

    def source_rank(self) -> int:
        return self.src

    _source_rank = source_rank  # what torch's recv() calls for ANY_SOURCE

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        if self._future is None:
            future = torch.futures.Future()
            if self._lock is None:
                self._future = future
                self._resolve(future)
            else:
                with self._lock:
                    if self._future is None:
                        self._future = future
                        if self._complete:
                            self._resolve(future)
        return self._future
