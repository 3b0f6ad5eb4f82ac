"""What the multi-process tests share: the rank pool (elasticpg.cli.rank_pool, also used by
the benchmark commands), joining a job's group from inside a worker, and small helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from elasticpg.cli.rank_pool import RankPool, RankResult

__all__ = ["HOST", "RankPool", "RankResult", "error_name", "init_group", "serving_steps",
           "TEST_ENV"]

# where jobs find their store: here, or the switch of a multi-host run (elasticpg.netns.nodes)
HOST = os.environ.get("ELASTICPG_NETNS_STORE", "127.0.0.1")
# Crashes are detected by closed links at once; the silence bound only catches hangs. On a
# 2-core CI box running 5 ranks, a 3 s bound can mistake a starved rank for a hung one, so
# tests use 10 s unless they pass their own (the hang tests do).
TEST_ENV = {"ELASTICPG_FAILURE_TIMEOUT": "10"}


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
