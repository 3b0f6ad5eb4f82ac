"""A pool of spawned rank processes that run one job after another: the multi-process tests
and the benchmark commands share it.

`import torch` costs ~2 s per process, so the pool starts its workers once (and waits until
each has imported torch and elasticpg, so that start-up never overlaps a measurement), then
runs jobs on them. A job is `fn(rank, world, port, *args)` on ranks 0..world-1, where `port`
is a TCPStore the parent hosts for that job (a fresh one unless the caller brings its own), so
no rank is special and the store outlives any rank's death. A job that does not finish within
its bound kills and replaces the whole pool, so a hang fails one job instead of everything
after it; a worker that dies (on purpose or not) is replaced before the next job.

Workers never outlive the parent: they die with it (PR_SET_PDEATHSIG, and a check of their
parent pid while idle), and an idle worker exits on its own after `IDLE_LIMIT` seconds.
"""

from __future__ import annotations

import os
import queue
import signal
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .launching import die_with_parent, listen_store, reset_torch_distributed

READY_TIMEOUT = 120.0  # seconds for a spawned worker to import torch and report ready
IDLE_LIMIT = 900.0  # an idle worker exits on its own after this long


class PoolTimeoutError(TimeoutError):
    """A job, or a worker's start, did not finish within its bound (the pool was replaced)."""


@dataclass
class RankResult:
    status: str  # "ok", "error", "dead" or "left alive" (a victim SIGKILLed by the pool)
    value: Any = None  # return value, traceback text, or exit code


def _worker_main(slot: int, inbox: Any, outbox: Any, parent_pid: int,
                 env: Mapping[str, str]) -> None:
    die_with_parent()  # a SIGSTOPped rank cannot notice that the parent is gone
    if os.getppid() != parent_pid:
        os._exit(3)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    import torch

    torch.set_num_threads(1)
    # elasticpg is imported here, not at the top: importing it imports torch, which must come
    # after OMP_NUM_THREADS is set in this freshly spawned worker
    import elasticpg  # noqa: F401  (registers the backend once per worker)

    outbox.put((None, slot, "ready", os.getpid()))
    idle_since = time.monotonic()
    while True:
        if os.getppid() != parent_pid:
            os._exit(3)  # orphaned: never linger
        try:
            job = inbox.get(timeout=0.5)
        except queue.Empty:
            if time.monotonic() - idle_since > IDLE_LIMIT:
                os._exit(4)
            continue
        if job is None:
            return
        job_id, fn, rank, world, port, args = job
        try:
            outbox.put((job_id, slot, "ok", fn(rank, world, port, *args)))
        except BaseException:  # noqa: BLE001 - report everything to the parent
            outbox.put((job_id, slot, "error", traceback.format_exc()))
        finally:
            reset_torch_distributed()  # the next job needs the same group names on every rank
        idle_since = time.monotonic()


