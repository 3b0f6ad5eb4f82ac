"""Work objects returned by every operation, as torch.distributed documents them.

A Work knows, besides completion, whether every transfer this rank attempted succeeded
(`local_success`) and which ranks it saw fail (`failed_ranks`): the per-operation result of
SPEC section 3.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import OperationTimeoutError


class ElasticWork(dist._Work):
    def __init__(self, outputs: Sequence[torch.Tensor], timeout: float,
                 on_timeout: Callable[[], bool] | None = None) -> None:
        super().__init__()
        self._outputs = list(outputs)
        self._timeout = timeout
        self._on_timeout = on_timeout
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._future: torch.futures.Future = torch.futures.Future()
        self._finalizers: list[Callable[[], None]] = []
        self.local_success = True
        self.failed_ranks: list[int] = []
        self.group_slots = 0  # length of the failed-ranks hint mask
        self.src = -1

    @classmethod
    def completed(cls, outputs: Sequence[torch.Tensor], failed: Sequence[int] = (),
                  group_slots: int = 0) -> ElasticWork:
        w = cls(outputs, 0.0)
        w.group_slots = group_slots
        w.finish(failed=failed)
        return w

    def add_finalizer(self, fn: Callable[[], None]) -> None:
        """Run `fn` (e.g. copy a staged result back to the GPU) when the work succeeds."""
        self._finalizers.append(fn)

    def finish(self, error: BaseException | None = None, failed: Sequence[int] = ()) -> None:
        if self._done.is_set():
            return
        self.failed_ranks = sorted(set(failed))
        self.local_success = error is None and not self.failed_ranks
        self._error = error
        if error is None:
            for fn in self._finalizers:
                fn()
        self._done.set()
        if error is None:
            self._future.set_result(self._outputs)
        else:
            self._future.set_exception(error)

    # ---- the dist._Work interface -------------------------------------------------------------
    def wait(self, timeout: timedelta | None = None) -> bool:
        bound = timeout.total_seconds() if timeout else self._timeout
        if not self._done.wait(bound) and not self._done.is_set():
            if self._on_timeout is None or self._on_timeout():
                self.finish(OperationTimeoutError(f"operation did not complete in {bound:.1f}s"))
            else:
                self._done.wait()
        if self._error is not None:
            raise self._error
        return True

    def is_completed(self) -> bool:
        return self._done.is_set()

    def is_success(self) -> bool:
        return self._done.is_set() and self._error is None

    def exception(self) -> BaseException | None:
        return self._error

    def result(self) -> list[torch.Tensor]:
        self.wait()
        return self._outputs

    def source_rank(self) -> int:
        return self.src

    _source_rank = source_rank  # what torch's recv() calls for ANY_SOURCE

    def synchronize(self) -> None:
        self.wait()

    def get_future(self) -> torch.futures.Future:
        return self._future
