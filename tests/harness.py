"""A pool of spawned rank processes shared by many tests.

`import torch` costs ~2 s per process, so the pool starts its workers once and runs one job after
another on them. For every job the test process hosts a fresh TCPStore (so no rank is special and
the store outlives any rank's death), and each worker runs `fn(rank, world, store_port, *args)`.
A job that does not finish within its bound kills and replaces the whole pool, so a hang fails
one test instead of the suite; a worker that dies (on purpose or not) is replaced before the
next job.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

HOST = "127.0.0.1"


@dataclass
class RankResult:
    status: str  # "ok", "error" or "dead"
    value: Any = None  # return value, traceback text, or exit code


def _worker_main(inbox: mp.Queue, outbox: mp.Queue, slot: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Crashes are detected by closed links at once; the silence bound only catches hangs. On a
    # 2-core CI box running 5 ranks, a 3 s bound can mistake a starved rank for a hung one, so
    # tests use 10 s unless they pass their own (the hang tests do).
    os.environ.setdefault("ELASTICPG_FAILURE_TIMEOUT", "10")
    import torch

    torch.set_num_threads(1)
    # elasticpg is imported here, not at the top: importing it imports torch, which must come
    # after OMP_NUM_THREADS is set in this freshly spawned worker
    import elasticpg  # noqa: F401  (registers the backend once per worker)
    from elasticpg.cli.launching import reset_torch_distributed

    while True:
        job = inbox.get()
        if job is None:
            return
        job_id, fn, rank, world, port, args = job
        try:
            value = fn(rank, world, port, *args)
            outbox.put((job_id, slot, "ok", value))
        except BaseException:  # noqa: BLE001 - report everything to the test
            outbox.put((job_id, slot, "error", traceback.format_exc()))
        finally:
            reset_torch_distributed()  # the next job needs the same group names on every rank


class RankPool:
    def __init__(self, size: int, default_world: int | None = None) -> None:
        self.size = size
        self.default_world = default_world or size
        self._ctx = mp.get_context("spawn")
        self._outbox: mp.Queue = self._ctx.Queue()
        self._procs: list[Any] = [None] * size
        self._inboxes: list[Any] = [None] * size
        self._job = 0
        for i in range(size):
            self._start(i)

    def _start(self, i: int) -> None:
        inbox = self._ctx.Queue()
        p = self._ctx.Process(target=_worker_main, args=(inbox, self._outbox, i), daemon=True,
                              name=f"rank-worker-{i}")
        p.start()
        self._procs[i], self._inboxes[i] = p, inbox

    def pid(self, slot: int) -> int:
        return self._procs[slot].pid

    def _revive(self) -> None:
        for i, p in enumerate(self._procs):
            if not p.is_alive():
                p.join()
                self._start(i)

    def run_raw(self, fn: Callable, *args: Any, world: int | None = None,
                timeout: float = 60.0) -> list[RankResult]:
        """Run fn on ranks 0..world-1 (pool slots 0..world-1); one RankResult per rank."""
        import torch.distributed as dist

        world = world or self.default_world
        assert world <= self.size, f"pool has {self.size} workers, job needs {world}"
        self._revive()
        self._job += 1
        store = dist.TCPStore(HOST, 0, world_size=None, is_master=True,
                              timeout=timedelta(seconds=timeout), wait_for_workers=False)
        for r in range(world):
            self._inboxes[r].put((self._job, fn, r, world, store.port, args))
        results: dict[int, RankResult] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) < world:
                try:
                    job_id, slot, status, value = self._outbox.get(timeout=0.2)
                except queue.Empty:
                    for r in range(world):
                        if r not in results and not self._procs[r].is_alive():
                            # drain a result that may have been sent just before exiting
                            results[r] = RankResult("dead", self._procs[r].exitcode)
                    if time.monotonic() > deadline:
                        self.restart()
                        missing = sorted(set(range(world)) - set(results))
                        raise TimeoutError(
                            f"ranks {missing} did not finish {fn.__name__} within {timeout}s; "
                            f"partial results: {results}") from None
                    continue
                if job_id == self._job:
                    results[slot] = RankResult(status, value)
        finally:
            del store
        return [results[r] for r in range(world)]

    def run(self, fn: Callable, *args: Any, world: int | None = None,
            timeout: float = 60.0) -> list[Any]:
        """Run fn on every rank and return the values; any rank's error fails the test."""
        results = self.run_raw(fn, *args, world=world, timeout=timeout)
        bad = [(r, x) for r, x in enumerate(results) if x.status != "ok"]
        if bad:
            msg = "\n".join(f"--- rank {r}: {x.status}\n{x.value}" for r, x in bad)
            raise AssertionError(f"{fn.__name__} failed on {len(bad)} rank(s):\n{msg}")
        return [x.value for x in results]

    def restart(self) -> None:
        self.close()
        self._outbox = self._ctx.Queue()
        for i in range(self.size):
            self._start(i)

    def close(self) -> None:
        for i, p in enumerate(self._procs):
            if p is not None and p.is_alive():
                try:
                    self._inboxes[i].put(None)
                except (OSError, ValueError):
                    pass
        for p in self._procs:
            if p is None:
                continue
            p.join(timeout=5)
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
                p.join(timeout=5)


def init_group(rank: int, world: int, port: int, backend: str = "elasticpg",
               timeout: float = 30.0, env: dict[str, str] | None = None, **kwargs: Any) -> None:
    """Inside a worker: join this job's default group through the test's store.

    `env`: ELASTICPG_* variables set only while the group is created (e.g. the transport)."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        store = dist.TCPStore(HOST, port, is_master=False, timeout=timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout), **kwargs)
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def error_name(fn: Callable[[], Any]) -> str:
    """Call fn; the name of the exception it raised, or "ok". Lets a rank report, as plain
    data, which clear error a bad call produced."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reporting is the point
        return type(exc).__name__
    return "ok"


def serving_steps(seconds: float = 30.0) -> Iterator[int]:
    """The steps of a healthy ranks' serving loop (one collective each), bounded by time, not
    by count: over shared memory a step takes a fraction of a millisecond, so no step count
    bounds how long a joiner may take to warm up on a loaded machine. Breaking out of the loop
    is the success path; running out of time raises AssertionError."""
    deadline = time.monotonic() + seconds
    step = 0
    while time.monotonic() < deadline:
        yield step
        step += 1
    raise AssertionError(f"the joiner was not ready after {seconds:.0f} s ({step} steps)")