class RankPool:
    def __init__(self, size: int, default_world: int | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        import torch.multiprocessing as mp

        self.size = size
        self.default_world = default_world or size
        self._env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self._ctx = mp.get_context("spawn")
        self._outbox: Any = self._ctx.Queue()
        self._procs: list[Any] = [None] * size
        self._inboxes: list[Any] = [None] * size
        self._job = 0
        self._start(range(size))

    def _start(self, slots: range | list[int]) -> None:
        for i in slots:
            inbox = self._ctx.Queue()
            p = self._ctx.Process(target=_worker_main, daemon=True, name=f"rank-worker-{i}",
                                  args=(i, inbox, self._outbox, os.getpid(), self._env))
            p.start()
            self._procs[i], self._inboxes[i] = p, inbox
        waiting = set(slots)
        deadline = time.monotonic() + READY_TIMEOUT
        while waiting:
            try:
                _job, slot, status, _pid = self._outbox.get(timeout=0.2)
            except queue.Empty:
                dead = [i for i in waiting if not self._procs[i].is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    raise PoolTimeoutError(
                        f"worker(s) {sorted(dead or waiting)} did not start (exit codes "
                        f"{[self._procs[i].exitcode for i in dead]})") from None
                continue
            if status == "ready":
                waiting.discard(slot)

    def pid(self, slot: int) -> int:
        return self._procs[slot].pid

    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None]

    def revive(self) -> list[int]:
        """Replace dead workers (blocks until they are ready); returns their slots."""
        dead = [i for i, p in enumerate(self._procs) if not p.is_alive()]
        for i in dead:
            self._procs[i].join(1)
        if dead:
            self._start(dead)
        return dead

    def run_raw(self, fn: Callable, *args: Any, world: int | None = None,
                timeout: float = 60.0, port: int | None = None,
                victim: int | None = None) -> list[RankResult]:
        """Run fn on ranks 0..world-1 (workers 0..world-1); one RankResult per rank.

        `port`: the job's store (default: a fresh TCPStore hosted here for this job).
        `victim`: a rank that is meant to die or hang: once every other rank is done it gets
        5 s to be gone, then it is SIGKILLed and reported "left alive"."""
        world = world or self.default_world
        if world > self.size:
            raise ValueError(f"pool has {self.size} workers, job needs {world}")
        self.revive()
        self._job += 1
        store = None
        if port is None:
            store, port = listen_store(world, timeout)
        for r in range(world):
            self._inboxes[r].put((self._job, fn, r, world, port, args))
        results: dict[int, RankResult] = {}
        deadline = time.monotonic() + timeout
        try:
            while len(results) < world:
                others_done = victim is not None and all(
                    r in results for r in range(world) if r != victim)
                if others_done and victim not in results:
                    results[victim] = self._settle_victim(victim)
                    continue
                try:
                    job_id, slot, status, value = self._outbox.get(timeout=0.1)
                except queue.Empty:
                    for r in range(world):
                        if r not in results and not self._procs[r].is_alive():
                            results[r] = RankResult("dead", self._procs[r].exitcode)
                    if time.monotonic() > deadline:
                        self.restart()
                        missing = sorted(set(range(world)) - set(results))
                        raise PoolTimeoutError(
                            f"ranks {missing} did not finish {fn.__name__} within "
                            f"{timeout:.0f}s; partial results: {results}") from None
                    continue
                if job_id == self._job:
                    results[slot] = RankResult(status, value)
        finally:
            del store
        return [results[r] for r in range(world)]

    def _settle_victim(self, victim: int) -> RankResult:
        p = self._procs[victim]
        p.join(5)
        if p.is_alive():
            kill_process(p.pid)
            p.join(5)
            return RankResult("left alive", "still alive after the others finished; "
                                            "SIGKILLed by the pool")
        return RankResult("dead", p.exitcode)

    def run(self, fn: Callable, *args: Any, world: int | None = None,
            timeout: float = 60.0) -> list[Any]:
        """Run fn on every rank and return the values; any rank's error fails the call."""
        results = self.run_raw(fn, *args, world=world, timeout=timeout)
        bad = [(r, x) for r, x in enumerate(results) if x.status != "ok"]
        if bad:
            msg = "\n".join(f"--- rank {r}: {x.status}\n{x.value}" for r, x in bad)
            raise AssertionError(f"{fn.__name__} failed on {len(bad)} rank(s):\n{msg}")
        return [x.value for x in results]

    def restart(self) -> None:
        self.kill_all()
        self._outbox = self._ctx.Queue()
        self._start(range(self.size))

    def kill_all(self) -> None:
        for p in self._procs:
            if p is not None and p.is_alive():
                kill_process(p.pid)
        for p in self._procs:
            if p is not None:
                p.join(5)

    def close(self) -> None:
        for i, p in enumerate(self._procs):
            if p is not None and p.is_alive():
                try:
                    self._inboxes[i].put(None)
                except (OSError, ValueError):
                    pass  # its queue is already gone: the kill below ends it
        deadline = time.monotonic() + 10
        for p in self._procs:
            if p is not None:
                p.join(max(0.1, deadline - time.monotonic()))
        self.kill_all()


def kill_process(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it is gone already
