"""What the multi-process tests share: the rank pool (elasticpg.cli.rank_pool, also used by
the benchmark commands), joining a job's group from inside a worker, and small helpers."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from elasticpg.cli.rank_pool import RankPool, RankResult

__all__ = ["HOST", "RankPool", "RankResult", "admit_when_ready", "error_name", "init_group",
           "replace_a_rank", "serving_steps", "TEST_ENV"]

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


def admit_when_ready(joiner: int, step: Callable[[], object]) -> str:
    """Inside a healthy rank: serve (`step()`, one collective) until `joiner` is agreed ready,
    then admit it; the admission's status ("Applied")."""
    import elasticpg

    for _ in serving_steps():
        step()
        if elasticpg.get_peer_state(None, [joiner]) == [True]:
            return elasticpg.recover_ranks(None, [joiner]).status.value
    raise AssertionError("unreachable: serving_steps raises when time is up")


def _sum(x: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([x])
    dist.all_reduce(t)
    return t.item()


def replace_a_rank(rank: int, victim: int, init: Callable[[int, bool], None], coord: Any,
                   hold: str | None = None) -> dict:
    """Inside a worker of a 4-rank group (pool worker 4 plays the replacement): `victim` dies
    after one all_reduce, the survivors go on, a replacement joins its slot and is admitted.

    `init(rank, is_extension)` creates the default group (over whichever store is tested);
    `coord` is a store for the test's own signals; `hold`: a key the survivors wait for before
    they admit (the test looks at the waiting join meanwhile). Every rank contributes its rank
    (the replacement 10 + its rank): sums 6, 6 - victim, then 16."""
    import elasticpg

    survivors = [r for r in range(4) if r != victim]
    if rank == 4:
        coord.wait([f"excluded{r}" for r in survivors], timedelta(seconds=60))
        init(victim, True)
        elasticpg.join_group(timeout=60.0)
        return {"after": _sum(10.0 + victim), "mask": elasticpg.get_active_ranks().tolist()}
    init(rank, False)
    first = _sum(float(rank))
    if rank == victim:
        os._exit(0)
    out = {"first": first, "survivors": _sum(float(rank)),
           "mask": elasticpg.get_active_ranks().tolist()}
    coord.set(f"excluded{rank}", "1")
    if hold is not None:
        coord.wait([hold], timedelta(seconds=60))
    out["admit"] = admit_when_ready(victim, lambda: _sum(float(rank)))
    out["after"] = _sum(float(rank))
    out["mask_after"] = elasticpg.get_active_ranks().tolist()
    out["epoch"] = elasticpg.get_current_epoch()
    return out


def only_victim_died(res: list[RankResult], victim: int) -> None:
    """The rank `victim` was killed; every other rank's job returned."""
    assert res[victim].status == "dead", res[victim]
    bad = [(r, x.value) for r, x in enumerate(res) if r != victim and x.status != "ok"]
    assert not bad, bad


def check_replaced(res: list[RankResult], victim: int) -> None:
    """What `replace_a_rank` must have produced at every rank."""
    only_victim_died(res, victim)
    mask = [0 if r == victim else 1 for r in range(4)]
    for r in range(4):
        if r != victim:
            v = res[r].value
            assert (v["first"], v["survivors"], v["mask"]) == (6.0, 6.0 - victim, mask), v
            assert (v["admit"], v["epoch"]) == ("Applied", 2), v
            assert v["after"] == 16.0 and v["mask_after"] == [1, 1, 1, 1], v
    assert res[4].value == {"after": 16.0, "mask": [1, 1, 1, 1]}
